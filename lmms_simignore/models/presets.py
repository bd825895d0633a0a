"""Named sets of model_args that reproduce published runs. A preset is only arguments: the user's override it.

simignore_paper_7b / simignore_paper_13b follow what the published Simignore scripts did for LLaVA-1.5
7B / 13B (read from their code): the Simignore choice as an attention mask before the FastV layer,
FastV in place at layer 5 (13B: 4) keeping 144 image tokens, 4-bit nf4 weights, one output token.
simignore_paper_mipha is inferred, not read: Simignore's repository has no Mipha script (see the preset's comments).
fastv_paper is FastV's paper default (K=2, R=50%).
"""

from __future__ import annotations

from lmms_simignore.methods.registry import METHODS

PRESETS: dict[str, dict] = {
    "simignore_paper_7b": {
        "reduction": "simignore+fastv",
        "keep": 452,
        "apply": "mask",
        "text": "options",  # option texts without letters, joined by spaces ...
        "text_bos": True,  # ... plus the BOS embedding
        "simignore_start": 1,  # the walk over sorted pairs skips the best one
        "simignore_step": 1,
        "fastv_layer": 5,
        "fastv_keep": 144,
        "quantization": "nf4",
        "dtype": "float16",
        "max_new_tokens": 1,
    },
    "simignore_paper_13b": {
        "reduction": "simignore+fastv",
        "keep": 451,
        "apply": "mask",
        "text": "options_lettered",  # "Options: (A) ... (B) ..."
        "simignore_start": 0,
        "simignore_step": 2,  # the walk takes every other pair
        "fastv_layer": 4,
        "fastv_keep": 144,
        "quantization": "nf4",
        "dtype": "float16",
        "max_new_tokens": 1,
    },
    # Assumed for Mipha-3B (Table 1: 70.40 -> 70.85), since no script was published: the protocol of the published
    # LLaVA runs (nf4 weights, one output token), and the 7B script's Simignore stage scaled to Mipha's 729 image
    # tokens (ignore 124 of 576 = keep the same 78.5%: 572 of 729), as a mask, compared with the option texts. No
    # FastV stage: the LLaVA scripts carry one, but the paper does not describe it, so nothing says Mipha's run had it.
    "simignore_paper_mipha": {
        "reduction": "simignore",
        "keep": 572,
        "apply": "mask",
        "text": "options",
        "quantization": "nf4",
        "dtype": "float16",
        "max_new_tokens": 1,
    },
    "fastv_paper": {"reduction": "fastv", "fastv_layer": 2, "fastv_ratio": 0.5},
}

# Arguments that state the same budget: a user's value for one replaces the preset's value for all.
BUDGET_GROUPS = (("keep", "ignore"), *(method.own_budget for method in METHODS.values() if len(method.own_budget) > 1))


def resolve_model_args(preset: str | None, model_args: dict) -> dict:
    """The preset's arguments overridden by the user's `model_args`."""
    if preset is None:
        return dict(model_args)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    base = dict(PRESETS[preset])
    for group in BUDGET_GROUPS:
        if any(name in model_args for name in group):
            for name in group:
                base.pop(name, None)
    return {**base, **model_args}


def reduction_settings_of(model_args: dict):
    """The `ReductionSettings` a run's model_args build: its `preset` resolved, the arguments that are not reduction
    settings (pretrained, dtype, ...) left out."""
    from lmms_simignore.settings import REDUCTION_ARGUMENTS, ReductionSettings

    args = dict(model_args)
    args = resolve_model_args(args.pop("preset", None), args)
    return ReductionSettings(**{name: value for name, value in args.items() if name in REDUCTION_ARGUMENTS})
