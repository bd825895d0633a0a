"""InternVL3 on a tiny random `InternVLForConditionalGeneration` (16 tokens per tile, 1..12 tiles plus a thumbnail):
each image the tokens of its tiles, budgets per image over all of them, and `internvl_simignore` answering as
lmms-eval's `internvl_hf` with `reduction=none`."""

import math

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_simignore import engine
from lmms_simignore.families import internvl
from lmms_simignore.models.internvl_simignore import InternVLSimignoreChat
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.testbed.tiny_internvl import build_tiny_internvl

pytest.importorskip("torchvision")  # transformers' InternVL processor needs it

SIZES = [[(150, 90)], [(120, 300), (80, 80)]]  # width x height: 7 tiles (6 + thumbnail), then 11 and 1
QUESTIONS = ["What colour is the circle?", "Which shape is on the left?"]
TASK, SPLIT = "sqa_fixture", "test"


@pytest.fixture(scope="module")
def internvl_models(tmp_path_factory):
    """(folder, model, eager model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_internvl(tmp_path_factory.mktemp("internvl"))
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    return folder, model, eager, AutoProcessor.from_pretrained(folder)


def noise(size, seed):
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def batch(processor, rows=(0, 1)):
    """The prompts `rows` with their images (one, then two), left-padded; image k always the same noise."""
    seeds = [[0], [1, 2]]
    images = [noise(size, seed) for row in rows for size, seed in zip(SIZES[row], seeds[row])]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(SIZES[row]) + [
        {"type": "text", "text": QUESTIONS[row]}]}], add_generation_prompt=True) for row in rows]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def generate_positions(inputs):
    return engine.default_position_ids(inputs["attention_mask"])


def test_each_image_is_its_tiles_tokens_at_its_context_tokens(internvl_models):
    _, model, _, processor = internvl_models
    inputs = batch(processor)
    prompt = internvl.embed_prompt(model, inputs)
    tiles = [processor.image_processor.get_number_of_image_patches(size[1], size[0], {"crop_to_patches": True})
             for row in SIZES for size in row]
    assert tiles == [7, 11, 1] and prompt.image_lengths.tolist() == [16 * count for count in tiles]
    assert prompt.image_rows.tolist() == [0, 1, 1] and prompt.image_tokens.tolist() == [16 * 7, 16 * 12]
    context = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert prompt.image_positions[0, :112].tolist() == context.tolist()


def test_the_loop_gives_the_model_s_own_logits_and_generation(internvl_models):
    _, model, _, processor = internvl_models
    inputs = batch(processor)
    reduced = engine.reduce_prompt(prompt := internvl.embed_prompt(model, inputs), engine.every_image_token(prompt), "drop")
    with torch.inference_mode():
        expected = model(**inputs, position_ids=generate_positions(inputs)).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    assert torch.allclose(engine.LanguageModelRun(model, reduced).prefill(), expected, atol=1e-5)
    for use_cache in (True, False):
        ours = engine.generate(model, reduced, engine.DecodingOptions(max_new_tokens=6), eos_token_ids=[-1],
                               pad_token_id=processor.tokenizer.pad_token_id, use_cache=use_cache)
        assert ours.tokens.tolist() == generated.tolist()


def test_masking_and_dropping_compute_the_same_logits(internvl_models):
    _, model, _, processor = internvl_models
    prompt = internvl.embed_prompt(model, batch(processor))
    kept = prompt.image_slots & (torch.arange(prompt.tokens_per_image) % 4 == 1)[None, :]
    masked, dropped = engine.reduce_prompt(prompt, kept, "mask"), engine.reduce_prompt(prompt, kept, "drop")
    assert torch.allclose(engine.LanguageModelRun(model, masked).prefill(), engine.LanguageModelRun(model, dropped).prefill(), atol=1e-5)
    assert dropped.visible_image_tokens.tolist() == [int(kept[0].sum()), int(kept[1:].sum())]


def test_fastv_keeps_half_of_each_image_by_the_eager_attention(internvl_models):
    _, model, eager, processor = internvl_models
    inputs = batch(processor)
    prompt = internvl.embed_prompt(model, inputs)
    plans = engine.image_plans(model.config, ReductionSettings(reduction="fastv", fastv_layer=1), prompt)
    run = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop"),
                                  stages=[plan.layers for plan in plans])
    run.prefill()
    with torch.inference_mode():
        received = eager(**inputs, position_ids=generate_positions(inputs), output_attentions=True).attentions[0][:, :, -1].mean(dim=1)
    for image in range(3):
        row, length = int(prompt.image_rows[image]), int(prompt.image_lengths[image])
        columns = prompt.image_positions[image, :length]
        kept = set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
        assert sorted(kept & set(columns.tolist())) == sorted(columns[received[row, columns].topk(math.floor(length / 2 + 0.5)).indices].tolist())


# -- the model class ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs():
    """ScienceQA-shaped docs whose images differ in size (1 to 13 tiles); the last has none."""
    from lmms_simignore.testbed.tiny import scienceqa_like_records

    records = scienceqa_like_records(num_docs=6, seed=5)
    for record, size in zip(records, [(150, 90), (120, 300), (80, 80), (300, 60), (200, 200)]):
        record["image"] = record["image"].resize(size)
    return records


def chat_requests(docs):
    kwargs = {"pre_prompt": "", "post_prompt": scienceqa_utils.POST_PROMPT}

    def doc_to_messages(doc):
        content = [{"type": "image", "url": image} for image in scienceqa_utils.doc_to_visual(doc)]
        return [{"role": "user", "content": content + [{"type": "text", "text": scienceqa_utils.doc_to_text(doc, kwargs)}]}]

    return [Instance("generate_until", ("", doc_to_messages, {"max_new_tokens": 6, "until": ["\n\n"]}, doc_id, TASK, SPLIT),
                     idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}) for doc_id in range(len(docs))]


def ours(folder, docs, **model_args):
    model = InternVLSimignoreChat(pretrained=str(folder), device="cpu", **model_args)
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def test_reduction_none_answers_as_lmms_eval_s_internvl_hf(internvl_models, docs):
    """lmms-eval's internvl_hf (bfloat16, batch 1, no stop strings) on the docs, the text-only one included."""
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    folder = internvl_models[0]
    builtin = InternVLHf(pretrained=str(folder), device="cpu", device_map="cpu")
    builtin.task_dict = {TASK: {SPLIT: docs}}
    expected = [getattr(answer, "text", answer) for answer in builtin.generate_until(chat_requests(docs))]
    assert ours(folder, docs).generate_until(chat_requests(docs)) == expected


