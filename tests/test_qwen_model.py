"""The `qwen2_vl_simignore`, `qwen2_5_vl_simignore` and `qwen3_vl_simignore` lmms-eval classes on tiny random
checkpoints of transformers' own Qwen-VL classes, driven with lmms-eval Instances: `reduction=none` answers as
lmms-eval's own classes do, and every method that applies runs with its budget per image, whatever the batch."""

import importlib

import pytest
from lmms_eval.api.instance import Instance

from lmms_simignore.evaluation.fingerprints import FINGERPRINT_ROWS, SMALL_IMAGES, fingerprint_docs, one_or_two_images
from lmms_simignore.models import qwen_vl_simignore as qwen_classes
from lmms_simignore.tasks import scienceqa_utils
from lmms_simignore.testbed.tiny_qwen import FAMILIES

pytest.importorskip("torchvision")  # transformers' Qwen-VL processors need it

TASK, SPLIT = "sqa_fixture", "test"
PROMPT_KWARGS = {"pre_prompt": "", "post_prompt": scienceqa_utils.POST_PROMPT}
SIMPLE = {"qwen2_vl": qwen_classes.Qwen2VLSimignore, "qwen2_5_vl": qwen_classes.Qwen2_5_VLSimignore,
          "qwen3_vl": qwen_classes.Qwen3VLSimignore}
CHAT = {"qwen2_5_vl": qwen_classes.Qwen2_5_VLSimignoreChat, "qwen3_vl": qwen_classes.Qwen3VLSimignoreChat}
BUILTIN_NAMES = {"qwen2_vl": "Qwen2_VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3_VL"}
METHODS = {name: model_args for name, model_args in FINGERPRINT_ROWS.items() if model_args}  # every method that applies


@pytest.fixture(scope="module")
def folders(qwen_folders):
    return qwen_folders


@pytest.fixture(scope="module")
def docs():
    """ScienceQA-shaped docs whose images all differ in size; the last has none."""
    return fingerprint_docs()


def simple_requests(docs, doc_to_visual=scienceqa_utils.doc_to_visual, **gen_kwargs):
    gen_kwargs = {"max_new_tokens": 6, "until": ["\n\n"], **gen_kwargs}
    return [Instance("generate_until", (scienceqa_utils.doc_to_text(doc, PROMPT_KWARGS), dict(gen_kwargs), doc_to_visual,
                                        doc_id, TASK, SPLIT), idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
            for doc_id, doc in enumerate(docs)]


def chat_requests(docs):
    def doc_to_messages(doc):
        content = [{"type": "image", "url": image} for image in scienceqa_utils.doc_to_visual(doc)]
        return [{"role": "user", "content": content + [{"type": "text", "text": scienceqa_utils.doc_to_text(doc, PROMPT_KWARGS)}]}]

    return [Instance("generate_until", ("", doc_to_messages, {"max_new_tokens": 6, "until": ["\n\n"]}, doc_id, TASK, SPLIT),
                     idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}) for doc_id in range(len(docs))]


def ours(folders, docs, family, model_class=None, **model_args):
    model = (model_class or SIMPLE[family])(pretrained=str(folders[family]), device="cpu", **model_args)
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def builtin(folders, docs, family, chat=False, **model_args):
    module = importlib.import_module(f"lmms_eval.models.{'chat' if chat else 'simple'}.{family}")
    model = getattr(module, BUILTIN_NAMES[family])(pretrained=str(folders[family]), device="cpu", device_map="cpu", **model_args)
    model.task_dict = {TASK: {SPLIT: docs}}
    return model


def texts(answers):
    return [getattr(answer, "text", answer) for answer in answers]  # lmms-eval's chat classes return GenerationResults


@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_none_answers_as_lmms_eval_s_own_simple_class(folders, docs, family):
    """Its defaults (dtype, pixel limits, system prompt, JPEG re-encoding or not, stop strings) on images of six sizes."""
    expected = builtin(folders, docs[:-1], family).generate_until(simple_requests(docs[:-1]))
    assert ours(folders, docs[:-1], family).generate_until(simple_requests(docs[:-1])) == expected


@pytest.mark.parametrize("family", sorted(CHAT))
def test_reduction_none_answers_as_lmms_eval_s_own_chat_class(folders, docs, family):
    expected = texts(builtin(folders, docs[:-1], family, chat=True).generate_until(chat_requests(docs[:-1])))
    assert ours(folders, docs[:-1], family, CHAT[family]).generate_until(chat_requests(docs[:-1])) == expected


