"""Mipha (Phi-2 + SigLIP): a tiny random checkpoint in the released layout, built in code, converted into transformers'
Llava classes and compared with Mipha as its own code assembles it (tests/mipha_reference.py). Each trap of the
conversion has a test that fails when it is not handled."""

import json
import shutil

import pytest
import torch
from mipha_reference import SYSTEM, load_reference, reference_answer, reference_pixels
from PIL import Image, ImageDraw

from lmms_simignore import engine
from lmms_simignore.models.llava_simignore import LlavaSimignore
from lmms_simignore.models.mipha import HEAD_BIAS_FILE, HEAD_BIAS_KEY, convert_mipha
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny import scienceqa_like_records
from lmms_simignore.testbed.tiny_mipha import END_OF_TEXT, TinyMiphaShape, build_tiny_mipha

IMAGE_TOKENS = TinyMiphaShape().image_tokens  # 36


@pytest.fixture(scope="module")
def mipha(tmp_path_factory):
    """{"src": the released layout, "out": its conversion, "vision": the tower's config file}."""
    root = tmp_path_factory.mktemp("mipha")
    src = build_tiny_mipha(root / "src")
    out = convert_mipha(src, root / "out", vision_config_file=src / "tiny_siglip.json", echo=lambda line: None)
    return {"src": src, "out": out, "vision": src / "tiny_siglip.json", "root": root}


@pytest.fixture(scope="module")
def reference(mipha):
    return load_reference(mipha["src"], mipha["vision"])


@pytest.fixture(scope="module")
def converted(mipha):
    return LlavaSimignore(pretrained=str(mipha["out"]), dtype="float32")


def scene(width, height, colour=(200, 40, 40), box=(3, 5, 20, 12)):
    """A non-square picture: a coloured page with a green box."""
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).rectangle(box, fill=(20, 200, 30))
    return image


QUESTIONS = [(scene(30, 18), "What colour is the box?\nA. red\nB. green", "red green"),
             (scene(16, 28, colour=(30, 40, 220), box=(2, 2, 9, 20)), "Which one?\nA. blue\nB. yellow\nC. green", "blue yellow green")]


