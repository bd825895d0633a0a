"""The `llava_simignore` lmms-eval classes, driven directly with lmms-eval Instances."""

import json

import pytest
import torch
from lmms_eval.api.instance import Instance

from lmms_simignore.models.llava_simignore import LlavaSimignore, LlavaSimignoreChat
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.testbed.tiny import scienceqa_like_records

TASK, SPLIT = "sqa_fixture", "test"
PROMPT_KWARGS = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}


@pytest.fixture(scope="module")
def docs():
    return scienceqa_like_records(num_docs=6, seed=1)  # the last doc has no image


def make_model(testbed, docs, model_class=LlavaSimignore, **model_args):
    model = model_class(pretrained=str(testbed["model"]), **model_args)
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def simple_requests(docs, **gen_kwargs):
    gen_kwargs = {"max_new_tokens": 6, "until": ["\n\n"], **gen_kwargs}
    return [
        Instance(
            "generate_until",
            (scienceqa_utils.doc_to_text(doc, PROMPT_KWARGS), dict(gen_kwargs), scienceqa_utils.doc_to_visual, doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


def chat_requests(docs):
    def doc_to_messages(doc):
        content = [{"type": "image", "url": image} for image in scienceqa_utils.doc_to_visual(doc)]
        return [{"role": "user", "content": content + [{"type": "text", "text": scienceqa_utils.doc_to_text(doc, PROMPT_KWARGS)}]}]

    return [
        Instance(
            "generate_until",
            ("", doc_to_messages, {"max_new_tokens": 6, "until": ["\n\n"]}, doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id in range(len(docs))
    ]


def test_answers_do_not_depend_on_the_batch_size(testbed, docs):
    args = dict(reduction="simignore", keep=8, apply="drop")
    one = make_model(testbed, docs, **args, batch_size=1).generate_until(simple_requests(docs))
    four = make_model(testbed, docs, **args, batch_size=4).generate_until(simple_requests(docs))
    assert one == four
    assert all(isinstance(answer, str) for answer in one)


def test_mask_and_drop_give_the_same_answers(testbed, docs):
    masked = make_model(testbed, docs, reduction="simignore", ignore=17, apply="mask", batch_size=3)
    dropped = make_model(testbed, docs, reduction="simignore", ignore=17, apply="drop", batch_size=3)
    assert masked.generate_until(simple_requests(docs)) == dropped.generate_until(simple_requests(docs))


def test_keep_all_equals_no_reduction(testbed, docs):
    none = make_model(testbed, docs).generate_until(simple_requests(docs))
    keep_all = make_model(testbed, docs, reduction="simignore", keep=1.0).generate_until(simple_requests(docs))
    keep_25 = make_model(testbed, docs, reduction="simignore", keep=25).generate_until(simple_requests(docs))
    assert none == keep_all == keep_25


def test_token_accounting_per_sample(testbed, docs):
    model = make_model(testbed, docs, reduction="simignore", keep=0.2, batch_size=2)
    model.generate_until(simple_requests(docs))
    records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
    assert [r["image_tokens"] for r in records] == [25] * 5 + [0]
    assert [r["visible_per_layer"] for r in records] == [[5, 5, 5]] * 5 + [[0, 0, 0]]  # text-only doc passes through
    assert [r["mean_visible"] for r in records] == [5.0] * 5 + [0.0]
    assert "visible per layer: layers 0-2: 5; average over layers 5.0 (20.0%)" in model.accounting.summary()


def test_masked_image_tokens_count_as_computed_but_not_visible(testbed, docs):
    model = make_model(testbed, docs[:2], reduction="simignore", keep=5, apply="mask", batch_size=2)
    model.generate_until(simple_requests(docs[:2]))
    assert [r["visible_per_layer"] for r in model.accounting.records] == [[5, 5, 5]] * 2
    assert [r["computed_per_layer"] for r in model.accounting.records] == [[25, 25, 25]] * 2


def test_token_log_writes_one_line_per_sample(testbed, docs, tmp_path):
    log = tmp_path / "tokens.jsonl"
    model = make_model(testbed, docs, reduction="fastv", fastv_layer=1, keep=7, token_log=str(log))
    model.generate_until(simple_requests(docs))
    records = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in records] == list(range(6))
    assert records[0]["visible_per_layer"] == [25, 7, 7]
    assert records[0]["mean_visible"] == pytest.approx(13.0)
    assert records[-1]["visible_per_layer"] == [0, 0, 0]


def test_chat_class_answers_like_the_simple_class_on_the_same_prompt(testbed, docs):
    """The fixture template renders `<image>\\n{text}` for both paths, so both classes see one prompt."""
    simple = make_model(testbed, docs, reduction="simignore", keep=10, batch_size=2)
    chat = make_model(testbed, docs, model_class=LlavaSimignoreChat, reduction="simignore", keep=10, batch_size=2)
    assert chat.generate_until(chat_requests(docs)) == simple.generate_until(simple_requests(docs))
    assert chat.is_simple is False and simple.is_simple is True


def test_llava_protocol_messages_give_one_system_prompt_then_the_user_turn(testbed, docs):
    from functools import partial

    from lmms_simignore.testbed.tiny import SYSTEM_PROMPT

    chat = make_model(testbed, docs, model_class=LlavaSimignoreChat, reduction="simignore", keep=10)
    custom = "You are a careful grader."
    to_messages = partial(scienceqa_utils.doc_to_messages_llava, lmms_eval_specific_kwargs=PROMPT_KWARGS)
    request = chat._prompt_request(("", to_messages, {}, 0, TASK, SPLIT))
    text = scienceqa_utils.doc_to_text(docs[0], PROMPT_KWARGS)
    assert request.prompt == f"{scienceqa_utils.LLAVA_SYSTEM_PROMPT} USER: <image>\n{text} ASSISTANT:"
    assert request.comparison_text == " ".join(docs[0]["choices"]) and len(request.images) == 1

    def with_custom_system(doc):
        return [{"role": "system", "content": [{"type": "text", "text": custom}]}] + to_messages(doc)[1:]

    assert chat._prompt_request(("", with_custom_system, {}, 0, TASK, SPLIT)).prompt == f"{custom} USER: <image>\n{text} ASSISTANT:"
    assert SYSTEM_PROMPT == scienceqa_utils.LLAVA_SYSTEM_PROMPT


def test_options_are_the_default_comparison_text(testbed, docs):
    model = make_model(testbed, docs, reduction="simignore", keep=10)
    request = model._prompt_request(simple_requests(docs)[0].args)
    assert request.comparison_text == " ".join(docs[0]["choices"])
    lettered = make_model(testbed, docs, reduction="simignore", keep=10, text="options_lettered")
    choices = docs[0]["choices"]
    assert lettered._prompt_request(simple_requests(docs)[0].args).comparison_text == (
        f"Options: (A) {choices[0]} (B) {choices[1]}" + "".join(f" ({'ABCD'[i]}) {c}" for i, c in enumerate(choices) if i > 1)
    )
    prompt_model = make_model(testbed, docs, reduction="simignore", keep=10, text="prompt")
    assert prompt_model._prompt_request(simple_requests(docs)[0].args).comparison_text.startswith(
        scienceqa_utils.doc_to_text(docs[0], PROMPT_KWARGS)[:20].strip()
    )


def test_docs_without_options_fall_back_to_the_prompt(testbed, docs):
    without_options = [{key: value for key, value in doc.items() if key != "choices"} | {"choices_hidden": doc["choices"]} for doc in docs]
    model = make_model(testbed, without_options, reduction="simignore", keep=10)
    args = list(simple_requests(docs)[0].args)
    request = model._prompt_request(tuple(args))
    assert request.comparison_text == args[0].strip()


def test_stop_strings_cut_the_answer(testbed, docs):
    model = make_model(testbed, docs)
    free = model.generate_until(simple_requests(docs, until=[]))
    stop = next(answer[2:4] for answer in free if len(answer) >= 4)
    cut = model.generate_until(simple_requests(docs, until=[stop]))
    for full, short in zip(free, cut):
        assert short == full.split(stop)[0]
    assert any(short != full for full, short in zip(free, cut))


def test_generation_errors_propagate(testbed, docs):
    model = make_model(testbed, docs)
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        model.generate_until(simple_requests(docs, num_beams=2))


def test_loglikelihood_is_the_mean_negative_log_likelihood_of_the_continuation_in_a_plain_forward(testbed, docs, tiny_model, processor):
    """lmms-eval's convention (its own llava classes return HF's loss; multiple choice takes the least)."""
    model = make_model(testbed, docs)
    doc = docs[0]
    context = scienceqa_utils.doc_to_text(doc, PROMPT_KWARGS)
    request = Instance("loglikelihood", (context, " B", scienceqa_utils.doc_to_visual, 0, TASK, SPLIT), idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    (loss, greedy), = model.loglikelihood([request])

    prompt = model._prompt_request((context, {}, scienceqa_utils.doc_to_visual, 0, TASK, SPLIT)).prompt
    image = scienceqa_utils.doc_to_visual(doc)
    short = processor(images=image, text=[prompt], return_tensors="pt")
    full = processor(images=image, text=[prompt + " B"], return_tensors="pt")
    n = full["input_ids"].shape[1] - short["input_ids"].shape[1]
    with torch.inference_mode():
        logits = tiny_model(**full).logits[0, -n - 1 : -1].float()
    target = full["input_ids"][0, -n:]
    expected = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()
    assert n > 1 and loss == pytest.approx(float(expected), rel=1e-4)
    assert greedy == bool((logits.argmax(-1) == target).all())


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"reduction": "simignore"}, "exactly one of keep"),
        ({"reduction": "simignore", "keep": 26}, "25 image tokens per image"),
        ({"reduction": "simignore", "ignore": 40}, "25 image tokens per image"),
        ({"reduction": "simignore", "keep": 5, "similarity": "jaccard"}, "similarity must be one of"),
        ({"reduction": "simignore", "keep": 5, "apply": "zero"}, "apply must be one of"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"keep_ratio": 0.5}, "unknown model_arg 'keep_ratio' for llava_simignore: did you mean `keep`"),
        ({"reduction": "fastv", "fastv_layers": 2}, "unknown model_arg 'fastv_layers' for llava_simignore: did you mean `fastv_layer`"),
        ({"batch_sise": 2}, "did you mean `batch_size`"),
        ({"reduction": "simignore", "keep": 5, "pdrop_ratio": 0.5}, "pdrop_ratio belongs to pdrop, which is not in reduction=simignore"),
    ],
)
def test_bad_model_args_fail_before_loading_weights(testbed, tmp_path, model_args, message):
    """The folder has only the config: an error about weights would mean we started loading them."""
    (tmp_path / "config.json").write_text((testbed["model"] / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        LlavaSimignore(pretrained=str(tmp_path), **model_args)


def test_non_llava_checkpoints_are_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        LlavaSimignore(pretrained=str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("pretrained", ["/no/such/dir", "./not-here", "owner/name/extra"])
def test_a_pretrained_that_is_neither_a_folder_nor_a_hub_id_is_refused_before_any_download(pretrained):
    with pytest.raises(ValueError, match=r"no such folder, and not a Hugging Face hub id \(owner/name\)"):
        LlavaSimignore(pretrained=pretrained)


def test_a_pretrained_file_is_refused_with_what_is_expected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; give the checkpoint's folder"):
        LlavaSimignore(pretrained=str(tmp_path / "model.safetensors"))


def test_hub_ids_and_folders_pass_through_unchanged(tmp_path):
    from lmms_simignore.shipped import resolve_pretrained

    assert resolve_pretrained("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_a_task_asking_for_square_images_gets_them_padded_with_the_processor_mean(testbed, docs):
    """image_aspect_ratio=pad (the LLaVA-protocol task's generation kwarg): each non-square image is centred on a square
    of the processor's mean colour before processing (the llava-hf processor would crop it), exactly as feeding images
    padded beforehand."""
    import numpy as np
    from PIL import Image

    wide = [dict(doc, image=doc["image"].crop((0, 0, 48, 30)) if doc["image"] is not None else None) for doc in docs]
    model = make_model(testbed, wide)
    colour = tuple(int(mean * 255) for mean in model.processor.image_processor.image_mean)  # CLIP's (122, 116, 104)

    def padded_by_hand(image):
        square = Image.new("RGB", (48, 48), colour)
        square.paste(image, (0, 9))
        return square

    by_hand = [dict(doc, image=padded_by_hand(doc["image"]) if doc["image"] is not None else None) for doc in wide]
    squared = model._squared([model._prompt_request(request.args) for request in simple_requests(wide)], "pad")
    assert all(np.array_equal(np.asarray(request.images[0]), np.asarray(doc["image"])) for request, doc in zip(squared, by_hand) if request.images)
    padded_answers = model.generate_until(simple_requests(wide, image_aspect_ratio="pad"))
    assert padded_answers == make_model(testbed, by_hand).generate_until(simple_requests(by_hand))
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of original, pad; got 'stretch'"):
        model.generate_until(simple_requests(wide, image_aspect_ratio="stretch"))
