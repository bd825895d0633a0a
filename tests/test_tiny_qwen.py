"""The tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints: they load offline with the real transformers classes,
generate, expand each image to the number of tokens its resized size gives, and name the tokenizer's token ids."""

import math

import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision", reason="the Qwen-VL processors need torchvision")

from lmms_simignore.testbed.tiny_qwen import FAMILIES, build_tiny_qwen, model_class_of

PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
MERGE = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {family: build_tiny_qwen(root / family, family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(folders):
    """(processor, model) per family, loaded as a user would: AutoProcessor and the model class."""
    from transformers import AutoProcessor

    return {
        family: (AutoProcessor.from_pretrained(folder), model_class_of(family).from_pretrained(folder).eval())
        for family, folder in folders.items()
    }


def question(processor, images=1, text="What is in the image?"):
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def resized(height, width, factor, min_pixels, max_pixels):
    """Each side to the nearest multiple of `factor`, then scaled into [min_pixels, max_pixels] keeping the ratio."""
    h, w = factor * round(height / factor), factor * round(width / factor)
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        h, w = max(factor, factor * math.floor(height * scale / factor)), max(factor, factor * math.floor(width * scale / factor))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = factor * math.ceil(height * scale / factor), factor * math.ceil(width * scale / factor)
    return h, w


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_offline_with_the_real_classes(loaded, folders, family):
    from transformers import AutoConfig

    processor, model = loaded[family]
    assert type(processor).__name__ == PROCESSOR_CLASSES[family]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(model) is model_class_of(family)
    assert AutoConfig.from_pretrained(folders[family]).model_type == family
    assert sorted(p.name for p in folders[family].glob("*.bin")) == []  # safetensors only
    if family == "qwen2_5_vl":
        assert model.config.vision_config.fullatt_block_indexes == [1, 3]
    if family == "qwen3_vl":
        assert len(model.config.vision_config.deepstack_visual_indexes) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_runs_on_an_image_question_and_a_mixed_batch(loaded, family):
    processor, model = loaded[family]
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (128, 96), (30, 30, 200))]
    texts = [question(processor), question(processor, text="How many objects are there? Answer with a letter.")]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        single = processor(text=texts[:1], images=images[:1], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=4, do_sample=False)
    length = batch["input_ids"].shape[1]
    assert out.shape == (2, length + 4)
    assert out[0, length:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist()  # left padding is harmless


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width, height", [(64, 64), (128, 96), (96, 128), (224, 112), (400, 300)])
def test_image_tokens_follow_the_resized_size(loaded, family, width, height):
    processor, model = loaded[family]
    size = processor.image_processor.size
    factor = PATCH[family] * MERGE
    new_h, new_w = resized(height, width, factor, size["shortest_edge"], size["longest_edge"])
    inputs = processor(text=[question(processor)], images=[Image.new("RGB", (width, height))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, new_h // PATCH[family], new_w // PATCH[family]]]
    tokens = (new_h // PATCH[family] // MERGE) * (new_w // PATCH[family] // MERGE)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    assert 16 <= tokens <= 64  # the tiny processor's pixel limits


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt(loaded, family):
    processor, model = loaded[family]
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (96, 128))]
    inputs = processor(text=[question(processor, images=2)], images=images, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.vision_start_token_id).sum()) == 2
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_config_token_ids_match_the_tokenizer(loaded, family):
    processor, model = loaded[family]
    tokenizer, config = processor.tokenizer, model.config
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert tokenizer.eos_token_id == config.text_config.eos_token_id == ids["<|im_end|>"]
    assert tokenizer.pad_token_id == config.text_config.pad_token_id == ids["<|endoftext|>"]
    assert model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert processor.image_token_id == config.image_token_id
    for token, token_id in ids.items():
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert max(ids.values()) < config.text_config.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_as_released(loaded, family):
    processor, _ = loaded[family]
    text = question(processor, text="Hi")
    turn = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    default_system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == (turn if family == "qwen3_vl" else default_system + turn)
    with_system = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
