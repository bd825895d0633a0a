"""Baselines, ablations, stacking and presets through the `llava_simignore` lmms-eval class."""

import pytest
from lmms_eval.api.instance import Instance
from test_fastv import padded_batch  # noqa: F401  (a fixture)
from test_model import PROMPT_KWARGS, SPLIT, TASK, make_model, simple_requests

from lmms_simignore.models.llava_simignore import LlavaSimignore
from lmms_simignore.models.presets import PRESETS, resolve_model_args
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.testbed.tiny import scienceqa_like_records


@pytest.fixture(scope="module")
def docs():
    return scienceqa_like_records(num_docs=6, seed=2)  # the last doc has no image


def kept_positions(model, docs, doc_id=0):
    """Original positions of the image tokens the pre-LLM stage keeps for one doc."""
    request = model._prompt_request(simple_requests(docs)[doc_id].args)
    inputs = model._encode_batch([request])
    reduced, _ = model._reduce([request], inputs)
    return reduced.position_ids[0, reduced.image_columns[reduced.image_visible]].tolist()


def test_fastv_pruning_nothing_answers_like_no_reduction(testbed, docs):
    none = make_model(testbed, docs, batch_size=3).generate_until(simple_requests(docs))
    fastv = make_model(testbed, docs, reduction="fastv", fastv_ratio=0.0, batch_size=3)
    assert fastv.generate_until(simple_requests(docs)) == none
    records = sorted(fastv.accounting.records, key=lambda record: record["doc_id"])
    assert [r["visible_per_layer"] for r in records] == [[25, 25, 25]] * 5 + [[0, 0, 0]]  # the last doc has no image


def test_fastv_answers_do_not_depend_on_batch_size_or_cache(testbed, docs):
    args = dict(reduction="fastv", fastv_layer=1, keep=6)
    one = make_model(testbed, docs, **args, batch_size=1).generate_until(simple_requests(docs))
    four = make_model(testbed, docs, **args, batch_size=4).generate_until(simple_requests(docs))
    no_cache = make_model(testbed, docs, **args, batch_size=4, use_cache=False).generate_until(simple_requests(docs))
    assert one == four == no_cache


def test_stacked_pipeline_counts_tokens_per_layer(testbed, docs):
    model = make_model(testbed, docs, reduction="simignore+fastv", keep=12, apply="mask", fastv_layer=2, fastv_keep=4, batch_size=2)
    model.generate_until(simple_requests(docs))
    layers = sorted(model.accounting.records, key=lambda r: r["doc_id"])
    assert [r["visible_per_layer"] for r in layers] == [[12, 12, 4]] * 5 + [[0, 0, 0]]
    assert "layers 0-1: 12, layer 2: 4" in model.accounting.summary()


def test_random_choice_is_reproducible_and_follows_the_seed(testbed, docs):
    first = make_model(testbed, docs, reduction="random", keep=10, seed=0)
    again = make_model(testbed, docs, reduction="random", keep=10, seed=0, batch_size=3)
    other = make_model(testbed, docs, reduction="random", keep=10, seed=1)
    assert kept_positions(first, docs) == kept_positions(again, docs)
    assert len(kept_positions(first, docs)) == 10
    assert kept_positions(first, docs) != kept_positions(other, docs)
    assert kept_positions(first, docs, 0) != kept_positions(first, docs, 1)  # each doc draws its own
    assert first.generate_until(simple_requests(docs)) == again.generate_until(simple_requests(docs))


def test_simignore_orders_choose_different_parts_of_the_ranking(testbed, docs):
    chosen = {
        order: set(kept_positions(make_model(testbed, docs, reduction="simignore", keep=12, order=order), docs))
        for order in ("unimportant", "important", "middle")
    }
    assert all(len(kept) == 12 for kept in chosen.values())
    assert not chosen["unimportant"] & chosen["important"]  # 12 + 12 of 25 tokens: disjoint
    assert len(chosen["middle"] & chosen["unimportant"]) == 6 and len(chosen["middle"] & chosen["important"]) == 6
    randomly = set(kept_positions(make_model(testbed, docs, reduction="simignore", keep=12, order="random"), docs))
    assert randomly == set(kept_positions(make_model(testbed, docs, reduction="random", keep=12), docs))