def our_prompt(model, image, text, settings=None):
    """The converted processor's prompt for (image, text) and, reduced by `settings`, the engine's input."""
    processor = model.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    inputs = processor(images=[image], text=[processor.apply_chat_template(messages, add_generation_prompt=True)], return_tensors="pt")
    prompt = engine.build_prompt_embeddings(model.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    return inputs, prompt


def first_logits(model, image, text):
    inputs, prompt = our_prompt(model, image, text)
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")
    return engine.LanguageModelRun(model.model, reduced).prefill()[0]


def greedy(model, reduced, max_new_tokens=8, eos=None):
    tokenizer = model.tokenizer
    return engine.generate(model.model, reduced, engine.DecodingOptions(max_new_tokens=max_new_tokens),
                           [model.eot_token_id if eos is None else eos], tokenizer.pad_token_id).tokens


# -- the converted model is Mipha ------------------------------------------------------------------------------------

@pytest.mark.parametrize("question", range(len(QUESTIONS)))
def test_the_converted_model_computes_what_mipha_computes(converted, reference, question):
    image, text, _ = QUESTIONS[question]
    expected_answer, expected_logits = reference_answer(reference, image, text)
    torch.testing.assert_close(first_logits(converted, image, text), expected_logits, atol=1e-4, rtol=1e-4)
    inputs, prompt = our_prompt(converted, image, text)
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")
    tokens = greedy(converted, reduced)[0]
    assert converted.tokenizer.decode(tokens[tokens != converted.eot_token_id]) == expected_answer


def test_the_prompt_is_mipha_s_without_bos_and_the_image_is_padded_to_a_square(converted, reference):
    image, text, _ = QUESTIONS[0]
    inputs, _ = our_prompt(converted, image, text)
    tokenizer = reference["tokenizer"]
    before = tokenizer(f"{SYSTEM} USER: ", add_special_tokens=False).input_ids
    after = tokenizer(f"\n{text} ASSISTANT:", add_special_tokens=False).input_ids
    image_id = converted.model.config.image_token_id
    assert inputs["input_ids"][0].tolist() == before + [image_id] * IMAGE_TOKENS + after
    torch.testing.assert_close(inputs["pixel_values"], reference_pixels(reference, image))
    squashed = reference["processor"](images=image, return_tensors="pt")["pixel_values"]  # control: resized unpadded
    assert not torch.allclose(inputs["pixel_values"], squashed, atol=1e-2)


def test_simignore_on_mipha_keeps_the_tokens_closest_to_the_options(converted, reference):
    image, text, options = QUESTIONS[1]
    keep = round(0.75 * IMAGE_TOKENS)
    expected_answer, expected_logits = reference_answer(reference, image, text, keep=keep, options_text=options)
    _, prompt = our_prompt(converted, image, text)
    settings = ReductionSettings(reduction="simignore", keep=0.75)
    reduced = engine.apply_pre_llm_stage(converted.model, converted.tokenizer, engine.plan_for(converted.model.config, settings), prompt, [options], [0])
    torch.testing.assert_close(engine.LanguageModelRun(converted.model, reduced).prefill()[0], expected_logits, atol=1e-4, rtol=1e-4)
    tokens = greedy(converted, reduced)[0]
    assert converted.tokenizer.decode(tokens[tokens != converted.eot_token_id]) == expected_answer


def test_mipha_evaluates_through_lmms_eval_with_the_reference_answers(mipha, reference, tmp_path):
    """`lmms-eval --model llava_simignore --model_args pretrained=OUT,reduction=simignore,keep=0.75 --tasks
    scienceqa_img_llava_local`, non-square images: every answer is the reference's."""
    from datasets import Dataset

    from lmms_simignore.evaluation.runs import EvalRun, read_samples, run_lmms_eval
    from lmms_simignore.local_data import write_local_task

    records = scienceqa_like_records(num_docs=3, seed=2, with_text_only=0)
    for index, record in enumerate(records):
        record["image"] = record["image"].crop((0, 0, 48, 30 + 6 * index))  # 48x30, 48x36, 48x42
    data = tmp_path / "sqa.parquet"
    Dataset.from_list(records).to_parquet(str(data))
    task = write_local_task(tmp_path / "tasks", data, "scienceqa_img_llava_local", "_scienceqa_img_llava_template.yaml")
    run = EvalRun(name="mipha", model="llava_simignore", tasks="scienceqa_img_llava_local", include_path=task.parent,
                  output_dir=tmp_path / "run", batch_size=2,
                  model_args=f"pretrained={mipha['out']},reduction=simignore,keep=0.75,dtype=float32,max_new_tokens=6")
    run_lmms_eval(run, timeout=600)
    samples = read_samples(tmp_path / "run", "scienceqa_img_llava_local")
    from lmms_simignore.tasks.scienceqa_utils import POST_PROMPT, doc_to_text

    kwargs = {"pre_prompt": "", "post_prompt": POST_PROMPT}
    for sample, record in zip(samples, records):
        expected, _ = reference_answer(reference, record["image"], doc_to_text(record, kwargs), max_new_tokens=6,
                                       keep=round(0.75 * IMAGE_TOKENS), options_text=" ".join(record["choices"]))
        assert sample["filtered_resps"] == expected


# -- the traps ---------------------------------------------------------------------------------------------------------

def test_the_head_bias_is_loaded_and_used(mipha, converted, reference, tmp_path):
    """Without its bias the head's logits are off by exactly the bias; a declared bias that is missing is refused."""
    from safetensors.torch import load_file

    image, text, _ = QUESTIONS[0]
    without = tmp_path / "without"
    shutil.copytree(mipha["out"], without)
    config = json.loads((without / "config.json").read_text())
    del config["lm_head_bias"]
    (without / "config.json").write_text(json.dumps(config))
    bias = load_file(mipha["out"] / HEAD_BIAS_FILE)[HEAD_BIAS_KEY].float()
    assert bias.abs().max() > 0.5
    unbiased = first_logits(LlavaSimignore(pretrained=str(without), dtype="float32"), image, text)
    torch.testing.assert_close(unbiased + bias, first_logits(converted, image, text), atol=1e-4, rtol=1e-4)

    missing = tmp_path / "missing"
    shutil.copytree(mipha["out"], missing)
    (missing / HEAD_BIAS_FILE).unlink()
    with pytest.raises(ValueError, match=f"declares a language-model head bias in {HEAD_BIAS_FILE}, which is missing"):
        LlavaSimignore(pretrained=str(missing), dtype="float32")


def test_generation_stops_at_endoftext_not_at_phi_s_default_eos(mipha, converted):
    """The source config says eos 2 (Phi's default); the converted model ends at <|endoftext|>."""
    from transformers import AutoConfig

    end_of_text = converted.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert json.loads((mipha["src"] / "config.json").read_text())["eos_token_id"] == 2 != end_of_text
    assert AutoConfig.from_pretrained(mipha["out"]).text_config.eos_token_id == end_of_text == converted.eot_token_id
    image, text, _ = QUESTIONS[0]
    _, prompt = our_prompt(converted, image, text)
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")
    head = converted.model.lm_head
    saved = head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.bias[end_of_text] += 1e4  # the model says <|endoftext|> first
        assert greedy(converted, reduced, max_new_tokens=5).shape[1] == 1
        assert greedy(converted, reduced, max_new_tokens=5, eos=2).shape[1] == 5  # control: Phi's default id never ends it
    finally:
        with torch.no_grad():
            head.bias.copy_(saved)


def test_image_is_added_to_the_tokenizer_inside_the_embedding_matrix(mipha, converted, tmp_path):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(mipha["src"])
    assert "<image>" not in source.get_vocab()
    image_id = converted.model.config.image_token_id
    assert image_id == len(source) < converted.model.config.text_config.vocab_size
    full = build_tiny_mipha(tmp_path / "full", shape=TinyMiphaShape(spare_vocab_rows=0))
    with pytest.raises(ValueError, match="no free row for <image>"):
        convert_mipha(full, tmp_path / "full-out", vision_config_file=full / "tiny_siglip.json", echo=lambda line: None)


def test_features_are_every_patch_of_vision_layer_minus_two(converted):
    config = converted.model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "full")
    assert converted.image_tokens_per_image == IMAGE_TOKENS  # SigLIP has no CLS token: nothing to drop


