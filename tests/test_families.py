"""The language models and towers the engine runs: Llama (LLaVA-1.5, the other test files) and Phi (Mipha: partial
rotary embedding, parallel attention and MLP, `final_layernorm`, biases), each checked against transformers' own forward
and eager attention; every other family refused by name before any compute."""

import pytest
import torch
from PIL import Image
from test_fastv import unreduced

from lmms_simignore import engine
from lmms_simignore.models.mipha import attach_head_bias, convert_mipha
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny_mipha import build_tiny_mipha
from lmms_simignore.methods.dart import dart_stage
from lmms_simignore.methods.fastv import fastv_stage
from lmms_simignore.methods.pdrop import pdrop_stages
from lmms_simignore.methods.visiondrop import visiondrop_stages

NONE = ReductionSettings()


@pytest.fixture(scope="module")
def phi_llava(tmp_path_factory):
    """A converted tiny Mipha (Phi 3 layers, 4 of 8 dims per head rotated, SigLIP, 36 image tokens), sdpa and eager."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("phi")
    src = build_tiny_mipha(root / "src", seed=3)
    out = convert_mipha(src, root / "out", vision_config_file=src / "tiny_siglip.json", echo=lambda line: None)
    models = {}
    for backend in ("sdpa", "eager"):
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation=backend).eval()
        attach_head_bias(model, out)
        models[backend] = model
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    return models, processor


@pytest.fixture(scope="module")
def phi_batch(phi_llava):
    """Two prompts of different lengths (left padding on the first), non-square images."""
    _, processor = phi_llava
    texts = ["What colour?\nA. red\nB. blue", "Context: a longer line for the second row.\nWhich one?\nA. green\nB. blue"]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                                             add_generation_prompt=True) for text in texts]
    images = [Image.new("RGB", (30, 20), (200, 30, 30)), Image.new("RGB", (18, 26), (30, 30, 200))]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"][0] == 0).any()
    return inputs


def greedy(model, processor, reduced, use_cache=True, **stages):
    tokenizer = processor.tokenizer
    return engine.generate(model, reduced, engine.DecodingOptions(max_new_tokens=6), [tokenizer.eos_token_id],
                           tokenizer.pad_token_id, use_cache=use_cache, **stages).tokens


def test_phi_keep_all_reproduces_the_transformers_forward(phi_llava, phi_batch):
    models, _ = phi_llava
    model = models["sdpa"]
    with torch.inference_mode():
        expected = model(**phi_batch, position_ids=engine.default_position_ids(phi_batch["attention_mask"])).logits[:, -1]
    torch.testing.assert_close(engine.LanguageModelRun(model, unreduced(model, phi_batch)).prefill(), expected, atol=1e-4, rtol=1e-4)


def test_phi_attention_rows_equal_the_eager_weights(phi_llava, phi_batch):
    """The last token's row, recomputed with Phi's partial rotary embedding (4 of 8 dims), equals transformers' eager
    softmax weights in every layer."""
    models, _ = phi_llava
    eager = models["eager"]
    positions = engine.default_position_ids(phi_batch["attention_mask"])
    with torch.inference_mode():
        output = eager(**phi_batch, position_ids=positions, output_attentions=True, output_hidden_states=True)
        language_model = eager.model.language_model
        for layer in range(len(language_model.layers)):
            hidden = output.hidden_states[layer]
            ours = engine.last_token_attention(language_model.layers[layer], hidden, language_model.rotary_emb(hidden, positions),
                                               phi_batch["attention_mask"].bool())
            torch.testing.assert_close(ours, output.attentions[layer][:, :, -1, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages", [
    dict(stages=fastv_stage(1, 12)),
    dict(stages=pdrop_stages(((1, 18), (2, 9)))),
    dict(stages=pdrop_stages(((1, 18), (2, 9)), "repacked")),
    dict(stages=dart_stage(2, 12)),
    dict(stages=visiondrop_stages(((1, 18), (2, 9)), (3, 2))),
], ids=["fastv", "pdrop", "pdrop-repacked", "dart", "visiondrop-llm"])
def test_every_in_llm_stage_runs_on_phi_cached_as_recomputed_and_batched_as_alone(phi_llava, phi_batch, stages):
    models, processor = phi_llava
    model = models["sdpa"]
    reduced = unreduced(model, phi_batch)
    cached = greedy(model, processor, reduced, **stages)
    assert cached.tolist() == greedy(model, processor, reduced, use_cache=False, **stages).tolist()
    pruned = engine.LanguageModelRun(model, reduced, **stages).prefill()
    assert not torch.allclose(pruned, engine.LanguageModelRun(model, reduced).prefill(), atol=1e-4)  # the stage acts
    for row in range(2):
        real = phi_batch["attention_mask"][row].bool()
        alone = {"input_ids": phi_batch["input_ids"][row : row + 1][:, real], "attention_mask": phi_batch["attention_mask"][row : row + 1][:, real],
                 "pixel_values": phi_batch["pixel_values"][row : row + 1]}
        single = greedy(model, processor, unreduced(model, alone), **stages)
        assert single[0].tolist() == cached[row, : single.shape[1]].tolist()


def test_phi_fastv_keeps_what_the_eager_attention_ranks_highest(phi_llava, phi_batch):
    models, _ = phi_llava
    eager, model = models["eager"], models["sdpa"]
    positions = engine.default_position_ids(phi_batch["attention_mask"])
    with torch.inference_mode():
        attention = eager(**phi_batch, position_ids=positions, output_attentions=True).attentions[1][:, :, -1, :].mean(dim=1)
    prompt = engine.build_prompt_embeddings(model, phi_batch["input_ids"], phi_batch["attention_mask"], phi_batch["pixel_values"])
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")
    fastv = engine.LanguageModelRun(model, reduced, stages=fastv_stage(2, 10))
    fastv.prefill()
    for row in range(2):
        image_columns = (phi_batch["input_ids"][row] == model.config.image_token_id).nonzero().flatten()
        expected = sorted(positions[row, image_columns[attention[row, image_columns].topk(10).indices]].tolist())
        kept = fastv.kept_columns[row][fastv.mask_high[row].bool()]
        seen = reduced.position_ids[row, kept].tolist()
        assert sorted(p for p in seen if p in set(positions[row, image_columns].tolist())) == expected


def test_phi_mask_and_drop_compute_the_same_logits(phi_llava, phi_batch):
    models, processor = phi_llava
    model = models["sdpa"]
    prompt = engine.build_prompt_embeddings(model, phi_batch["input_ids"], phi_batch["attention_mask"], phi_batch["pixel_values"])
    settings = ReductionSettings(reduction="random", keep=20)
    kept = engine.choose_kept_image_tokens(engine.plan_for(model.config, settings), prompt.image_features, image_seeds=[0, 1])
    masked = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, kept, "mask")).prefill()
    dropped = engine.LanguageModelRun(model, engine.reduce_prompt(prompt, kept, "drop")).prefill()
    torch.testing.assert_close(masked, dropped, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dropped, engine.LanguageModelRun(model, unreduced(model, phi_batch)).prefill(), atol=1e-3)


# -- what is refused -------------------------------------------------------------------------------------------------

def llava_config(text=None, vision=None, **kwargs):
    from transformers import LlavaConfig

    return LlavaConfig(text_config=text or {"model_type": "llama"}, vision_config=vision or {"model_type": "clip_vision_model"}, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma", "olmo"])
def test_other_language_models_are_refused_by_name(family):
    with pytest.raises(ValueError, match=f"the language model of this checkpoint is '{family}', which llava_simignore does not run"):
        engine.check_model_support(llava_config(text={"model_type": family}))


def test_phi_with_query_key_norms_is_refused():
    with pytest.raises(ValueError, match="qk_layernorm=true"):
        engine.check_model_support(llava_config(text={"model_type": "phi", "qk_layernorm": True}))


def test_a_tower_with_a_variable_number_of_tokens_is_refused():
    with pytest.raises(ValueError, match="the vision tower of this checkpoint is 'pixtral'"):
        engine.check_model_support(llava_config(vision={"model_type": "pixtral"}))


def test_the_model_class_refuses_an_unsupported_family_before_loading_weights(tmp_path):
    from lmms_simignore.models.llava_simignore import LlavaSimignore

    llava_config(text={"model_type": "qwen3", "num_hidden_layers": 2}).save_pretrained(tmp_path)  # a config, no weights
    with pytest.raises(ValueError, match="'qwen3', which llava_simignore does not run"):
        LlavaSimignore(pretrained=str(tmp_path))


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_image_token_count_is_what_transformers_computes_for_a_siglip_tower(strategy):
    """SigLIP has no CLS token: the "default" strategy drops a real patch (24 of 25), "full" keeps 25."""
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=20, patch_size=4)
    config = llava_config(text={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "vocab_size": 64}, vision=vision.to_dict(), vision_feature_select_strategy=strategy,
                          vision_feature_layer=-2, image_token_id=63)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=torch.zeros(1, 3, 20, 20), vision_feature_layer=-2,
                                                  vision_feature_select_strategy=strategy)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    count = (features[0] if isinstance(features, (list, tuple)) else features).shape[-2]
    assert engine.image_tokens_per_image(config) == count == {"default": 24, "full": 25}[strategy]