def test_the_pixel_limits_and_system_prompt_are_the_builtin_s_arguments(folders, docs):
    args = dict(SMALL_IMAGES, system_prompt="Answer briefly.")
    expected = builtin(folders, docs[:-1], "qwen2_5_vl", **args).generate_until(simple_requests(docs[:-1]))
    model = ours(folders, docs[:-1], "qwen2_5_vl", **args)
    assert model.generate_until(simple_requests(docs[:-1])) == expected
    assert all(8 <= record["image_tokens"] <= 40 for record in model.accounting.records)


# -- every method that applies, budgets per image -------------------------------------------------------------------
def float32(folders, docs, family, model_class=None, **model_args):
    """Our class in float32 with small images (answers that do not hinge on bfloat16 rounding across batch shapes)."""
    return ours(folders, docs, family, model_class, dtype="float32", **SMALL_IMAGES, **model_args)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_batch_of_four_answers_as_each_prompt_alone_with_images_of_different_sizes(folders, docs, family, method):
    """One or two images per prompt, every image of its own size: batch 4 (cached) = batch 1 = batch 4 recomputed."""
    requests = simple_requests(docs, doc_to_visual=one_or_two_images)
    batched = float32(folders, docs, family, batch_size=4, **METHODS[method])
    answers = batched.generate_until(requests)
    assert answers == float32(folders, docs, family, batch_size=1, **METHODS[method]).generate_until(requests)
    assert answers == float32(folders, docs, family, batch_size=4, use_cache=False, **METHODS[method]).generate_until(requests)
    assert len(answers) == len(docs) and all(isinstance(answer, str) for answer in answers)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_answers_as_no_reduction(folders, docs, family):
    requests = simple_requests(docs, doc_to_visual=one_or_two_images)
    none = float32(folders, docs, family, batch_size=3).generate_until(requests)
    for model_args in (dict(reduction="random", keep=1.0), dict(reduction="fastv", fastv_layer=1, fastv_ratio=0.0),
                       dict(reduction="pool", keep=1.0)):
        assert float32(folders, docs, family, batch_size=3, **model_args).generate_until(requests) == none, model_args
    assert float32(folders, docs, family, batch_size=3, reduction="random", keep=0.2).generate_until(requests) != none


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_and_dropping_give_the_same_answers(folders, docs, family):
    requests = simple_requests(docs, doc_to_visual=one_or_two_images)
    masked = float32(folders, docs, family, batch_size=3, reduction="simignore", keep=0.3, apply="mask")
    dropped = float32(folders, docs, family, batch_size=3, reduction="simignore", keep=0.3, apply="drop")
    assert masked.generate_until(requests) == dropped.generate_until(requests)
    visible = [record["visible_per_layer"] for record in sorted(dropped.accounting.records, key=lambda r: r["doc_id"])]
    assert visible == [record["visible_per_layer"] for record in sorted(masked.accounting.records, key=lambda r: r["doc_id"])]