def test_a_mipha_folder_loads_directly_converted_once_into_a_cache(tmp_path, monkeypatch):
    """The nested layout describes its tower, so `pretrained=` the released folder itself works: converted on the first
    load into LMMS_SIMIGNORE_CACHE, read back from there on the next."""
    import lmms_simignore.models.mipha as mipha_module

    src = build_tiny_mipha(tmp_path / "nested", layout="nested")
    monkeypatch.setenv("LMMS_SIMIGNORE_CACHE", str(tmp_path / "cache"))
    model = LlavaSimignore(pretrained=str(src), dtype="float32")
    image, text, _ = QUESTIONS[1]
    _, expected_logits = reference_answer(load_reference(src), image, text)
    torch.testing.assert_close(first_logits(model, image, text), expected_logits, atol=1e-4, rtol=1e-4)
    assert [path.name.startswith("mipha-nested-") for path in (tmp_path / "cache").iterdir()] == [True]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(mipha_module, "convert_mipha", no_second_conversion)
    again = LlavaSimignore(pretrained=str(src), dtype="float32")
    torch.testing.assert_close(first_logits(again, image, text), expected_logits, atol=1e-4, rtol=1e-4)


def test_a_tower_that_is_only_named_needs_its_config(mipha, tmp_path):
    with pytest.raises(ValueError, match="'tiny/siglip-tiny-patch4-24' is not described in config.json .* --vision-config"):
        convert_mipha(mipha["src"], tmp_path / "out", echo=lambda line: None)


