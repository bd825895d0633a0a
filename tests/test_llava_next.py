"""LLaVA-NeXT's and LLaVA-OneVision's tiled images on tiny random models of transformers' own classes (4 x 4 tokens per
tile; NeXT up to 2 x 2 tiles, OneVision up to 6 x 6 shrunk to about 9 tiles' worth): every image token placed as the
model places it, the newline separators never chosen, dropped or counted, and budgets per image over all its tiles."""

import math

import pytest
import torch
from PIL import Image

from lmms_simignore import engine
from lmms_simignore.families import llava_next
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny_llava_next import build_tiny_llava_next, build_tiny_llava_onevision

pytest.importorskip("torchvision")  # transformers' OneVision processor needs it
BUILDERS = {"llava_next": build_tiny_llava_next, "llava_onevision": build_tiny_llava_onevision}

QUESTIONS = ["What colour is the circle?", "Is there a red square in the picture on the left?"]
SIZES = [[(60, 40)], [(30, 90), (48, 48)]]  # width x height: a wide image, then a tall and a square one


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiled_models(request, tmp_path_factory):
    """(model, eager model, processor) of one tiled family."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    return model, eager, processor


@pytest.fixture(scope="module")
def next_models(tmp_path_factory):
    """(model, eager model, processor) of the tiny LLaVA-NeXT."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = build_tiny_llava_next(tmp_path_factory.mktemp("llava_next"))
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return model, eager, processor


def noise(size, seed):
    """A deterministic RGB noise image of `size` (width, height)."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def batch(processor, rows=(0, 1)):
    """The prompts `rows` of QUESTIONS with their images of SIZES (one, then two), left-padded; image k of the whole
    batch is always the same noise, so a prompt alone sees what it sees in the batch."""
    seeds = [[0], [1, 2]]
    images = [noise(size, seed) for row in rows for size, seed in zip(SIZES[row], seeds[row])]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(SIZES[row]) + [
        {"type": "text", "text": QUESTIONS[row]}]}], add_generation_prompt=True) for row in rows]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def generate_positions(inputs):
    """Positions counted from each row's first real token, as transformers' generate counts them (its forward alone
    counts from the padded start: the same relative positions, but rounding that grows with the padding)."""
    return engine.default_position_ids(inputs["attention_mask"])


def unreduced(model, inputs):
    prompt = llava_next.embed_prompt(model, inputs)
    return prompt, engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")


def newline_columns(model, inputs, row):
    """Columns of `row` holding the image_newline embedding, found from the model's own forward embeddings."""
    with torch.inference_mode():
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).masked_scatter(
        (inputs["input_ids"] == model.config.image_token_id)[..., None], features)
    return (embeds[row] == model.model.image_newline).all(dim=-1).nonzero().flatten().tolist()