def test_token_accounting_counts_each_image_s_own_budget(folders, docs):
    """A fraction is of each image's own tokens (rounded half up), summed over a prompt's images, layer by layer."""
    model = float32(folders, docs, "qwen2_5_vl", batch_size=4, reduction="fastv", fastv_layer=1, keep=0.5)
    requests = simple_requests(docs, doc_to_visual=one_or_two_images)
    model.generate_until(requests)
    for record in model.accounting.records:
        images = model._prompt_request(requests[record["doc_id"]].args).images
        tokens = [(image.height // 28) * (image.width // 28) for image in images]  # one token per 28 x 28 block
        assert record["image_tokens"] == sum(tokens)
        assert record["visible_per_layer"] == [sum(tokens)] + [sum(int(n / 2 + 0.5) for n in tokens)] * 2
    assert sorted(record["image_tokens"] == 0 for record in model.accounting.records) == [False] * (len(docs) - 1) + [True]


# -- what is refused, before any weights load ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_args, message", [
    ({"reduction": "visionzip", "keep": 16}, "visionzip ranks patches by the CLS token's attention; the vision tower .* has no CLS token"),
    ({"reduction": "visiondrop", "keep": 16}, "visiondrop ranks patches by the CLS token's attention"),
    ({"reduction": "pdrop"}, "pdrop's stage at layer 1 re-packs the positions .* pass stage_positions=original"),
    ({"reduction": "random", "keep": 5000}, r"an image at max_pixels=1605632 has 2025 tokens \(45 x 45\): keep=5000 exceeds"),
    ({"reduction": "pool", "keep": 100}, "pool keeps 1/s² of each image"),
    ({"reduction": "divprune", "keep": 100}, "divprune closes up the positions .* not defined for qwen2_5_vl's multimodal rotary "
                                             "positions: pass divprune_positions=original"),
    ({"reduction": "sparsevlm", "sparsevlm_layers": "0/1", "sparsevlm_schedule": "100/50"},
     "sparsevlm's stage at layer 1 re-packs the positions .* pass stage_positions=original"),
    ({"reduction": "vispruner", "keep": 100}, "vispruner shortens each image inside the vision tower, .* qwen2_5_vl's ViT "
                                              "\\(windowed attention, 2x2 patch merger, no CLS token\\) is refused"),
    ({"enable_thinking": True}, "enable_thinking switches Qwen3-VL's chat template; qwen2_5_vl_simignore hosts qwen2_5_vl"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels=5000 exceeds max_pixels=4000"),
    ({"max_pixel": 4000}, "unknown model_arg 'max_pixel' for qwen2_5_vl_simignore: did you mean `max_pixels`"),
    ({"dtype": "float8"}, "dtype must be one of"),
])
def test_what_a_qwen_model_cannot_take_is_refused_before_loading_weights(folders, tmp_path, model_args, message):
    """The folder has only the config: an error about weights would mean we started loading them."""
    (tmp_path / "config.json").write_text((folders["qwen2_5_vl"] / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        qwen_classes.Qwen2_5_VLSimignore(pretrained=str(tmp_path), **model_args)


def test_a_checkpoint_of_another_family_is_refused_naming_the_class_that_hosts_it(folders, testbed):
    from lmms_simignore.models.llava_simignore import LlavaSimignore

    with pytest.raises(ValueError, match="qwen3_vl_simignore hosts qwen3_vl checkpoints; .* has model_type 'qwen2_5_vl'; "
                                         "for it use --model qwen2_5_vl_simignore"):
        qwen_classes.Qwen3VLSimignore(pretrained=str(folders["qwen2_5_vl"]))
    with pytest.raises(ValueError, match="has model_type 'llava'; for it use --model llava_simignore"):
        qwen_classes.Qwen2VLSimignore(pretrained=str(testbed["model"]))
    with pytest.raises(ValueError, match="has model_type 'qwen2_vl'; for it use --model qwen2_vl_simignore"):
        LlavaSimignore(pretrained=str(folders["qwen2_vl"]))


def test_a_request_with_a_video_is_refused_naming_the_doc(folders, docs):
    model = float32(folders, docs, "qwen2_vl")
    with pytest.raises(ValueError, match="task sqa_fixture doc 0: qwen2_vl_simignore takes PIL images, got str"):
        model.generate_until(simple_requests(docs[:1], doc_to_visual=lambda doc: ["clip.mp4"]))


def test_text_bos_is_refused_where_the_tokenizer_has_none(folders, docs):
    model = float32(folders, docs, "qwen3_vl", reduction="simignore", keep=0.5, text_bos=True)
    with pytest.raises(ValueError, match="text_bos=true .* this model's tokenizer has no BOS token"):
        model.generate_until(simple_requests(docs[:1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_without_reduction_is_the_model_s_own_forward(folders, docs, family):
    import torch

    model = float32(folders, docs, family)
    context = scienceqa_utils.doc_to_text(docs[1], PROMPT_KWARGS)
    request = Instance("loglikelihood", (context, " B.", scienceqa_utils.doc_to_visual, 1, TASK, SPLIT), idx=0,
                       metadata={"task": TASK, "doc_id": 1, "repeats": 1})
    (loss, greedy), = model.loglikelihood([request])
    prompt = model._prompt_request((context, {}, scienceqa_utils.doc_to_visual, 1, TASK, SPLIT))
    full = model.processor(text=[prompt.prompt + " B."], images=prompt.images, return_tensors="pt")
    count = len(model.tokenizer(prompt.prompt + " B.").input_ids) - len(model.tokenizer(prompt.prompt).input_ids)
    with torch.inference_mode():
        logits = model.model(**full).logits[0, -count - 1 : -1].float()
    target = full["input_ids"][0, -count:]
    assert loss == pytest.approx(-float(torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()), rel=1e-4)
    assert greedy == bool((logits.argmax(-1) == target).all())
