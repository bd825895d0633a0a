"""ReductionSettings: the user contract of model_args, validated before any compute."""

import pytest

from lmms_simignore.methods.base import IN_LLM, PRE_LLM
from lmms_simignore.settings import ReductionSettings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "fastvv"}, "unknown method 'fastvv' \\(did you mean `fastv`\\?\\)"),
        ({"reduction": "simignore", "keep": 4, "similarity": "dot"}, "similarity must be one of"),
        ({"reduction": "simignore", "keep": 4, "text": "question"}, "text must be one of"),
        ({"reduction": "simignore", "keep": 4, "apply": "prune"}, "apply must be one of"),
        ({"reduction": "simignore"}, "exactly one of keep"),
        ({"reduction": "simignore", "keep": 4, "ignore": 2}, "one of keep and ignore, not both"),
        ({"reduction": "simignore", "ignore": -3}, "ignore must be a non-negative integer"),
        ({"reduction": "simignore", "ignore": 2.5}, "ignore must be a non-negative integer"),
        ({"reduction": "simignore", "keep": -1.0}, "keep must be a non-negative"),
        ({"reduction": "simignore", "keep": 1.5}, "float above 1"),
        ({"reduction": "simignore", "keep": True}, "keep must be a non-negative"),
        ({"reduction": "none", "keep": 4}, "no effect with reduction=none"),
        ({"reduction": "fastv+simignore", "keep": 4}, "not in pipeline order .fastv acts inside the LLM; simignore acts before the LLM"),
        ({"reduction": "simignore+random", "keep": 4}, "2 stages before the LLM .simignore, random.; a pipeline has at most one"),
        ({"reduction": "random", "keep": 4, "order": "important"}, "order belongs to simignore, which is not in reduction=random"),
        ({"reduction": "random", "keep": 4, "text": "prompt"}, "text belongs to simignore, which is not in reduction=random"),
        ({"reduction": "simignore", "keep": 4, "order": "sideways"}, "order must be one of"),
        ({"reduction": "simignore", "keep": 4, "simignore_step": 0}, "simignore_step must be an integer >= 1"),
        ({"reduction": "simignore", "keep": 4, "fastv_keep": 3}, "fastv_keep belongs to fastv, which is not in reduction=simignore"),
        ({"reduction": "fastv", "apply": "mask"}, "apply=mask applies to a stage before the LLM"),
        ({"reduction": "fastv", "keep": 100, "fastv_ratio": 0.5}, "no stage of reduction=fastv takes them .fastv by fastv_keep, fastv_ratio"),
        ({"reduction": "fastv", "keep": 100, "ignore": 10}, "one of keep and ignore"),
        ({"reduction": "simignore+fastv", "keep": 400, "fastv_keep": 100, "fastv_ratio": 0.5}, "one of fastv_keep and fastv_ratio"),
        ({"reduction": "fastv", "fastv_ratio": 1.5}, "fastv_ratio must be a fraction"),
        ({"reduction": "fastv", "fastv_layer": 0}, "fastv_layer must be an integer >= 1"),
        ({"reduction": "simignore+fastv", "fastv_keep": 100}, "needs exactly one of keep"),
        ({"reduction": "simignore", "kep": 4}, "unknown model_arg 'kep' for reduction settings: did you mean `keep`"),
        ({"reduction": "pdrop", "pdrop_ratioo": 0.5}, "did you mean `pdrop_ratio`"),
        ({"reduction": "simignore+simignore", "keep": 4}, "names a method twice"),
        ({"reduction": "visionzip+visiondrop", "keep": 4}, "2 stages in the vision tower"),
        ({"reduction": "visionzip+simignore", "keep": 16}, "simignore needs exactly one of keep"),  # keep is visionzip's
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
    assert ReductionSettings(**kwargs).plan(576, 4).kept_per_image == kept


def test_fraction_rounds_half_up():
    assert ReductionSettings(reduction="simignore", keep=0.5).plan(25, 4).kept_per_image == 13


@pytest.mark.parametrize("kwargs", [{"keep": 577}, {"ignore": 600}])
def test_budget_above_the_model_image_token_count_names_that_count(kwargs):
    settings = ReductionSettings(reduction="simignore", **kwargs)
    with pytest.raises(ValueError, match="576 image tokens per image"):
        settings.plan(576, 4)


