"""DART inside the language model: pivots by key norm, the image tokens least similar to them kept (tiny random LLaVA,
3 decoder layers, 25 image tokens)."""

import pytest
import torch
from test_engine import run
from test_fastv import padded_batch, row_alone, unreduced  # noqa: F401  (padded_batch is a fixture)
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.dart import dart_choice
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.methods.dart import dart_stage
from lmms_simignore.methods.fastv import fastv_stage

# six image tokens in 2-D; token 1 has the largest key norm (the image pivot), the text's first token the largest
# among the text (the text pivot)
IMAGE = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.1, 0.9]]])
IMAGE_NORMS = torch.tensor([[1.0, 5.0, 2.0, 3.0, 0.5, 0.4]])
TEXT = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
TEXT_NORMS = torch.tensor([[3.0, 1.0]])
ALL_VISIBLE = torch.ones(1, 6, dtype=torch.bool)


def choose(keep, visible=ALL_VISIBLE, text_mask=torch.ones(1, 2, dtype=torch.bool), pivots=2):
    return dart_choice(IMAGE, IMAGE_NORMS, visible, TEXT, TEXT_NORMS, text_mask, keep, pivots)[0].tolist()


def test_each_pivot_keeps_the_tokens_least_similar_to_it():
    # pivot token 1 keeps token 3 (opposite to it); the text pivot (0, 1) then keeps token 0 (orthogonal)
    assert choose(keep=3) == [0, 1, 3]
    assert choose(keep=1) == [1]  # the image pivot alone


def test_hidden_tokens_are_never_kept_and_text_pivots_need_text():
    hidden_3 = ALL_VISIBLE.clone()
    hidden_3[0, 3] = False
    assert choose(keep=3, visible=hidden_3) == [0, 1, 2]  # pivot 1's next least similar is token 2
    no_text = torch.zeros(1, 2, dtype=torch.bool)
    assert choose(keep=3, text_mask=no_text) == [1, 2, 3]  # the image pivot takes the whole rest


def test_a_budget_beyond_the_visible_tokens_is_refused():
    with pytest.raises(ValueError, match="dart keeps 7 image tokens per image but only 6 are visible"):
        choose(keep=7)


def dart_run(model, reduced, keep, layer=2, pivots=8):
    return engine.LanguageModelRun(model, reduced, stages=dart_stage(layer, keep, pivots))


def test_the_kept_set_follows_the_cached_keys_and_the_output_of_the_layer_before(testbed, padded_batch):
    """Independently of the engine's recomputation: the keys transformers cached for layer 1 (after the rotary
    embedding) and layer 1's output through the final norm, read with hooks, give the positions layer 2 is given."""
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    tiny_model = LlavaForConditionalGeneration.from_pretrained(testbed["model"]).eval()
    with torch.no_grad():  # a final norm whose weights are not all ones, so that it changes cosine similarities
        tiny_model.model.language_model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    reduced = unreduced(tiny_model, inputs)
    layers = tiny_model.model.language_model.layers
    captured = {}

    def keep_output(module, args, output):
        captured.setdefault("output", output)

    def keep_positions(module, args, kwargs):
        captured.setdefault("positions", kwargs["position_ids"])

    handles = [layers[1].register_forward_hook(keep_output),
               layers[2].register_forward_pre_hook(keep_positions, with_kwargs=True)]
    try:
        staged = dart_run(tiny_model, reduced, keep=10)
        staged.prefill()
    finally:
        for handle in handles:
            handle.remove()
    keys = staged.cache.layers[1].keys  # (B, Hkv, L, d), the full prompt: layer 1 is before the stage
    norms = keys.float().abs().sum(dim=(1, 3))  # (B, L)
    hidden = tiny_model.model.language_model.norm(captured["output"])  # (B, L, D)
    image_id = tiny_model.config.image_token_id
    for row in range(2):
        columns = (inputs["input_ids"][row] == image_id).nonzero().flatten()  # (25,)
        after = torch.arange(inputs["input_ids"].shape[1]) > columns[-1]
        chosen = dart_choice(hidden[row: row + 1, columns], norms[row: row + 1, columns], torch.ones(1, 25, dtype=torch.bool),
                             hidden[row: row + 1, after], norms[row: row + 1, after], torch.ones(1, int(after.sum()), dtype=torch.bool),
                             keep=10, pivots=8)[0]
        expected = reduced.position_ids[row, columns[chosen]].tolist()
        image_positions = set(reduced.position_ids[row, columns].tolist())
        given = [p for p in captured["positions"][row].tolist() if p in image_positions]
        assert given == expected


def test_keeping_every_image_token_is_no_reduction_and_fewer_change_the_answer(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    none = run(tiny_model, processor, reduced)
    assert run(tiny_model, processor, reduced, stages=dart_stage(2, 25)).tolist() == none.tolist()
    logits = engine.LanguageModelRun(tiny_model, reduced).prefill()
    assert not torch.allclose(dart_run(tiny_model, reduced, keep=3, layer=1).prefill(), logits, atol=1e-3)  # control


def test_dart_and_fastv_keep_different_tokens(tiny_model, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    dart, fastv = dart_run(tiny_model, reduced, keep=8), engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(2, 8))
    dart.prefill(), fastv.prefill()
    assert dart.kept_columns.tolist() != fastv.kept_columns.tolist()


def test_cached_decoding_equals_recomputation_and_a_batch_answers_like_its_rows(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    args = dict(stages=dart_stage(2, 6))
    cached = run(tiny_model, processor, reduced, **args)
    assert cached.tolist() == run(tiny_model, processor, reduced, use_cache=False, **args).tolist()
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), **args)
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_dart_through_the_model_class(testbed, docs):
    model = make_model(testbed, docs, reduction="dart", keep=10, batch_size=3)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, reduction="dart", keep=10, batch_size=1).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[25, 25, 10]] * 5 + [[0, 0, 0]]  # the last doc has no image


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="dart"), "dart needs exactly one of keep=N"),
    (dict(reduction="simignore+dart", keep=12), "dart needs exactly one of keep=N .* or dart_keep="),
    (dict(reduction="dart", keep=10, dart_pivots=0), "dart_pivots must be an integer >= 1"),
    (dict(reduction="fastv", dart_layer=2), "dart_layer belongs to dart, which is not in reduction=fastv"),
])
def test_bad_dart_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)


def test_a_dart_layer_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="dart_layer=3 is outside the language model's layers"):
        ReductionSettings(reduction="dart", keep=10, dart_layer=3).plan(25, 3)