@pytest.mark.parametrize("model_args", [dict(reduction="simignore", keep=0.4), dict(reduction="random", keep=0.3),
                                        dict(reduction="fastv", keep=0.5, fastv_layer=1), dict(reduction="pdrop", pdrop_layers="1/2"),
                                        dict(reduction="dart", keep=0.3, dart_layer=1), dict(reduction="random+fastv", keep=0.6, fastv_keep=0.25),
                                        dict(reduction="pool", keep=0.25), dict(reduction="random", keep=4, budget_per="tile"),
                                        dict(reduction="divprune", keep=0.3),
                                        dict(reduction="sparsevlm", sparsevlm_layers="0/1", sparsevlm_schedule="40/12")])
def test_a_batch_of_four_answers_as_each_prompt_alone(internvl_models, docs, model_args):
    folder = internvl_models[0]
    args = dict(dtype="float32", **model_args)
    batched = ours(folder, docs, batch_size=4, **args)
    answers = batched.generate_until(chat_requests(docs))
    assert answers == ours(folder, docs, batch_size=1, **args).generate_until(chat_requests(docs))
    assert answers == ours(folder, docs, batch_size=4, use_cache=False, **args).generate_until(chat_requests(docs))
    records = sorted(batched.accounting.records, key=lambda record: record["doc_id"])
    processor = batched.processor.image_processor
    assert [record["image_tokens"] for record in records] == [
        16 * processor.get_number_of_image_patches(doc["image"].height, doc["image"].width, {"crop_to_patches": True})
        for doc in docs[:-1]] + [0]


