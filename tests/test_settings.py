"""ReductionSettings: the user contract of model_args, validated before any compute."""

import pytest

from lmms_simignore.settings import ReductionSettings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "fastvv"}, "reduction must be one of"),
        ({"reduction": "simignore", "keep": 4, "similarity": "dot"}, "similarity must be one of"),
        ({"reduction": "simignore", "keep": 4, "text": "question"}, "text must be one of"),
        ({"reduction": "simignore", "keep": 4, "apply": "prune"}, "apply must be one of"),
        ({"reduction": "simignore"}, "exactly one of keep"),
        ({"reduction": "simignore", "keep": 4, "ignore": 2}, "exactly one of keep"),
        ({"reduction": "simignore", "ignore": -3}, "ignore must be a non-negative integer"),
        ({"reduction": "simignore", "ignore": 2.5}, "ignore must be a non-negative integer"),
        ({"reduction": "simignore", "keep": -1.0}, "keep must be a non-negative"),
        ({"reduction": "simignore", "keep": 1.5}, "float above 1"),
        ({"reduction": "simignore", "keep": True}, "keep must be a non-negative"),
        ({"reduction": "none", "keep": 4}, "no effect with reduction=none"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, kept",
    [
        ({}, 576),
        ({"reduction": "simignore", "ignore": 124}, 452),  # the paper's "ignore 124/576"
        ({"reduction": "simignore", "keep": 452}, 452),
        ({"reduction": "simignore", "keep": 0.25}, 144),
        ({"reduction": "simignore", "keep": 1.0}, 576),
        ({"reduction": "simignore", "keep": 0}, 0),
        ({"reduction": "simignore", "ignore": 576}, 0),
    ],
)
def test_budget_per_image(kwargs, kept):
    assert ReductionSettings(**kwargs).kept_per_image(576) == kept


def test_fraction_rounds_half_up():
    assert ReductionSettings(reduction="simignore", keep=0.5).kept_per_image(25) == 13


@pytest.mark.parametrize("kwargs", [{"keep": 577}, {"ignore": 600}])
def test_budget_above_the_model_image_token_count_names_that_count(kwargs):
    settings = ReductionSettings(reduction="simignore", **kwargs)
    with pytest.raises(ValueError, match="576 image tokens per image"):
        settings.kept_per_image(576)


def test_settings_are_frozen():
    settings = ReductionSettings()
    with pytest.raises(AttributeError):
        settings.reduction = "simignore"
