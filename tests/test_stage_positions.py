"""Where the tokens an in-LLM stage leaves sit: at their original position ids (FastV's and DART's code) or repacked
to consecutive ones (PyramidDrop's and VisionDrop's code), on a tiny random LLaVA (3 layers, 25 image tokens)."""

import pytest
import torch
from test_engine import run
from test_fastv import padded_batch, row_alone, unreduced  # noqa: F401  (padded_batch is a fixture)

from lmms_simignore import engine
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.methods.pdrop import pdrop_stages
from lmms_simignore.methods.visiondrop import visiondrop_stages

TWO_STAGES = ((1, 12), (2, 5))  # 25 image tokens -> 12 from layer 1 -> 5 from layer 2


def positions_given(model, reduced, steps=2, **run_args):
    """The position ids each decoder layer was given: {layer: [prompt pass (B, S), then (B, 1) per fed token]}."""
    given = {}

    def remember(index):
        def hook(module, args, kwargs):
            given.setdefault(index, []).append(kwargs["position_ids"].clone())
        return hook

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(remember(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        language_model = engine.LanguageModelRun(model, reduced, **run_args)
        logits = language_model.prefill()
        for _ in range(steps):
            logits = language_model.feed(logits.argmax(-1)[:, None])[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return given


@pytest.mark.parametrize("stage_positions, dropped_before_layer", [
    ("original", [0, 0, 0]),
    ("repacked", [0, 25 - 12, 25 - 5]),
])
def test_the_last_prompt_token_and_the_generated_ones_move_up_by_what_the_stages_dropped(
        tiny_model, padded_batch, stage_positions, dropped_before_layer):
    inputs, _ = padded_batch
    lengths = inputs["attention_mask"].sum(dim=1).tolist()  # real prompt tokens per row
    given = positions_given(tiny_model, unreduced(tiny_model, inputs), stages=pdrop_stages(TWO_STAGES, stage_positions))
    for layer, dropped in enumerate(dropped_before_layer):
        prompt_pass, *fed = given[layer]
        for row, length in enumerate(lengths):
            last = length - 1 - dropped
            assert prompt_pass[row, -1].item() == last
            assert [step[row].item() for step in fed] == [last + 1, last + 2]


def test_repacked_tokens_sit_at_consecutive_positions_from_zero(tiny_model, padded_batch):
    inputs, _ = padded_batch
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    given = positions_given(tiny_model, unreduced(tiny_model, inputs), steps=0, stages=pdrop_stages(TWO_STAGES, "repacked"))
    for layer, kept in ((1, 12), (2, 5)):
        (prompt_pass,) = given[layer]
        for row, length in enumerate(lengths):
            real = length - (25 - kept)  # left padding: the real tokens are the row's last ones
            assert prompt_pass[row, -real:].tolist() == list(range(real))


def test_repacking_leaves_the_gaps_of_a_pre_llm_stage(tiny_model, processor, padded_batch):
    """Random keeps 15 of 25 before the LLM (their original positions, with gaps); a stage at layer 1 keeps 6 of them:
    from layer 1 on, positions close only the 9 the stage dropped."""
    inputs, texts = padded_batch
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    reduced = engine.apply_pre_llm_stage(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, ReductionSettings(reduction="random", keep=15)), prompt,
                                         texts, [0, 1])
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    given = positions_given(tiny_model, reduced, steps=1, stages=pdrop_stages(((1, 6),), "repacked"))
    for row, length in enumerate(lengths):
        assert given[0][0][row, -1].item() == length - 1  # the pre-LLM drop kept the original positions
        assert given[1][0][row, -1].item() == length - 1 - 9
        assert given[1][1][row].item() == length - 9


@pytest.mark.parametrize("stages", [
    pdrop_stages(TWO_STAGES, "repacked"),
    visiondrop_stages(((1, 12), (2, 6)), (3, 2), positions="repacked"),
], ids=["attention", "visiondrop"])
def test_repacked_cached_decoding_equals_recomputation_and_a_batch_answers_like_its_rows(
        tiny_model, processor, padded_batch, stages):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    cached = run(tiny_model, processor, reduced, stages=stages)
    assert cached.shape[1] > 1
    assert cached.tolist() == run(tiny_model, processor, reduced, use_cache=False, stages=stages).tolist()
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), stages=stages)
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_repacking_changes_what_the_layers_after_a_stage_compute(tiny_model, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    original = engine.LanguageModelRun(tiny_model, reduced, stages=pdrop_stages(TWO_STAGES)).prefill()
    repacked = engine.LanguageModelRun(tiny_model, reduced, stages=pdrop_stages(TWO_STAGES, "repacked")).prefill()
    assert not torch.allclose(original, repacked, atol=1e-4)


@pytest.mark.parametrize("reduction, expected", [
    ("fastv", "original"), ("dart", "original"), ("pdrop", "repacked"), ("simignore+pdrop", "repacked"), ("visiondrop", "repacked"),
])
def test_each_method_defaults_to_its_own_code(reduction, expected):
    budget = {"keep": 8} if reduction in ("dart", "simignore+pdrop", "visiondrop") else {}
    assert {stage.positions for stage in ReductionSettings(reduction=reduction, **budget).plan(64, 4).layers} == {expected}
    other = "original" if expected == "repacked" else "repacked"
    assert {stage.positions for stage in ReductionSettings(reduction=reduction, stage_positions=other, **budget).plan(64, 4).layers} == {other}


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="simignore", keep=8, stage_positions="repacked"), "stage_positions applies to a stage inside the language model"),
    (dict(reduction="pdrop", stage_positions="packed"), "stage_positions must be one of original, repacked; got 'packed'"),
])
def test_bad_stage_positions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)