def test_settings_are_frozen():
    settings = ReductionSettings()
    with pytest.raises(AttributeError):
        settings.reduction = "simignore"


@pytest.mark.parametrize(
    "kwargs, per_layer",
    [
        ({}, [576] * 4),
        ({"reduction": "simignore", "ignore": 124}, [452] * 4),
        ({"reduction": "fastv"}, [576, 576, 288, 288]),  # K=2, R=50% by default
        ({"reduction": "fastv", "fastv_layer": 1, "keep": 144}, [576, 144, 144, 144]),
        ({"reduction": "fastv", "fastv_layer": 3, "ignore": 476}, [576, 576, 576, 100]),
        ({"reduction": "fastv", "fastv_ratio": 0.75}, [576, 576, 144, 144]),
        ({"reduction": "simignore+fastv", "ignore": 124, "fastv_layer": 1, "fastv_keep": 144}, [452, 144, 144, 144]),
        ({"reduction": "random+fastv", "keep": 0.5, "fastv_keep": 0.25}, [288, 288, 144, 144]),
    ],
)
def test_image_tokens_visible_at_every_layer(kwargs, per_layer):
    assert ReductionSettings(**kwargs).visible_per_layer(576, 4) == per_layer


def test_the_pipeline_is_spelled_with_plus():
    settings = ReductionSettings(reduction="simignore+fastv", keep=452, fastv_keep=144)
    assert settings.stages == ("simignore", "fastv")
    assert settings.methods_at(PRE_LLM) == ("simignore",) and settings.methods_at(IN_LLM) == ("fastv",)
    assert ReductionSettings(reduction="fastv").methods_at(PRE_LLM) == ()


def test_keep_goes_to_the_first_stage_whose_own_budget_is_not_given():
    assert ReductionSettings(reduction="fastv", keep=100).plan(576, 4).layers[0].keep == 100
    zipped = ReductionSettings(reduction="visionzip+simignore", dominant=54, contextual=10, keep=32).plan(576, 4)
    assert (zipped.vision.tokens, zipped.pre_llm.keep) == (64, 32)  # keep is simignore's once visionzip has its own


def test_several_in_llm_stages_compose_in_layer_order():
    plan = ReductionSettings(reduction="fastv+pdrop", fastv_keep=288, pdrop_layers="3/4").plan(576, 6)
    assert [(stage.method, stage.layer, stage.keep) for stage in plan.layers] == [("fastv", 2, 288), ("pdrop", 3, 144), ("pdrop", 4, 72)]
    assert plan.visible_per_layer() == [576, 576, 288, 144, 72, 72]
    with pytest.raises(ValueError, match=r"pdrop_layers=1/2 is outside .* after layer 2, where the stage before it acts"):
        ReductionSettings(reduction="fastv+pdrop", pdrop_layers="1/2").plan(576, 6)


def test_fastv_cannot_keep_more_than_the_earlier_stage_left():
    settings = ReductionSettings(reduction="simignore+fastv", keep=100, fastv_keep=144)
    with pytest.raises(ValueError, match="fastv keeps 144 image tokens per image but only 100"):
        settings.plan(576, 32)


@pytest.mark.parametrize("layer", [32, 40])
def test_fastv_layer_must_leave_layers_on_both_sides(layer):
    settings = ReductionSettings(reduction="fastv", fastv_layer=layer)
    with pytest.raises(ValueError, match=r"fastv_layer=\d+ is outside the language model's layers: it has 32 decoder layers, so each stage must be in \[1, 31\]"):
        settings.visible_per_layer(576, 32)


