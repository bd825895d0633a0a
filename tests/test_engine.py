"""The engine on a tiny random LLaVA: equivalences that make reduction trustworthy."""

import dataclasses

import pytest
import torch
from PIL import Image

from lmms_simignore import engine
from lmms_simignore.methods.fastv import fastv_stage
from lmms_simignore.settings import ReductionSettings

GREEDY_8 = engine.DecodingOptions(max_new_tokens=8)


def chat(processor, text, system=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt if system is None else prompt.replace(prompt.split(" USER:")[0], system)


def images(*colours):
    return [Image.new("RGB", (40 + 4 * i, 40), colour) for i, colour in enumerate(colours)]


def encode(processor, prompts, pictures):
    return processor(images=pictures, text=prompts, return_tensors="pt", padding=True)


def simignore_prompt(model, processor, inputs, settings, texts):
    """Embed, score against `texts` (one string per row), reduce: what the model class does."""
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    ids = [processor.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    text_embeds, text_mask = engine.embed_texts(model, ids)
    plan = settings.plan(prompt.tokens_per_image, model.config.text_config.num_hidden_layers)
    kept = engine.choose_kept_image_tokens(plan, prompt.image_features, text_embeds[prompt.image_rows], text_mask[prompt.image_rows])
    return prompt, kept


def last_logits(model, reduced):
    with torch.inference_mode():
        hidden = model.model.language_model(
            inputs_embeds=reduced.inputs_embeds,
            attention_mask=reduced.attention_mask,
            position_ids=reduced.position_ids,
        ).last_hidden_state
        return model.lm_head(hidden[:, -1])


def run(model, processor, reduced, use_cache=True, options=GREEDY_8, **fastv):
    tokenizer = processor.tokenizer
    return engine.generate(
        model, reduced, options, [tokenizer.eos_token_id], tokenizer.pad_token_id, use_cache=use_cache, **fastv
    ).tokens


SIMIGNORE_HALF = ReductionSettings(reduction="simignore", keep=12)
SIMIGNORE_HALF_MASKED = ReductionSettings(reduction="simignore", keep=12, apply="mask")


@pytest.fixture(scope="module")
def two_prompts(processor):
    prompts = [chat(processor, "What colour is it?\nA. red\nB. blue"), chat(processor, "Which one?\nA. green\nB. blue\nC. yellow")]
    return encode(processor, prompts, images((200, 20, 20), (20, 20, 200))), ["red blue", "green blue yellow"]


def test_image_span_is_found_from_the_ids_whatever_comes_before_it(tiny_model, processor):
    picture = images((200, 20, 20))
    kept_sets = []
    for system in ["", "Be brief.", "A much longer system prompt that pushes the image far to the right of where it was."]:
        inputs = encode(processor, [chat(processor, "What colour?\nA. red\nB. blue", system=system)], picture)
        prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, ["red blue"])
        expected = (inputs["input_ids"][0] == tiny_model.config.image_token_id).nonzero().flatten()
        assert prompt.image_positions[0].tolist() == expected.tolist()
        kept_sets.append(kept.tolist())
    assert expected[0] > 20  # the last prompt really moved the image
    assert kept_sets[0] == kept_sets[1] == kept_sets[2]


def test_keep_all_reproduces_the_transformers_forward(tiny_model, processor, two_prompts):
    inputs, _ = two_prompts
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    kept = engine.every_image_token(prompt)
    with torch.inference_mode():
        reference = tiny_model(**inputs, position_ids=engine.default_position_ids(inputs["attention_mask"])).logits[:, -1]
    for apply in ("mask", "drop"):
        torch.testing.assert_close(last_logits(tiny_model, engine.reduce_prompt(prompt, kept, apply)), reference)


def test_keep_all_generates_what_transformers_generate_does(tiny_model, processor, two_prompts):
    inputs, _ = two_prompts
    tokenizer = processor.tokenizer
    reference = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    kept = engine.every_image_token(prompt)
    ours = run(tiny_model, processor, engine.reduce_prompt(prompt, kept, "drop"))
    assert ours.tolist() == reference[:, inputs["input_ids"].shape[1] :].tolist()


def test_mask_and_drop_compute_the_same_logits_and_answers(tiny_model, processor, two_prompts):
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, texts)
    masked, dropped = engine.reduce_prompt(prompt, kept, "mask"), engine.reduce_prompt(prompt, kept, "drop")
    assert dropped.inputs_embeds.shape[1] == masked.inputs_embeds.shape[1] - (25 - 12)
    torch.testing.assert_close(last_logits(tiny_model, masked), last_logits(tiny_model, dropped), rtol=1e-4, atol=1e-5)
    assert run(tiny_model, processor, masked).tolist() == run(tiny_model, processor, dropped).tolist()


