"""FastV inside the language model, alone and stacked after a pre-LLM stage, on a tiny random LLaVA (3 layers)."""

import pytest
import torch
from test_engine import GREEDY_8, chat, encode, images, run, simignore_prompt

from lmms_simignore import engine
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.methods.fastv import fastv_stage

NONE = ReductionSettings()


@pytest.fixture(scope="module")
def padded_batch(processor):
    """Two prompts of different lengths (left padding on the first) and their option texts."""
    prompts = [
        chat(processor, "What colour?\nA. red\nB. blue"),
        chat(processor, "Context: a longer context line for the second row.\nWhich one?\nA. green\nB. blue\nC. yellow"),
    ]
    inputs = encode(processor, prompts, images((200, 20, 20), (20, 20, 200)))
    assert (inputs["attention_mask"][0] == 0).any()
    return inputs, ["red blue", "green blue yellow"]


def row_alone(inputs, row):
    """Row `row` of a left-padded one-image-per-row batch as its own batch, without the padding."""
    real = inputs["attention_mask"][row].bool()
    return {"input_ids": inputs["input_ids"][row : row + 1][:, real], "attention_mask": inputs["attention_mask"][row : row + 1][:, real],
            "pixel_values": inputs["pixel_values"][row : row + 1]}


def unreduced(model, inputs):
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    return engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")


def kept_image_positions(run_, prompt, reduced):
    """Original image positions (per row, sorted) among the columns layers >= K keep."""
    rows = []
    for row in range(reduced.attention_mask.shape[0]):
        columns = run_.kept_columns[row][run_.mask_high[row].bool()]
        original = reduced.position_ids[row, columns]  # positions identify tokens across reductions
        image = set(prompt.position_ids[row, prompt.image_positions[prompt.image_rows == row].flatten()].tolist())
        rows.append(sorted(p for p in original.tolist() if p in image))
    return rows


def eager_fastv_choice(eager_model, inputs, layer, keep):
    """The rule written the obvious way: eager attentions of layer K-1, last token, mean over heads, top-k."""
    positions = engine.default_position_ids(inputs["attention_mask"])
    with torch.inference_mode():
        output = eager_model(**inputs, position_ids=positions, output_attentions=True)
    attention = output.attentions[layer - 1][:, :, -1, :].mean(dim=1)  # (B, L)
    chosen = []
    for row in range(attention.shape[0]):
        image_columns = (inputs["input_ids"][row] == eager_model.config.image_token_id).nonzero().flatten()
        top = attention[row, image_columns].topk(keep).indices
        chosen.append(sorted(positions[row, image_columns[top]].tolist()))
    return chosen


@pytest.mark.parametrize("layer", [1, 2])
def test_kept_set_equals_the_eager_attention_rule(testbed, tiny_model, padded_batch, layer):
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    assert tiny_model.config.text_config._attn_implementation == "sdpa"  # ours runs on sdpa, no switch to eager
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "mask")
    fastv = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(layer, 9))
    fastv.prefill()
    assert kept_image_positions(fastv, prompt, reduced) == eager_fastv_choice(eager, inputs, layer, keep=9)


def test_last_token_attention_equals_the_eager_attention_weights(testbed, padded_batch):
    from transformers import LlavaForConditionalGeneration

    inputs, _ = padded_batch
    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    positions = engine.default_position_ids(inputs["attention_mask"])
    with torch.inference_mode():
        output = eager(**inputs, position_ids=positions, output_attentions=True, output_hidden_states=True)
        language_model = eager.model.language_model
        hidden = output.hidden_states[1]  # input of layer 1
        ours = engine.last_token_attention(
            language_model.layers[1], hidden, language_model.rotary_emb(hidden, positions), inputs["attention_mask"].bool()
        )
    torch.testing.assert_close(ours, output.attentions[1][:, :, -1, :], rtol=1e-5, atol=1e-6)


def test_keeping_every_image_token_equals_no_reduction(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    baseline = run(tiny_model, processor, reduced)
    for layer in (1, 2):
        assert run(tiny_model, processor, reduced, stages=fastv_stage(layer, 25)).tolist() == baseline.tolist()
    first = engine.LanguageModelRun(tiny_model, reduced).prefill()
    pruned_nothing = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(1, 25)).prefill()
    torch.testing.assert_close(pruned_nothing, first, rtol=1e-4, atol=1e-5)


def test_pruning_changes_the_output(tiny_model, padded_batch):
    """Control: dropping image tokens at layer 1 does change the logits."""
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    full = engine.LanguageModelRun(tiny_model, reduced).prefill()
    pruned = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(1, 3)).prefill()
    assert (full - pruned).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 2])