@pytest.mark.parametrize(
    "kwargs, image_tokens, layers, stages",
    [
        ({"reduction": "pdrop"}, 576, 32, ((8, 288), (16, 144), (24, 72))),  # PyramidDrop's defaults on LLaVA-1.5
        ({"reduction": "pdrop", "pdrop_layers": "1/2"}, 16, 4, ((1, 8), (2, 4))),  # 16 tokens, lambda 0.5: 8, then 4
        ({"reduction": "pdrop"}, 64, 4, ((1, 32), (2, 16), (3, 8))),  # the testbed's 4 layers: a stage after each
        ({"reduction": "pdrop"}, 25, 3, ((1, 13), (2, 7))),  # 3 layers: 0.75 and 2.25 round to 1 and 2; 12.5 -> 13
        ({"reduction": "pdrop", "pdrop_layers": 16, "pdrop_ratio": 0.25}, 576, 32, ((16, 144),)),
        ({"reduction": "simignore+pdrop", "keep": 12, "pdrop_layers": "1/2"}, 25, 3, ((1, 6), (2, 3))),
        # fractions of the depth: layers 2/8/16 of 32 on 32 layers, and on the paper-shaped fixture's 6 (0.375 -> 1)
        ({"reduction": "pdrop", "pdrop_layers": "0.0625/0.25/0.5"}, 576, 32, ((2, 288), (8, 144), (16, 72))),
        ({"reduction": "pdrop", "pdrop_layers": "0.0625/0.25/0.5"}, 576, 6, ((1, 288), (2, 144), (3, 72))),
        ({"reduction": "pdrop", "pdrop_layers": 0.5}, 64, 4, ((2, 32),)),
        ({"reduction": "fastv", "fastv_layer": 2, "fastv_keep": 7}, 25, 3, ((2, 7),)),
        ({"reduction": "simignore", "keep": 7}, 25, 3, ()),
    ],
)
def test_in_llm_stages_and_what_each_layer_sees(kwargs, image_tokens, layers, stages):
    settings = ReductionSettings(**kwargs)
    assert tuple((stage.layer, stage.keep) for stage in settings.plan(image_tokens, layers).layers) == stages
    visible = settings.visible_per_layer(image_tokens, layers)
    for layer, keep in stages:
        assert visible[layer - 1] > keep == visible[layer]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "pdrop", "pdrop_layers": "16/8"}, "pdrop_layers must be increasing decoder layers >= 1"),
        ({"reduction": "pdrop", "pdrop_layers": "8/x"}, "pdrop_layers must be increasing decoder layers >= 1"),
        ({"reduction": "pdrop", "pdrop_layers": "0/8"}, "pdrop_layers must be increasing decoder layers >= 1"),
        ({"reduction": "pdrop", "pdrop_layers": "0.25/8"}, "or increasing fractions of the depth, e.g. 0.25/0.5/0.75; got '0.25/8'"),
        ({"reduction": "pdrop", "pdrop_layers": "0.5/1.5"}, "or increasing fractions of the depth"),
        ({"reduction": "pdrop", "pdrop_ratio": 0}, r"pdrop_ratio must be a fraction in \(0, 1\]"),
        ({"reduction": "pdrop", "pdrop_ratio": 1.5}, r"pdrop_ratio must be a fraction in \(0, 1\]"),
        ({"reduction": "fastv", "pdrop_ratio": 0.5}, "pdrop_ratio belongs to pdrop, which is not in reduction=fastv"),
        ({"reduction": "pdrop", "keep": 8}, "no stage of reduction=pdrop takes them .pdrop by pdrop_ratio"),
        ({"reduction": "pdrop", "apply": "mask"}, "apply=mask applies to a stage before the LLM"),
        
    ],
)
def test_bad_pdrop_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_fractions_of_the_depth_that_land_on_one_layer_are_refused():
    settings = ReductionSettings(reduction="visiondrop", keep=16, visiondrop_layers="0.3/0.35/0.75")
    assert [stage.layer for stage in settings.plan(576, 32).layers] == [10, 11, 24]
    with pytest.raises(ValueError, match="visiondrop_layers=0.3/0.35/0.75 gives layers 1/1/3 on this 4-layer language model"):
        settings.plan(64, 4)


def test_pdrop_layers_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="pdrop_layers=8/16/24 is outside the language model's layers: it has 16"):
        ReductionSettings(reduction="pdrop", pdrop_layers="8/16/24").visible_per_layer(576, 16)
    with pytest.raises(ValueError, match=r"pdrop_layers=\(none\) is outside the language model's layers: it has 1"):
        ReductionSettings(reduction="pdrop").visible_per_layer(576, 1)