def test_reduction_changes_the_output(tiny_model, processor, two_prompts):
    """Control for the equivalences above: hiding image tokens does change what the model computes."""
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, texts)
    everything = engine.every_image_token(prompt)
    full = last_logits(tiny_model, engine.reduce_prompt(prompt, everything, "drop"))
    reduced = last_logits(tiny_model, engine.reduce_prompt(prompt, kept, "drop"))
    assert (full - reduced).abs().max() > 1e-3


@pytest.mark.parametrize("apply", ["mask", "drop"])
def test_cached_decoding_equals_full_recomputation(tiny_model, processor, two_prompts, apply):
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, texts)
    reduced = engine.reduce_prompt(prompt, kept, apply)
    assert run(tiny_model, processor, reduced, use_cache=True).tolist() == run(tiny_model, processor, reduced, use_cache=False).tolist()


def test_ignored_tokens_stay_invisible_for_the_whole_generation(tiny_model, processor, two_prompts):
    """With the KV cache, 8 decoding steps: scrambling the ignored tokens' embeddings changes nothing."""
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, texts)
    masked = engine.reduce_prompt(prompt, kept, "mask")
    ignored = (masked.attention_mask == 0) & (prompt.attention_mask == 1)
    assert int(ignored.sum()) == 2 * (25 - 12)
    scrambled_embeds = masked.inputs_embeds.clone()
    scrambled_embeds[ignored] = 50 * torch.randn(int(ignored.sum()), scrambled_embeds.shape[-1])
    scrambled = dataclasses.replace(masked, inputs_embeds=scrambled_embeds)
    assert run(tiny_model, processor, scrambled).tolist() == run(tiny_model, processor, masked).tolist()
    torch.testing.assert_close(last_logits(tiny_model, scrambled), last_logits(tiny_model, masked))

    visible_image = (masked.attention_mask == 1) & (inputs["input_ids"] == tiny_model.config.image_token_id)
    touched_embeds = masked.inputs_embeds.clone()
    touched_embeds[visible_image] = 50 * torch.randn(int(visible_image.sum()), touched_embeds.shape[-1])
    touched = dataclasses.replace(masked, inputs_embeds=touched_embeds)
    assert (last_logits(tiny_model, touched) - last_logits(tiny_model, masked)).abs().max() > 1e-3


def test_keep_zero_leaves_no_image_token_visible(tiny_model, processor, two_prompts):
    inputs, texts = two_prompts
    settings = ReductionSettings(reduction="simignore", keep=0)
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, settings, texts)
    dropped = engine.reduce_prompt(prompt, kept, "drop")
    assert dropped.visible_image_tokens.tolist() == [0, 0]
    assert dropped.image_tokens.tolist() == [25, 25]
    assert dropped.inputs_embeds.shape[1] == inputs["input_ids"].shape[1] - 25
    # no image at all gives the same answer: the image features cannot reach the LLM
    other = engine.build_prompt_embeddings(
        tiny_model, inputs["input_ids"], inputs["attention_mask"], torch.randn_like(inputs["pixel_values"])
    )
    assert run(tiny_model, processor, engine.reduce_prompt(other, kept, "mask")).tolist() == run(tiny_model, processor, dropped).tolist()