def test_cached_decoding_equals_recomputation(tiny_model, processor, padded_batch, layer):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    cached = run(tiny_model, processor, reduced, use_cache=True, stages=fastv_stage(layer, 6))
    recomputed = run(tiny_model, processor, reduced, use_cache=False, stages=fastv_stage(layer, 6))
    assert cached.shape[1] > 1  # multi-token generation
    assert cached.tolist() == recomputed.tolist()


def test_the_cache_holds_one_entry_per_token_and_layer(tiny_model, padded_batch):
    """Layers < K hold every prompt token, layers >= K only the kept ones; decoding adds exactly one each."""
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    fastv = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(2, 6))
    logits = fastv.prefill()
    length = reduced.inputs_embeds.shape[1]
    kept_length = fastv.kept_columns.shape[1]
    assert kept_length == length - (25 - 6)  # both rows drop 19 image tokens; the padding stays aligned
    for step in range(1, 4):
        logits = fastv.feed(logits.argmax(-1)[:, None])[:, -1]
        assert [fastv.cache.layers[i].keys.shape[-2] for i in range(3)] == [length + step] * 2 + [kept_length + step]


def test_each_row_keeps_its_own_tokens_and_answers_as_alone(tiny_model, processor, padded_batch):
    inputs, _ = padded_batch
    batch_reduced = unreduced(tiny_model, inputs)
    batched = run(tiny_model, processor, batch_reduced, stages=fastv_stage(1, 6))
    for row in range(2):
        single = run(tiny_model, processor, unreduced(tiny_model, row_alone(inputs, row)), stages=fastv_stage(1, 6))
        assert single[0].tolist() == batched[row, : single.shape[1]].tolist()


@pytest.mark.parametrize("apply", ["mask", "drop"])
def test_stacked_fastv_chooses_only_among_the_tokens_simignore_kept(tiny_model, processor, padded_batch, apply):
    inputs, texts = padded_batch
    settings = ReductionSettings(reduction="simignore+fastv", keep=12, apply=apply, fastv_layer=1, fastv_keep=5)
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, settings, texts)
    reduced = engine.reduce_prompt(prompt, kept, apply)
    fastv = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(1, 5))
    fastv.prefill()
    for row, chosen in enumerate(kept_image_positions(fastv, prompt, reduced)):
        simignore_kept = prompt.position_ids[row, prompt.image_positions[row, kept[row]]].tolist()
        assert len(chosen) == 5 and set(chosen) <= set(simignore_kept)


def test_stacked_mask_and_drop_give_the_same_answers(tiny_model, processor, padded_batch):
    inputs, texts = padded_batch
    settings = ReductionSettings(reduction="simignore+fastv", keep=12, fastv_layer=1, fastv_keep=5)
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, settings, texts)
    answers = [
        run(tiny_model, processor, engine.reduce_prompt(prompt, kept, apply), stages=fastv_stage(1, 5)).tolist()
        for apply in ("mask", "drop")
    ]
    assert answers[0] == answers[1]


def test_continuation_logprobs_match_step_by_step_generation(tiny_model, padded_batch):
    inputs, _ = padded_batch
    reduced = unreduced(tiny_model, inputs)
    greedy = engine.generate(tiny_model, reduced, GREEDY_8, [-1], 0, stages=fastv_stage(1, 6)).tokens  # no eos
    logprobs, is_greedy, _ = engine.continuation_logprobs(tiny_model, reduced, greedy, stages=fastv_stage(1, 6))
    assert logprobs.shape == greedy.shape and bool(is_greedy.all())
    recomputed = engine.LanguageModelRun(tiny_model, reduced, stages=fastv_stage(1, 6), use_cache=False)
    logits = torch.cat([recomputed.prefill()[:, None], recomputed.feed(greedy[:, :-1])], dim=1)  # no cache: all recomputed
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, greedy[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-5)


def test_fastv_budget_beyond_the_visible_tokens_is_refused(tiny_model, processor, padded_batch):
    inputs, texts = padded_batch
    settings = ReductionSettings(reduction="simignore", keep=4, apply="mask")
    prompt, kept = simignore_prompt(tiny_model, processor, inputs, settings, texts)
    with pytest.raises(ValueError, match="fastv's stage at layer 1 keeps 5 image tokens per image, but only 4 are visible"):
        engine.LanguageModelRun(tiny_model, engine.reduce_prompt(prompt, kept, "mask"), stages=fastv_stage(1, 5))
    with pytest.raises(ValueError, match="fastv's stage at layer 3 must come after layer 0 and before the last of 3 decoder layers"):
        engine.LanguageModelRun(tiny_model, engine.reduce_prompt(prompt, kept, "mask"), stages=fastv_stage(3, 2))
