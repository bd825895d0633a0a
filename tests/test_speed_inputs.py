"""What the speed benchmark runs on: LLaVA-1.5's exact shapes, and ScienceQA-IMG-sized prompts."""

import pytest
import torch

from lmms_simignore.bench.llava_shapes import llava15_config
from lmms_simignore.bench.scienceqa_pass import CHOICE_COUNTS, QUESTION_TOKENS, WORDS, local_docs, pass_rows, synthetic_docs
from lmms_simignore.testbed.tiny import build_processor, build_tokenizer, write_scienceqa_like_parquet


@pytest.mark.parametrize("name, billions, decimals", [("llava7b-shape", 7.06, 2), ("llava13b-shape", 13.4, 1)])
def test_llava15_shapes_have_the_published_parameter_counts(name, billions, decimals):
    """llava-hf/llava-1.5-7b-hf has 7.06B parameters, -13b-hf 13.4B; built on the meta device, nothing allocated."""
    from transformers import LlavaForConditionalGeneration

    config = llava15_config(name, build_tokenizer())
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, decimals) == billions
    assert config.text_config.vocab_size == 32064 and config.text_config.head_dim == 128
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.image_seq_length) == (336, 14, 576)


def test_llava15_shape_processor_expands_one_image_into_576_tokens():
    from PIL import Image

    tokenizer = build_tokenizer()
    config = llava15_config("llava7b-shape", tokenizer)
    processor = build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    inputs = processor(images=[Image.new("RGB", (500, 380))], text="<image>\nWhich state is farthest north?", return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 576


def test_mipha3b_shape_has_the_published_parameter_count():
    """zhumj34/Mipha-3B's card says 3.22B parameters: Phi-2 (2.78B with its head's bias), SigLIP so400m's tower and the
    projector, plus the tower's attention-pooling head (15.2M), which the checkpoint carries and the conversion drops
    (features come from layer -2; the head never runs)."""
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

    from lmms_simignore.bench.llava_shapes import mipha3b_config
    from lmms_simignore.models.mipha import SIGLIP_SO400M_384

    config = mipha3b_config(build_tokenizer())
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
        tower_with_head = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in SIGLIP_SO400M_384.items() if k != "model_type"}))
    converted = sum(p.numel() for p in model.parameters()) + config.text_config.vocab_size  # + the head's bias
    pooling_head = sum(p.numel() for p in tower_with_head.head.parameters())
    assert round(converted / 1e9, 2) == 3.20 and round((converted + pooling_head) / 1e9, 2) == 3.22
    language_model = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel() + 51200
    assert round(language_model / 1e9, 2) == 2.78  # microsoft/phi-2
    attention = model.model.language_model.layers[0].self_attn
    assert config.image_seq_length == 729 and (attention.head_dim, attention.rotary_ndims) == (80, 32)


def test_mipha3b_shape_processor_pads_and_expands_one_image_into_729_tokens(tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoProcessor

    from lmms_simignore.bench import llava_shapes

    monkeypatch.setitem(llava_shapes.PHI_2, "num_hidden_layers", 1)  # the processor is the point, not the weights
    monkeypatch.setitem(llava_shapes.PHI_2, "hidden_size", 64)
    monkeypatch.setitem(llava_shapes.PHI_2, "intermediate_size", 64)
    monkeypatch.setitem(llava_shapes.PHI_2, "num_attention_heads", 4)
    monkeypatch.setitem(llava_shapes.PHI_2, "num_key_value_heads", 4)
    folder = llava_shapes.write_random_shape("mipha3b-shape", tmp_path / "mipha", torch.device("cpu"), torch.bfloat16)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.new("RGB", (500, 380), (255, 0, 0))], text="<image>\nWhich?", return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 384, 384)
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 729
    assert inputs["pixel_values"][0, :, 0, 0].tolist() != inputs["pixel_values"][0, :, 192, 192].tolist()  # padded rows on top


def test_unknown_llava15_shape_is_refused():
    with pytest.raises(ValueError, match="unknown LLaVA-1.5 shape 'llava70b-shape'; allowed: llava7b-shape, llava13b-shape"):
        llava15_config("llava70b-shape", build_tokenizer())


def test_synthetic_scienceqa_docs_follow_the_assumed_lengths_in_the_models_tokens():
    tokenizer = build_tokenizer()
    docs = synthetic_docs(tokenizer, num_docs=300, seed=1)
    again = synthetic_docs(tokenizer, num_docs=300, seed=1)
    assert [(d["hint"], d["question"], d["choices"]) for d in docs] == [(d["hint"], d["question"], d["choices"]) for d in again]
    counts = {len(doc["choices"]) for doc in docs}
    assert counts == {count for count, _ in CHOICE_COUNTS}
    assert all(0 <= doc["answer"] < len(doc["choices"]) and doc["image"].mode == "RGB" for doc in docs)

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    low, high = QUESTION_TOKENS
    longest_word = max(tokens(" " + word) for word in WORDS)  # the last word may overshoot the target
    question_tokens = [tokens(doc["question"].removesuffix("?")) for doc in docs]
    assert low - 2 <= min(question_tokens) and max(question_tokens) <= high + longest_word  # the first word has no space
    empty_hints = sum(doc["hint"] == "" for doc in docs) / len(docs)
    assert abs(empty_hints - 0.25) < 0.1  # a quarter assumed
    assert max(tokens(doc["hint"]) for doc in docs) > 80  # some passages


def test_local_docs_read_the_image_questions_of_a_test_split(tmp_path):
    parquet = write_scienceqa_like_parquet(tmp_path / "test.parquet", num_docs=5)  # the last row has no image
    docs = local_docs(parquet, num_docs=10)
    assert len(docs) == 4 and all(doc["image"] is not None for doc in docs)
    assert local_docs(parquet, num_docs=2) == docs[:2]


def test_pass_rows_halve_the_image_tokens_before_and_inside_the_llm():
    rows = pass_rows(576, 32)
    assert rows == {
        "none": {"reduction": "none"},
        "simignore_drop_288": {"reduction": "simignore", "keep": 288, "apply": "drop"},
        "fastv_288": {"reduction": "fastv", "fastv_layer": 2, "fastv_keep": 288},
    }


def test_random_llava15_checkpoint_is_written_in_the_asked_dtype_and_loads_through_the_model_class(tmp_path, monkeypatch):
    """The writer used for the 7B/13B shapes, on a narrowed shape (same code path, small enough for a CPU)."""
    from lmms_simignore.bench import llava_shapes
    from lmms_simignore.models.llava_simignore import LlavaSimignore

    monkeypatch.setitem(llava_shapes.LLAMA_DECODERS, "llava7b-shape", {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4})
    monkeypatch.setattr(llava_shapes, "CLIP_VIT_L_336", {**llava_shapes.CLIP_VIT_L_336, "hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32})
    folder = llava_shapes.write_random_shape("llava7b-shape", tmp_path / "shape", torch.device("cpu"), torch.bfloat16)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = LlavaSimignore(pretrained=str(folder), dtype="auto", reduction="simignore", keep=288, apply="drop")
    assert model.model.dtype == torch.bfloat16 and model.image_tokens_per_image == 576
    assert model.model.config.text_config.vocab_size == 32064