def test_a_batch_answers_like_its_rows_one_by_one(tiny_model, processor):
    prompts = [
        chat(processor, "What colour?\nA. red\nB. blue"),
        chat(processor, "Context: a long context line that makes this prompt longer.\nWhich one?\nA. green\nB. blue\nC. yellow"),
        chat(processor, "Pick:\nA. purple\nB. orange"),
    ]
    pictures = images((200, 20, 20), (20, 200, 20), (120, 20, 160))
    texts = ["red blue", "green blue yellow", "purple orange"]
    batch_inputs = encode(processor, prompts, pictures)
    prompt, kept = simignore_prompt(tiny_model, processor, batch_inputs, SIMIGNORE_HALF, texts)
    batched = run(tiny_model, processor, engine.reduce_prompt(prompt, kept, "drop"))
    for row in range(3):
        single_inputs = encode(processor, [prompts[row]], [pictures[row]])
        single_prompt, single_kept = simignore_prompt(tiny_model, processor, single_inputs, SIMIGNORE_HALF, [texts[row]])
        assert single_kept.tolist() == [kept[row].tolist()]
        single = run(tiny_model, processor, engine.reduce_prompt(single_prompt, single_kept, "drop"))
        assert single[0].tolist() == batched[row, : single.shape[1]].tolist()


def test_rows_without_an_image_pass_through_unreduced(tiny_model, processor):
    text_only = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "No picture here.\nA. yes\nB. no"}]}], add_generation_prompt=True
    )
    inputs = encode(processor, [chat(processor, "What colour?\nA. red\nB. blue"), text_only], images((200, 20, 20)))
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, ["red blue", "yes no"])
    dropped = engine.reduce_prompt(prompt, kept, "drop")
    assert dropped.image_tokens.tolist() == [25, 0]
    assert dropped.visible_image_tokens.tolist() == [12, 0]
    assert int(dropped.attention_mask[1].sum()) == int(inputs["attention_mask"][1].sum())


def test_image_token_count_must_match_the_pixel_values(tiny_model, processor, two_prompts):
    inputs, _ = two_prompts
    with pytest.raises(ValueError, match="pixel_values give 1 image"):
        engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:1])


@pytest.mark.parametrize("apply", ["mask", "drop"])
def test_eager_and_sdpa_attention_agree(testbed, processor, two_prompts, apply):
    from transformers import LlavaForConditionalGeneration

    inputs, texts = two_prompts
    answers, logits = [], []
    for implementation in ("eager", "sdpa"):
        model = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation=implementation).eval()
        prompt, kept = simignore_prompt(model, processor, inputs, SIMIGNORE_HALF, texts)
        reduced = engine.reduce_prompt(prompt, kept, apply)
        answers.append(run(model, processor, reduced).tolist())
        logits.append(last_logits(model, reduced))
    assert answers[0] == answers[1]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def image_tokens_each_layer_was_given(model, inputs, reduced, fastv) -> tuple[list[list[int]], list[list[int]]]:
    """Run the prompt pass with hooks on the decoder layers and count, from the hidden states' position ids and
    the 4-D eager attention mask each layer received, the image tokens in its sequence and those the last prompt
    token may attend to; (B, n_layers) each."""
    is_image = inputs["input_ids"] == model.config.image_token_id
    positions = engine.default_position_ids(inputs["attention_mask"])
    image_positions = [set(positions[row, is_image[row]].tolist()) for row in range(is_image.shape[0])]
    given = {}

    def hook(index):
        def record(module, args, kwargs):
            given.setdefault(index, (kwargs["position_ids"], kwargs["attention_mask"]))  # the first call is the prompt pass
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.language_model.layers)]
    try:
        engine.LanguageModelRun(model, reduced, **fastv).prefill()
    finally:
        for handle in handles:
            handle.remove()
    computed, visible = [], []
    for row, wanted in enumerate(image_positions):
        computed.append([]), visible.append([])
        for index in range(len(given)):
            layer_positions, mask = given[index]
            attendable = mask[row, 0, -1] if mask.dtype == torch.bool else mask[row, 0, -1] == 0  # (S,) last query's row
            image = torch.tensor([p in wanted for p in layer_positions[row].tolist()])
            computed[-1].append(int(image.sum()))
            visible[-1].append(int((image & attendable).sum()))
    return computed, visible


