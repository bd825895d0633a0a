"""Several images in one prompt: every method's budget is per image, and each image's tokens are ranked among
themselves (tiny random LLaVA, 25 image tokens per image; one row holds two images, the other one)."""

import pytest
import torch
from test_engine import encode, images, run

from lmms_simignore import engine
from lmms_simignore.methods.dart import dart_stage
from lmms_simignore.methods.pdrop import pdrop_stages
from lmms_simignore.settings import ReductionSettings

NONE = ReductionSettings()


@pytest.fixture(scope="module")
def two_and_one(processor):
    def prompt(text, count):
        content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    prompts = [prompt("Which picture is red?\nA. first\nB. second", 2), prompt("What colour?\nA. red\nB. blue", 1)]
    inputs = encode(processor, prompts, images((200, 20, 20), (20, 20, 200), (20, 200, 20)))
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(dim=1).tolist() == [50, 25]
    return inputs


def unreduced(model, inputs):
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    return prompt, engine.reduce_prompt(prompt, engine.every_image_token(prompt), "drop")


def kept_per_image(model, inputs, run_):
    """Original positions each image keeps for the last segment, per image (images in batch order)."""
    prompt, reduced = unreduced(model, inputs)
    kept = []
    for image in range(prompt.image_rows.shape[0]):
        row = int(prompt.image_rows[image])
        own = set(prompt.position_ids[row, prompt.image_positions[image]].tolist())
        columns = run_.kept_columns[row][run_.mask_high[row].bool()]
        kept.append(sorted(p for p in reduced.position_ids[row, columns].tolist() if p in own))
    return kept


def test_fastv_ranks_each_image_among_its_own_tokens(testbed, tiny_model, two_and_one):
    """Per image, the 5 tokens of that image the last prompt token attends to most in layer 1 (eager weights),
    not the 10 best of the two images together (here all ten would come from the first image)."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    prompt, reduced = unreduced(tiny_model, two_and_one)
    staged = engine.LanguageModelRun(tiny_model, reduced, stages=pdrop_stages(((2, 5),)))
    staged.prefill()
    kept = kept_per_image(tiny_model, two_and_one, staged)
    with torch.inference_mode():
        weights = eager(**two_and_one, position_ids=prompt.position_ids, output_attentions=True).attentions[1]
    last = weights[:, :, -1, :].mean(dim=1)  # (B, L)
    expected = []
    for image in range(3):
        row, columns = int(prompt.image_rows[image]), prompt.image_positions[image]
        top = last[row, columns].topk(5).indices
        expected.append(sorted(prompt.position_ids[row, columns[top]].tolist()))
    assert kept == expected and [len(k) for k in kept] == [5, 5, 5]
    both = torch.cat([prompt.image_positions[0], prompt.image_positions[1]])  # control: the span of both images
    together = sorted(prompt.position_ids[0, both[last[0, both].topk(10).indices]].tolist())
    assert together != sorted(kept[0] + kept[1])
    assert staged.image_tokens_seen.visible.tolist() == [[50, 50, 10], [25, 25, 5]]


def test_dart_and_pdrop_keep_their_budget_in_every_image(tiny_model, two_and_one):
    _, reduced = unreduced(tiny_model, two_and_one)
    dart = engine.LanguageModelRun(tiny_model, reduced, stages=dart_stage(2, 6))
    dart.prefill()
    assert [len(k) for k in kept_per_image(tiny_model, two_and_one, dart)] == [6, 6, 6]
    pdrop = engine.LanguageModelRun(tiny_model, reduced, stages=pdrop_stages(((1, 12), (2, 6))))
    pdrop.prefill()
    assert pdrop.image_tokens_seen.computed.tolist() == [[50, 24, 12], [25, 12, 6]]


@pytest.mark.parametrize("settings", [ReductionSettings(reduction="simignore", keep=7), ReductionSettings(reduction="random", keep=7),
                                      ReductionSettings(reduction="visionzip", keep=7)], ids=lambda s: s.reduction)
def test_pre_llm_and_vision_stages_keep_their_budget_in_every_image(tiny_model, processor, two_and_one, settings):
    reduced = engine.prepare_reduced_prompt(tiny_model, processor.tokenizer, engine.plan_for(tiny_model.config, settings), two_and_one,
                                            ["first second", "red blue"], [11, 12, 13])
    assert reduced.visible_image_tokens.tolist() == [14, 7]
    assert reduced.image_columns.shape == (3, 7) and reduced.image_rows.tolist() == [0, 0, 1]
    # cached decoding still equals recomputation with two images in a row
    assert torch.equal(run(tiny_model, processor, reduced), run(tiny_model, processor, reduced, use_cache=False))