def test_loglikelihood_with_fastv_pruning_nothing_equals_no_reduction(testbed, docs):
    context = scienceqa_utils.doc_to_text(docs[0], PROMPT_KWARGS)
    request = Instance(
        "loglikelihood", (context, " B", scienceqa_utils.doc_to_visual, 0, TASK, SPLIT), idx=0,
        metadata={"task": TASK, "doc_id": 0, "repeats": 1},
    )
    none = make_model(testbed, docs).loglikelihood([request])[0]
    fastv = make_model(testbed, docs, reduction="fastv", fastv_layer=1, fastv_ratio=0.0).loglikelihood([request])[0]
    pruned = make_model(testbed, docs, reduction="fastv", fastv_layer=1, keep=2).loglikelihood([request])[0]
    assert fastv[0] == pytest.approx(none[0], rel=1e-4) and fastv[1] == none[1]
    assert pruned[0] != pytest.approx(none[0], rel=1e-4)


# -- presets ---------------------------------------------------------------------------------------


def test_a_preset_is_its_arguments_with_the_users_on_top():
    args = resolve_model_args("simignore_paper_7b", {"pretrained": "x", "ignore": 124, "quantization": "none"})
    assert "keep" not in args and args["ignore"] == 124  # one budget replaces the other
    assert args["quantization"] == "none" and args["fastv_keep"] == 144 and args["text_bos"] is True
    assert resolve_model_args("fastv_paper", {"fastv_keep": 100})["fastv_keep"] == 100
    assert "fastv_ratio" not in resolve_model_args("fastv_paper", {"fastv_keep": 100})
    assert PRESETS["simignore_paper_13b"]["simignore_step"] == 2 and PRESETS["simignore_paper_13b"]["fastv_layer"] == 4


def test_paper_preset_runs_with_its_quirks_on_a_small_budget(testbed, docs):
    model = make_model(
        testbed, docs, preset="simignore_paper_7b", quantization="none", dtype="float32", keep=20, fastv_keep=5, fastv_layer=2
    )
    settings = model.settings
    simignore = settings.arguments_of("simignore")
    assert (settings.reduction, settings.apply, simignore.text_bos, simignore.simignore_start) == ("simignore+fastv", "mask", True, 1)
    assert model._decoding_options({"max_new_tokens": 8})[0].max_new_tokens == 1  # one output token, whatever the task asks
    answers = model.generate_until(simple_requests(docs, max_new_tokens=8, until=[]))
    longer = make_model(
        testbed, docs, preset="simignore_paper_7b", quantization="none", dtype="float32", keep=20, fastv_keep=5, fastv_layer=2,
        max_new_tokens=8,
    ).generate_until(simple_requests(docs, max_new_tokens=8, until=[]))
    assert all(full.startswith(short) and len(short) < len(full) for short, full in zip(answers, longer))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["visible_per_layer"] for r in records] == [[20, 20, 5]] * 5 + [[0, 0, 0]]  # the last doc has no image