def test_masking_and_dropping_give_the_same_answers_through_the_class(internvl_models, docs):
    folder = internvl_models[0]
    masked = ours(folder, docs, dtype="float32", batch_size=3, reduction="simignore", keep=0.3, apply="mask")
    dropped = ours(folder, docs, dtype="float32", batch_size=3, reduction="simignore", keep=0.3, apply="drop")
    assert masked.generate_until(chat_requests(docs)) == dropped.generate_until(chat_requests(docs))


@pytest.mark.parametrize("model_args, message", [
    (dict(reduction="visionzip", keep=32), "visionzip shortens each image inside the vision tower, .* refused on internvl"),
    (dict(reduction="vispruner", keep=32), "vispruner shortens each image inside the vision tower, .* its authors' code has "
                                           "no InternVL version"),
    (dict(reduction="pool", keep=20), "pool keeps 1/s² .* of the 4 x 4 \\+ 4 x 4 .* grids: keep=208, 52"),
    (dict(reduction="random", keep=209), r"an image of 12 tiles and its thumbnail has 208 image tokens: keep=209 exceeds"),
    (dict(max_patches=0), "max_patches must be a positive integer"),
    (dict(min_patches=5, max_patches=4), "min_patches=5 exceeds max_patches=4"),
])
def test_what_it_cannot_take_is_refused_before_loading_weights(internvl_models, tmp_path, model_args, message):
    (tmp_path / "config.json").write_text((internvl_models[0] / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        InternVLSimignoreChat(pretrained=str(tmp_path), **model_args)


def test_reduction_none_through_lmms_eval_answers_as_internvl_hf(internvl_models, testbed, tmp_path):
    from test_lmms_eval_cli import evaluate

    checkpoint = {"model": internvl_models[0], "tasks": testbed["tasks"]}
    ours_run, our_samples = evaluate(checkpoint, tmp_path / "ours", "reduction=none", model="internvl_simignore",
                                     extra_args=("--limit", "4"))
    _, their_samples = evaluate(checkpoint, tmp_path / "builtin", "device=cpu,device_map=cpu", model="internvl_hf",
                                extra_args=("--limit", "4"))
    assert ours_run["config"]["model_backend"].startswith("lmms_simignore.models.internvl_simignore.InternVLSimignoreChat")
    assert [s["filtered_resps"] for s in our_samples] == [s["filtered_resps"] for s in their_samples]


def test_keeping_every_token_answers_as_no_reduction(internvl_models, docs):
    folder = internvl_models[0]
    none = ours(folder, docs, dtype="float32", batch_size=3).generate_until(chat_requests(docs))
    for model_args in (dict(reduction="random", keep=1.0), dict(reduction="fastv", fastv_layer=1, fastv_ratio=0.0)):
        assert ours(folder, docs, dtype="float32", batch_size=3, **model_args).generate_until(chat_requests(docs)) == none
    assert ours(folder, docs, dtype="float32", batch_size=3, reduction="random", keep=0.1).generate_until(chat_requests(docs)) != none


def test_two_processes_answer_every_doc_once_as_one_process_does(internvl_models, testbed, tmp_path):
    import sys

    from test_lmms_eval_cli import LAUNCHERS, TASK as LOCAL_TASK, evaluate

    checkpoint = {"model": internvl_models[0], "tasks": testbed["tasks"]}
    args = "reduction=dart,keep=0.3,dart_layer=1,dtype=float32"
    single, single_samples = evaluate(checkpoint, tmp_path / "one", args, model="internvl_simignore", batch_size=2)
    double, double_samples = evaluate(checkpoint, tmp_path / "two", args, model="internvl_simignore", batch_size=2,
                                      launcher=(sys.executable, *LAUNCHERS["torchrun"]))
    assert [s["doc_id"] for s in double_samples] == list(range(12))
    assert [s["filtered_resps"] for s in double_samples] == [s["filtered_resps"] for s in single_samples]
    assert double["results"][LOCAL_TASK]["exact_match,none"] == single["results"][LOCAL_TASK]["exact_match,none"]