def same_conversion(out, expected):
    """The converted config.json and every weight of `out` are those of `expected`."""
    from safetensors.torch import load_file

    def tensors(folder):
        return {key: value for path in sorted(folder.glob("model*.safetensors")) for key, value in load_file(path).items()}

    assert json.loads((out / "config.json").read_text()) == json.loads((expected / "config.json").read_text())
    ours, theirs = tensors(out), tensors(expected)
    assert sorted(ours) == sorted(theirs) and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    torch.testing.assert_close(load_file(out / HEAD_BIAS_FILE), load_file(expected / HEAD_BIAS_FILE), rtol=0, atol=0)


def siglip_written_by_transformers(vision_file):
    """The tiny tower's SiglipVisionConfig as transformers writes it: with its pooling head on, a dtype, architectures."""
    from transformers import SiglipVisionConfig

    bare = {key: value for key, value in json.loads(vision_file.read_text()).items() if key != "model_type"}
    return SiglipVisionConfig(**bare, vision_use_head=True, dtype="float32", architectures=["SiglipVisionModel"])


@pytest.mark.parametrize("written_by", ["save_pretrained", "to_dict", "SiglipConfig"])
def test_a_vision_config_file_written_by_transformers_converts_as_the_bare_one(mipha, tmp_path, written_by):
    """`--vision-config` with SiglipVisionConfig's own JSON (vision_use_head, transformers_version, dtype, ...), or a
    whole SiglipConfig's: the same converted model as the bare file (the pooling head is dropped whatever it says)."""
    from transformers import SiglipConfig

    siglip = siglip_written_by_transformers(mipha["vision"])
    if written_by == "save_pretrained":
        siglip.save_pretrained(tmp_path / "tower")
        vision_file = tmp_path / "tower" / "config.json"
    else:
        vision_file = tmp_path / "tower.json"
        whole = siglip.to_dict() if written_by == "to_dict" else SiglipConfig(vision_config=siglip.to_dict()).to_dict()
        vision_file.write_text(json.dumps(whole))
    written = json.loads(vision_file.read_text())
    written = written.get("vision_config", written)
    assert written["vision_use_head"] is True and {"dtype", "architectures"} <= set(written)
    out = convert_mipha(mipha["src"], tmp_path / "out", vision_config_file=vision_file, echo=lambda line: None)
    same_conversion(out, mipha["out"])
    assert json.loads((out / "config.json").read_text())["vision_config"]["vision_use_head"] is False