def test_fastv_paper_preset_keeps_half_from_layer_two(testbed, docs):
    model = make_model(testbed, docs, preset="fastv_paper")
    assert model.requested_visible_per_layer == [25, 25, 13]  # R = 50% of 25, rounded half up
    model.generate_until(simple_requests(docs[:1]))
    assert model.accounting.records[0]["visible_per_layer"] == [25, 25, 13]
    assert model.accounting.records[0]["computed_per_layer"] == [25, 25, 13]


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"preset": "simignore_paper_7b", "keep": 20, "fastv_keep": 5, "fastv_layer": 2}, "quantization=nf4 loads 4-bit weights with bitsandbytes, which needs a CUDA GPU"),
        ({"preset": "simignore_paper_99b"}, "preset must be one of"),
        ({"reduction": "fastv", "fastv_layer": 3}, r"fastv_layer=3 is outside .* must be in \[1, 2\]"),
        ({"reduction": "simignore+fastv", "keep": 5, "fastv_keep": 6}, "fastv keeps 6 image tokens per image but only 5"),
        ({"reduction": "random", "keep": 5, "similarity": "euclidean"}, "similarity belongs to simignore, which is not in reduction=random"),
        ({"quantization": "int3"}, "quantization must be one of"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_combinations_fail_before_loading_weights(testbed, tmp_path, model_args, message):
    (tmp_path / "config.json").write_text((testbed["model"] / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        LlavaSimignore(pretrained=str(tmp_path), **model_args)


def test_published_7b_text_and_walk_choose_what_the_pure_functions_say(testbed, docs):
    """text_bos prepends BOS to the option text; simignore_start=1 walks the sorted pairs from the second."""
    from lmms_simignore import engine
    from lmms_simignore.methods import pairwise_similarity, select_top_k, walk_scores

    model = make_model(testbed, docs, reduction="simignore", keep=10, text_bos=True, simignore_start=1)
    request = model._prompt_request(simple_requests(docs)[0].args)
    inputs = model._encode_batch([request])
    prompt = engine.build_prompt_embeddings(model.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    ids = [model.tokenizer.bos_token_id] + model.tokenizer(" ".join(docs[0]["choices"]), add_special_tokens=False).input_ids
    text, mask = engine.embed_texts(model.model, [ids])
    expected = select_top_k(walk_scores(pairwise_similarity(prompt.image_features, text, mask), 1, 1), 10)
    expected_positions = prompt.position_ids[0, prompt.image_positions[0, expected[0]]].tolist()
    assert kept_positions(model, docs) == expected_positions
    plain = make_model(testbed, docs, reduction="simignore", keep=10)
    assert kept_positions(plain, docs) != expected_positions  # control: the quirks change the choice here


def test_paper_13b_preset_runs_with_lettered_options_and_step_two(testbed, docs):
    model = make_model(
        testbed, docs, preset="simignore_paper_13b", quantization="none", dtype="float32", keep=20, fastv_keep=5, fastv_layer=2
    )
    simignore = model.settings.arguments_of("simignore")
    assert (simignore.text, simignore.simignore_step, simignore.text_bos) == ("options_lettered", 2, False)
    assert model._prompt_request(simple_requests(docs)[0].args).comparison_text.startswith("Options: (A) ")
    assert len(model.generate_until(simple_requests(docs))) == len(docs)
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["visible_per_layer"] for r in records] == [[20, 20, 5]] * 5 + [[0, 0, 0]]  # the last doc has no image


def test_pdrop_through_the_lmms_eval_class_prunes_at_each_stage(testbed, docs):
    """PyramidDrop's default stages on the fixture's 3 layers: after layers 1 and 2, half of what is left."""
    one = make_model(testbed, docs, reduction="pdrop", batch_size=1)
    answers = one.generate_until(simple_requests(docs))
    records = sorted(one.accounting.records, key=lambda record: record["doc_id"])
    assert [r["visible_per_layer"] for r in records] == [[25, 13, 7]] * 5 + [[0, 0, 0]]
    assert make_model(testbed, docs, reduction="pdrop", batch_size=4).generate_until(simple_requests(docs)) == answers
    none = make_model(testbed, docs).generate_until(simple_requests(docs))
    assert make_model(testbed, docs, reduction="pdrop", pdrop_ratio=1.0).generate_until(simple_requests(docs)) == none


def test_simignore_then_pdrop_answers_alike_masked_or_dropped(testbed, docs):
    args = dict(reduction="simignore+pdrop", keep=12, pdrop_layers="1/2", batch_size=3)
    masked = make_model(testbed, docs, apply="mask", **args)
    dropped = make_model(testbed, docs, apply="drop", **args)
    assert masked.generate_until(simple_requests(docs)) == dropped.generate_until(simple_requests(docs))
    records = sorted(masked.accounting.records, key=lambda record: record["doc_id"])
    assert records[0]["visible_per_layer"] == [12, 6, 3] and records[0]["computed_per_layer"] == [25, 6, 3]


def test_keeping_no_image_token_is_the_prompt_without_its_image(tiny_model, processor, padded_batch):  # noqa: F811
    """`reduction=random,keep=0` (the suite's zero-image-token row): the LLM computes on the text alone, each text
    token at its own position (the image's positions left empty), as transformers' model fed the prompt without its
    image tokens."""
    import torch

    from lmms_simignore import engine
    from lmms_simignore.settings import ReductionSettings

    inputs, options = padded_batch
    plan = engine.plan_for(tiny_model.config, ReductionSettings(reduction="random", keep=0))
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, plan, inputs, options, [0, 1])
    ours = engine.LanguageModelRun(tiny_model, reduced).prefill()
    positions = engine.default_position_ids(inputs["attention_mask"])
    for row in range(2):
        text = (inputs["attention_mask"][row] == 1) & (inputs["input_ids"][row] != tiny_model.config.image_token_id)
        with torch.inference_mode():
            logits = tiny_model(input_ids=inputs["input_ids"][row : row + 1, text], position_ids=positions[row : row + 1, text]).logits
        torch.testing.assert_close(ours[row], logits[0, -1], atol=1e-5, rtol=1e-4)
    assert reduced.visible_image_tokens.tolist() == [0, 0] and reduced.image_columns.shape[1] == 0
