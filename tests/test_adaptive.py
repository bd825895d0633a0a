"""keep=auto: Simignore's adaptive budget, each image keeping the tokens within a margin of its best similarity."""

import pytest
import torch
from test_fastv import padded_batch  # noqa: F401  (padded_batch is a fixture)
from test_model import make_model, simple_requests
from test_model_reductions import docs  # noqa: F401  (a fixture)

from lmms_simignore import engine
from lmms_simignore.methods.selection import within_margin_of_best
from lmms_simignore.settings import ReductionSettings


def test_each_image_keeps_the_tokens_within_the_margin_of_its_best():
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.75], [0.1, 0.4, 0.35, 0.2]])
    assert within_margin_of_best(scores, 0.15).tolist() == [[True, True, False, True], [False, True, True, False]]
    assert within_margin_of_best(scores, 0.0).sum(dim=1).tolist() == [1, 1]  # the best is always kept
    with pytest.raises(ValueError, match="margin must be >= 0"):
        within_margin_of_best(scores, -0.1)


def test_images_keeping_different_numbers_drop_like_they_mask(tiny_model, padded_batch):
    """4 tokens of the first image, 7 of the second: dropping (padded, with the extra slots invisible) computes the
    masked prompt's logits and counts each image's own tokens."""
    inputs, _ = padded_batch
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    flags = torch.zeros(2, 25, dtype=torch.bool)
    flags[0, [1, 5, 6, 20]] = True
    flags[1, [0, 2, 3, 9, 10, 11, 24]] = True
    masked, dropped = engine.reduce_prompt(prompt, flags, "mask"), engine.reduce_prompt(prompt, flags, "drop")
    assert dropped.visible_image_tokens.tolist() == [4, 7] and dropped.image_visible.sum(dim=1).tolist() == [4, 7]
    torch.testing.assert_close(engine.LanguageModelRun(tiny_model, dropped).prefill(),
                               engine.LanguageModelRun(tiny_model, masked).prefill(), atol=1e-5, rtol=1e-4)
    run = engine.LanguageModelRun(tiny_model, dropped)
    run.prefill()
    assert run.image_tokens_seen.visible.tolist() == [[4, 4, 4], [7, 7, 7]]


def test_keep_auto_through_the_model_class(testbed, docs):
    """Each doc keeps the tokens within the margin of its best cosine similarity to the options' embeddings (counted
    here from the embeddings directly); drop answers like mask; a batch answers like its docs one by one."""
    model = make_model(testbed, docs, reduction="simignore", keep="auto", auto_margin=0.05, batch_size=3)
    answers = model.generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    embed = model.model.get_input_embeddings()
    expected = []
    for doc, instance in zip(docs[:-1], simple_requests(docs)):  # the last doc has no image
        request = model._prompt_request(instance.args)
        inputs = model.processor(images=request.images, text=[request.prompt], return_tensors="pt")
        prompt = engine.build_prompt_embeddings(model.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        text = embed(torch.tensor(model.tokenizer(" ".join(doc["choices"]), add_special_tokens=False).input_ids))
        similarity = torch.nn.functional.normalize(prompt.image_features[0], dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
        best = similarity.amax(dim=-1)
        expected.append(int((best >= best.max() - 0.05).sum()))
    assert [record["visible_per_layer"][0] for record in records[:-1]] == expected
    assert len(set(expected)) > 1  # the docs really keep different numbers
    masked = make_model(testbed, docs, reduction="simignore", keep="auto", auto_margin=0.05, apply="mask")
    assert masked.generate_until(simple_requests(docs)) == answers
    alone = make_model(testbed, docs, reduction="simignore", keep="auto", auto_margin=0.05, batch_size=1)
    assert alone.generate_until(simple_requests(docs)) == answers


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="random", keep="auto"), "keep=auto is an adaptive budget .each image its own number., which only "
                                            "simignore and prumerge_plus take, not random"),
    (dict(reduction="simignore+fastv", keep="auto"), "reduction=simignore alone"),
    (dict(reduction="simignore", keep="auto", order="middle"), "takes neither order= nor the published walk"),
    (dict(reduction="simignore", keep="auto", auto_margin=-0.1), "auto_margin must be a non-negative number"),
    (dict(reduction="simignore", keep=16, auto_margin=0.1), "auto_margin applies to keep=auto only"),
    (dict(reduction="simignore", keep="most"), "keep must be a non-negative integer count or a fraction"),
])
def test_bad_adaptive_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReductionSettings(**kwargs)