@pytest.mark.parametrize("block", ["mipha", "llava-hf"])
def test_a_nested_vision_config_written_by_transformers_converts_as_the_bare_file(mipha, tmp_path, block):
    """config.json's `vision_config` written by `to_dict()`: Mipha's (`vision_tower` a whole config of Mipha's vision
    model type, with its settings) or llava-hf's (the block is the SiglipVisionConfig itself, the flat `mm_*` keys kept);
    converted without --vision-config, the same model as the flat layout with the bare file."""
    src = tmp_path / "src"
    shutil.copytree(mipha["src"], src)
    config = json.loads((src / "config.json").read_text())
    tower = siglip_written_by_transformers(mipha["vision"]).to_dict()
    if block == "mipha":
        flat = {key: config.pop(key) for key in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type",
                                                   "mm_vision_select_layer", "mm_vision_select_feature")}
        config["vision_config"] = {
            "vision_tower": {**tower, "model_type": "mipha_vision_model", "mm_vision_select_layer": flat["mm_vision_select_layer"],
                             "mm_vision_select_feature": "patch", "vision_model_name_or_path": flat["mm_vision_tower"]},
            "mm_projector": {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": flat["mm_hidden_size"], "hidden_size": config["hidden_size"]},
        }
    else:
        config["vision_config"] = tower
    (src / "config.json").write_text(json.dumps(config, indent=1))
    out = convert_mipha(src, tmp_path / "out", echo=lambda line: None)
    same_conversion(out, mipha["out"])


def test_weights_that_do_not_fill_the_model_exactly_are_refused(mipha, tmp_path):
    from safetensors.torch import load_file, save_file

    for change, message in (("drop", "missing \\['model.language_model.layers.0.mlp.fc1.bias'\\]"),
                            ("extra", "unexpected \\['model.language_model.extra.weight'\\]")):
        src = tmp_path / change
        shutil.copytree(mipha["src"], src)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        shard = index["weight_map"]["model.layers.0.mlp.fc1.bias"]
        tensors = load_file(src / shard)
        if change == "drop":
            del tensors["model.layers.0.mlp.fc1.bias"]
        else:
            tensors["model.extra.weight"] = torch.zeros(2)
        save_file(tensors, str(src / shard), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            convert_mipha(src, tmp_path / f"{change}-out", vision_config_file=src / "tiny_siglip.json", echo=lambda line: None)


def test_a_folder_that_is_not_mipha_is_refused_with_what_was_expected(testbed, tmp_path):
    with pytest.raises(ValueError, match="model_type 'llava', expected 'mipha_phi'"):
        convert_mipha(testbed["model"], tmp_path / "out", echo=lambda line: None)
    with pytest.raises(ValueError, match="has no config.json"):
        convert_mipha(tmp_path, tmp_path / "out", echo=lambda line: None)


@pytest.mark.parametrize("model_args, per_layer", [
    (dict(reduction="fastv", fastv_layer=1, fastv_keep=12), [IMAGE_TOKENS, 12, 12]),
    (dict(reduction="pdrop"), [IMAGE_TOKENS, 18, 9]),  # 3 layers: stages after a quarter and a half of the depth (layers 1, 2)
    (dict(reduction="dart", keep=12), [IMAGE_TOKENS, IMAGE_TOKENS, 12]),
    (dict(reduction="simignore+fastv", keep=27, fastv_layer=2, fastv_keep=9), [27, 27, 9]),
    (dict(reduction="random", keep=20, apply="mask"), [IMAGE_TOKENS] * 3),  # masked tokens are still computed
], ids=["fastv", "pdrop", "dart", "simignore+fastv", "random-mask"])
def test_the_pipeline_runs_on_mipha_through_the_model_class(mipha, model_args, per_layer):
    """Answers for a batch equal the answers one by one, and each layer computed on the counted image tokens."""
    from test_model import make_model, simple_requests

    docs = scienceqa_like_records(num_docs=3, seed=4, with_text_only=0)
    for index, doc in enumerate(docs):
        doc["image"] = doc["image"].crop((0, 0, 48, 28 + 8 * index))
    batched = make_model({"model": mipha["out"]}, docs, dtype="float32", batch_size=3, **model_args)
    answers = batched.generate_until(simple_requests(docs))
    assert answers == make_model({"model": mipha["out"]}, docs, dtype="float32", **model_args).generate_until(simple_requests(docs))
    assert [record["computed_per_layer"] for record in batched.accounting.records] == [per_layer] * 3


def test_vision_side_stages_are_refused_on_a_siglip_tower(mipha):
    with pytest.raises(ValueError, match="'siglip_vision_model' has no CLS token"):
        LlavaSimignore(pretrained=str(mipha["out"]), reduction="visionzip", keep=12)


def test_the_hub_id_of_a_mipha_checkpoint_downloads_its_safetensors_and_converts_them(tmp_path, monkeypatch):
    """zhumj34/Mipha-3B (served here by a fake hub from a local released folder): config.json first, then only
    safetensors, JSON and tokenizer files; then converted once like a folder."""
    import huggingface_hub

    src = build_tiny_mipha(tmp_path / "hub", layout="nested")
    asked = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        asked.append(("file", repo_id, filename))
        return str(src / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("LMMS_SIMIGNORE_CACHE", str(tmp_path / "cache"))
    model = LlavaSimignore(pretrained="zhumj34/Mipha-3B", dtype="float32")
    assert asked == [("file", "zhumj34/Mipha-3B", "config.json"), ("snapshot", "zhumj34/Mipha-3B", ("*.json", "*.safetensors", "*.txt"))]
    assert model.model.config.text_config.model_type == "phi" and model.model.lm_head.bias is not None