def expected_image_tokens(processor, image) -> int:
    """Image tokens of one image as transformers' processor counts them: its placeholders in a prompt of that image
    alone, less the newline after each row of its (unpadded, and on OneVision shrunk) grid."""
    from transformers.image_processing_utils import select_best_resolution

    placeholders = int((processor(images=[image], text=["<image>"], return_tensors="pt")["input_ids"] == processor.image_token_id).sum())
    image_processor = processor.image_processor
    tile = (image_processor.crop_size if getattr(image_processor, "crop_size", None) else image_processor.size)["height"]
    patches = tile // processor.patch_size if getattr(processor, "patch_size", None) else int(processor.num_image_tokens ** 0.5)
    height, width = select_best_resolution([image.height, image.width], image_processor.image_grid_pinpoints)
    _, newlines = processor._get_unpadded_features(image.height, image.width, patches, patches, height // tile, width // tile)
    return placeholders - newlines


def test_each_image_is_its_base_view_and_unpadded_grid_without_the_newlines(next_models):
    """A 60 x 40 image: 16 base tokens, then 6 rows of 8 (the 2 x 2 tiles' 8 x 8 grid unpadded to the image's 3:2),
    each row followed by a newline: 64 image tokens of 70 placeholders."""
    model, _, processor = next_models
    inputs = batch(processor)
    prompt = llava_next.embed_prompt(model, inputs)
    assert prompt.image_lengths.tolist() == [16 + 6 * 8, 16 + 12 * 4, 16 + 8 * 8] and prompt.image_rows.tolist() == [0, 1, 1]
    assert prompt.image_tokens.tolist() == [64, 64 + 80]  # image tokens only: newlines are not counted
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    newlines = newline_columns(model, inputs, 0)
    assert newlines == placeholders[16 + 8 :: 9].tolist()  # after each row of 8
    assert sorted(set(placeholders.tolist()) - set(newlines)) == prompt.image_positions[0, :64].tolist()


def test_an_image_s_tokens_are_its_placeholders_but_its_newlines(tiled_models):
    """The first prompt's one image: as many image tokens as transformers' processor counts placeholders less newlines,
    at the placeholders where the model did not put its image_newline."""
    model, _, processor = tiled_models
    inputs = batch(processor)
    prompt = llava_next.embed_prompt(model, inputs)
    length = int(prompt.image_lengths[0])
    assert length == expected_image_tokens(processor, noise(SIZES[0][0], 0))
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    assert sorted(set(placeholders) - set(newline_columns(model, inputs, 0))) == prompt.image_positions[0, :length].tolist()
    assert int(prompt.image_tokens[0]) == length


def test_the_loop_gives_the_model_s_own_logits_and_generation(tiled_models):
    model, _, processor = tiled_models
    inputs = batch(processor)
    _, reduced = unreduced(model, inputs)
    with torch.inference_mode():
        expected = model(**inputs, position_ids=generate_positions(inputs)).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    assert torch.allclose(engine.LanguageModelRun(model, reduced).prefill(), expected, atol=1e-5)
    for use_cache in (True, False):
        ours = engine.generate(model, reduced, engine.DecodingOptions(max_new_tokens=6), eos_token_ids=[-1],
                               pad_token_id=processor.tokenizer.pad_token_id, use_cache=use_cache)
        assert ours.tokens.tolist() == generated.tolist()


def test_masking_and_dropping_image_tokens_compute_the_same_logits_and_keep_every_newline(tiled_models):
    model, _, processor = tiled_models
    inputs = batch(processor)
    prompt, reduced = unreduced(model, inputs)
    kept = prompt.image_slots & (torch.arange(prompt.tokens_per_image) % 3 == 0)[None, :]
    masked, dropped = engine.reduce_prompt(prompt, kept, "mask"), engine.reduce_prompt(prompt, kept, "drop")
    assert torch.allclose(engine.LanguageModelRun(model, masked).prefill(), engine.LanguageModelRun(model, dropped).prefill(), atol=1e-5)
    newline = model.model.image_newline
    for row in range(2):
        present = dropped.inputs_embeds[row][dropped.attention_mask[row].bool()]
        assert int((present == newline).all(dim=-1).sum()) == len(newline_columns(model, inputs, row))
    assert dropped.visible_image_tokens.tolist() == [int(kept[0].sum()), int(kept[1:].sum())]


def test_fastv_keeps_half_of_each_image_by_the_eager_attention_and_never_a_newline(tiled_models):
    """Independently of the engine: layer 0's eager weights of each row's last token (mean over heads) ranked over
    the image's tokens (its placeholders that are not newlines); the newlines are still there after the stage."""
    model, eager, processor = tiled_models
    inputs = batch(processor)
    prompt, reduced = unreduced(model, inputs)
    plans = engine.image_plans(model.config, ReductionSettings(reduction="fastv", fastv_layer=1), prompt)
    run = engine.LanguageModelRun(model, reduced, stages=[plan.layers for plan in plans])
    run.prefill()
    with torch.inference_mode():
        received = eager(**inputs, position_ids=generate_positions(inputs), output_attentions=True).attentions[0][:, :, -1].mean(dim=1)  # (B, L)
    for image in range(3):
        row, length = int(prompt.image_rows[image]), int(prompt.image_lengths[image])
        columns = prompt.image_positions[image, :length]
        kept = set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
        assert sorted(kept & set(columns.tolist())) == sorted(columns[received[row, columns].topk(math.floor(length / 2 + 0.5)).indices].tolist())
    for row in range(2):
        assert set(newline_columns(model, inputs, row)) <= set(run.kept_columns[row][run.mask_high[row].bool()].tolist())
    halves = [math.floor(int(length) / 2 + 0.5) for length in prompt.image_lengths]
    assert run.image_tokens_seen.visible[:, 1].tolist() == [halves[0], halves[1] + halves[2]]


@pytest.mark.parametrize("settings", [dict(reduction="random", keep=0.3), dict(reduction="simignore", keep=0.4),
                                      dict(reduction="fastv", keep=0.5, fastv_layer=1), dict(reduction="pdrop", pdrop_layers="1/2"),
                                      dict(reduction="dart", keep=0.5, dart_layer=1),
                                      dict(reduction="random+fastv", keep=0.6, fastv_keep=0.25)])
def test_each_prompt_of_a_batch_answers_as_it_does_alone(tiled_models, settings):
    model, _, processor = tiled_models
    settings = ReductionSettings(**settings)
    inputs = batch(processor)

    def logits(inputs, seeds):
        prompt = llava_next.embed_prompt(model, inputs)
        plans = engine.image_plans(model.config, settings, prompt)
        reduced = engine.apply_image_plans_before_llm(model, processor.tokenizer, plans, prompt, ["red circle"] * len(seeds[0]), seeds[1])
        return engine.LanguageModelRun(model, reduced, stages=[plan.layers for plan in plans]).prefill()

    together = logits(inputs, ([0, 1], [0, 1, 2]))
    for row, images in ((0, [0]), (1, [1, 2])):  # the same seed per image as in the batch
        assert torch.allclose(together[row], logits(batch(processor, rows=(row,)), ([row], images))[0], atol=1e-5)


def test_the_largest_image_of_the_released_shapes_is_what_their_processors_count_at_the_most():
    """LLaVA-1.6-7B: 576 + 48 x 48 = 2880 (672 x 672); OneVision-7B: the most over its pinpoints of the base 729 and each
    pinpoint's grid of 27 tokens per 384 px tile, shrunk to 9 tiles' worth: 8019 at 1920 x 768 (5 x 2 tiles)."""
    from lmms_simignore.bench import tiled_shapes

    for name in tiled_shapes.SHAPES:
        tokenizer = tiled_shapes.shape_tokenizer(name)
        config, processor = tiled_shapes.shape_config(name, tokenizer), tiled_shapes.shape_processor(name, tokenizer)
        most = max(expected_image_tokens(processor, Image.new("RGB", (width, height)))
                   for height, width in processor.image_processor.image_grid_pinpoints)
        assert llava_next.largest_image_tokens(config) == most == {"llava_next": 2880, "llava_onevision": 8019}[config.model_type]


@pytest.mark.parametrize("settings, message", [
    (dict(reduction="random", keep=81), "the largest image of this llava_next checkpoint has 80 image tokens: keep=81 exceeds"),
    (dict(reduction="pool", keep=10), "pool keeps 1/s² .* of the 4 x 4 \\+ 8 x 8 grids: keep=80, 20"),
])
def test_a_budget_the_largest_image_cannot_take_is_refused_before_any_batch(next_models, settings, message):
    model, _, _ = next_models
    with pytest.raises(ValueError, match=message):
        llava_next.nominal_plan(model.config, ReductionSettings(**settings))


def test_visionzip_is_refused_on_onevision_s_siglip_which_has_no_cls_token(tiled_models):
    model = tiled_models[0]
    if model.config.model_type == "llava_next":
        assert llava_next.nominal_plan(model.config, ReductionSettings(reduction="visionzip", keep=40)).vision.tokens == 40
    else:
        with pytest.raises(ValueError, match="visionzip ranks patches by the CLS token's attention; the vision tower "
                                             "'siglip_vision_model' has no CLS token"):
            llava_next.nominal_plan(model.config, ReductionSettings(reduction="visionzip", keep=40))


# -- through the lmms-eval class: llava_simignore hosts LLaVA-NeXT as lmms-eval's llava_hf does ---------------------------
@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiled_folder(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(f"{request.param}_class"))


@pytest.fixture(scope="module")
def next_docs():
    """ScienceQA-shaped docs whose images differ in size (1 to 4 tiles of the tiny model); the last has none."""
    from lmms_simignore.testbed.tiny import scienceqa_like_records

    records = scienceqa_like_records(num_docs=6, seed=4)
    for record, size in zip(records, [(60, 40), (30, 90), (48, 48), (20, 20), (100, 30)]):
        record["image"] = record["image"].resize(size)
    return records


def class_model(folder, docs, **model_args):
    from test_model import TASK, SPLIT

    from lmms_simignore.models.llava_simignore import LlavaSimignore

    model = LlavaSimignore(pretrained=str(folder), **model_args)
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def test_reduction_none_answers_as_lmms_eval_s_llava_hf(tiled_folder, next_docs):
    """lmms-eval's llava_hf (batch 1 only) on the docs with an image; it ignores the task's stop string, which has no
    effect on these short answers (checked: the answers hold no blank line)."""
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from test_model import SPLIT, TASK, simple_requests

    docs = next_docs[:-1]
    builtin = LlavaHf(pretrained=str(tiled_folder), device="cpu", device_map="cpu")
    builtin.task_dict = {TASK: {SPLIT: docs}}
    expected = builtin.generate_until(simple_requests(docs))
    assert not any("\n\n" in answer for answer in expected)
    assert class_model(tiled_folder, docs).generate_until(simple_requests(docs)) == expected


def batch_of_four_answers_as_each_prompt_alone(folder, docs, model_args) -> None:
    """Through the class: a batch of 4 answers as batch 1 and as recomputation without the cache; each doc's image
    tokens are what the processor counts (placeholders less newlines)."""
    from test_model import simple_requests

    batched = class_model(folder, docs, batch_size=4, **model_args)
    answers = batched.generate_until(simple_requests(docs))
    assert answers == class_model(folder, docs, batch_size=1, **model_args).generate_until(simple_requests(docs))
    assert answers == class_model(folder, docs, batch_size=4, use_cache=False, **model_args).generate_until(simple_requests(docs))
    records = sorted(batched.accounting.records, key=lambda record: record["doc_id"])
    assert [record["image_tokens"] for record in records] == [expected_image_tokens(batched.processor, doc["image"].convert("RGB"))
                                                              for doc in docs[:-1]] + [0]


@pytest.mark.parametrize("model_args", [dict(reduction="simignore", keep=0.4), dict(reduction="fastv", keep=0.5, fastv_layer=1),
                                        dict(reduction="pdrop", pdrop_layers="1/2"), dict(reduction="dart", keep=0.3, dart_layer=1),
                                        dict(reduction="random+fastv", keep=0.6, fastv_keep=0.25), dict(reduction="divprune", keep=0.3),
                                        dict(reduction="sparsevlm", sparsevlm_layers="0/1", sparsevlm_schedule="40/12")])
def test_a_batch_of_four_answers_as_each_prompt_alone_and_counts_only_image_tokens(tiled_folder, next_docs, model_args):
    batch_of_four_answers_as_each_prompt_alone(tiled_folder, next_docs, model_args)


def test_masking_and_dropping_give_the_same_answers_through_the_class(tiled_folder, next_docs):
    from test_model import simple_requests

    masked = class_model(tiled_folder, next_docs, batch_size=3, reduction="simignore", keep=0.3, apply="mask")
    dropped = class_model(tiled_folder, next_docs, batch_size=3, reduction="simignore", keep=0.3, apply="drop")
    assert masked.generate_until(simple_requests(next_docs)) == dropped.generate_until(simple_requests(next_docs))
    none = class_model(tiled_folder, next_docs, batch_size=3).generate_until(simple_requests(next_docs))
    assert class_model(tiled_folder, next_docs, batch_size=3, reduction="random", keep=1.0).generate_until(simple_requests(next_docs)) == none


@pytest.mark.parametrize("path_flags", [(), ("--force_simple",)], ids=["chat", "simple"])
def test_reduction_none_through_lmms_eval_answers_as_llava_hf(tiled_folder, testbed, tmp_path, path_flags):
    """Through the real CLI, on the offline ScienceQA-shaped task: `--model llava_simignore` on a LLaVA-NeXT or OneVision
    checkpoint as `--model llava_hf` (whose answers ignore the task's stop string, so they are cut there)."""
    from test_lmms_eval_cli import cut, evaluate

    checkpoint = {"model": tiled_folder, "tasks": testbed["tasks"]}
    flags = (*path_flags, "--limit", "4")
    ours, our_samples = evaluate(checkpoint, tmp_path / "ours", "reduction=none", extra_args=flags)
    _, their_samples = evaluate(checkpoint, tmp_path / "builtin", "device=cpu,device_map=cpu", model="llava_hf", extra_args=flags)
    assert [s["doc_id"] for s in our_samples] == list(range(4))
    assert [s["filtered_resps"] for s in our_samples] == [cut(s["filtered_resps"]) for s in their_samples]
    assert ours["config"]["model_backend"].startswith("lmms_simignore.models.llava_simignore.LlavaSimignore")
