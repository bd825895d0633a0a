"""Checks every token-reduction method must pass on the tiny LLaVA, shared by the methods' test files: keeping every
token is no reduction, a batch answers as each row alone and cached decoding as recomputation, and the model class
batches as it answers alone while counting what each layer saw."""

from contextlib import contextmanager

import torch
from test_engine import last_logits, run
from test_fastv import row_alone
from test_model import make_model, simple_requests

from lmms_simignore import engine
from lmms_simignore.settings import ReductionSettings


def assert_keeping_every_token_is_no_reduction(model, processor, inputs, settings: ReductionSettings) -> None:
    """`settings` keep every image token: the same positions and last logits as no reduction."""
    def reduced(plan_settings):
        plan = engine.plan_for(model.config, plan_settings)
        return engine.prepare_reduced_prompt(model, processor.tokenizer, plan, inputs, [""] * len(inputs["input_ids"]), [])

    kept_all, none = reduced(settings), reduced(ReductionSettings())
    assert torch.equal(kept_all.position_ids, none.position_ids)
    assert torch.allclose(last_logits(model, kept_all), last_logits(model, none), atol=1e-5)


def assert_batch_answers_as_each_row_alone_and_cached_as_recomputed(model, processor, inputs, settings: ReductionSettings) -> None:
    plan = engine.plan_for(model.config, settings)
    rows = len(inputs["input_ids"])
    reduced = engine.prepare_reduced_prompt(model, processor.tokenizer, plan, inputs, [""] * rows, [])
    cached = run(model, processor, reduced)
    assert torch.equal(cached, run(model, processor, reduced, use_cache=False))
    for row in range(rows):
        alone = engine.prepare_reduced_prompt(model, processor.tokenizer, plan, row_alone(inputs, row), [""], [])
        assert run(model, processor, alone)[0].tolist() == cached[row].tolist()


def assert_the_class_batches_as_alone_and_counts_each_layer(testbed, docs, keep: int, **model_args) -> None:
    """Through the lmms-eval class, batch 3 answers as batch 1, and each of the first five docs' three layers saw `keep`
    image tokens (the sixth has no image)."""
    model = make_model(testbed, docs, keep=keep, batch_size=3, **model_args)
    answers = model.generate_until(simple_requests(docs))
    assert answers == make_model(testbed, docs, keep=keep, batch_size=1, **model_args).generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["computed_per_layer"] for r in records] == [[keep] * 3] * 5 + [[0, 0, 0]]


@contextmanager
def eager_attention_weights(layers):
    """{layer index: (B, H, L, L) its attention weights} of every forward of the eager decoder `layers` inside the block
    (each layer's last)."""
    weights = {}
    hooks = [layer.self_attn.register_forward_hook(lambda module, args, output, index=index: weights.__setitem__(index, output[1]))
             for index, layer in enumerate(layers)]
    try:
        yield weights
    finally:
        for hook in hooks:
            hook.remove()