@pytest.mark.parametrize(
    "settings, fastv, expected_visible",
    [
        (ReductionSettings(), {}, [25, 25, 25]),
        (SIMIGNORE_HALF, {}, [12, 12, 12]),
        (SIMIGNORE_HALF_MASKED, {}, [12, 12, 12]),
        (SIMIGNORE_HALF_MASKED, {"stages": fastv_stage(1, 5)}, [12, 5, 5]),
        (ReductionSettings(), {"stages": fastv_stage(2, 7)}, [25, 25, 7]),
    ],
    ids=["none", "simignore-drop", "simignore-mask", "simignore-mask+fastv", "fastv"],
)
def test_the_image_tokens_each_layer_saw_are_read_off_what_the_layer_was_given(testbed, processor, two_prompts, settings,
                                                                               fastv, expected_visible):
    """The token accounting is observed, not the budget: it equals the image columns in the sequence and the 4-D
    attention mask that each decoder layer received (eager attention, so the mask is materialised)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(model, processor, inputs, settings, texts)
    reduced = engine.reduce_prompt(prompt, kept, settings.apply)
    run_ = engine.LanguageModelRun(model, reduced, **fastv)
    run_.prefill()
    computed, visible = image_tokens_each_layer_was_given(model, inputs, reduced, fastv)
    assert run_.image_tokens_seen.computed.tolist() == computed
    assert run_.image_tokens_seen.visible.tolist() == visible
    assert visible == [expected_visible] * 2  # and the request was honoured
    generation = engine.generate(model, reduced, GREEDY_8, [-1], processor.tokenizer.pad_token_id, **fastv)
    assert generation.image_tokens_seen.visible.tolist() == visible


def test_flash_attention_2_matches_sdpa_where_installed(testbed, processor, two_prompts):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA GPU")
    from transformers import LlavaForConditionalGeneration

    inputs, texts = two_prompts
    inputs = inputs.to("cuda")
    answers = []
    for implementation in ("sdpa", "flash_attention_2"):
        model = LlavaForConditionalGeneration.from_pretrained(
            testbed["model"], attn_implementation=implementation, dtype=torch.bfloat16
        ).to("cuda").eval()
        prompt, kept = simignore_prompt(model, processor, inputs, SIMIGNORE_HALF, texts)
        answers.append(run(model, processor, engine.reduce_prompt(prompt, kept, "drop")).tolist())
    assert answers[0] == answers[1]


def test_sampling_is_reproducible_with_a_seed(tiny_model, processor, two_prompts):
    inputs, texts = two_prompts
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, SIMIGNORE_HALF, texts)
    reduced = engine.reduce_prompt(prompt, kept, "drop")
    sample = engine.DecodingOptions(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    assert run(tiny_model, processor, reduced, options=sample).tolist() == run(tiny_model, processor, reduced, options=sample).tolist()


@pytest.mark.parametrize("temperature, top_p", [(1.0, None), (2.0, None), (1.0, 0.7)])
def test_sampling_draws_from_the_tempered_nucleus(temperature, top_p):
    """20,000 draws from fixed logits: frequencies match softmax(logits / T) renormalised over the smallest set of
    tokens whose probability reaches top_p, and nothing outside it is drawn."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20_000, -1)
    options = engine.DecodingOptions(max_new_tokens=1, do_sample=True, temperature=temperature, top_p=top_p, seed=0)
    drawn = engine._next_tokens(logits, options, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    expected = torch.softmax(logits[0] / temperature, dim=-1)  # [0.64, 0.24, 0.09, 0.03] at T = 1
    if top_p is not None:  # 0.64 < 0.7 <= 0.88: the two most likely tokens
        expected = torch.tensor([expected[0], expected[1], 0.0, 0.0]) / (expected[0] + expected[1])
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)
    assert (frequencies[expected == 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"do_sample": True, "temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_decoding_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.DecodingOptions(**kwargs)


@pytest.mark.parametrize(
    "vision, strategy, expected",
    [
        ({"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}, "default", 576),  # LLaVA-1.5
        ({"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}, "full", 577),  # CLS kept
        ({"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14}, "full", 729),  # Mipha-3B tower
    ],
)
def test_image_tokens_per_image_from_the_config(vision, strategy, expected):
    from transformers import LlavaConfig

    config = LlavaConfig(vision_config=vision, vision_feature_select_strategy=strategy)
    assert engine.image_tokens_per_image(config) == expected
