"""The engine on a CUDA device (skipped without one): FastV, stacking and decoding in fp32, bf16 and nf4."""

import pytest
import torch
from test_engine import chat, encode, images, run, simignore_prompt
from test_fastv import eager_fastv_choice, kept_image_positions, unreduced

from lmms_simignore import engine
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.methods.fastv import fastv_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """Only the tiny model (GPU machines need not have the data stack installed)."""
    from lmms_simignore.testbed.tiny import build_tiny_llava

    return {"model": build_tiny_llava(tmp_path_factory.mktemp("gpu_testbed") / "tiny-llava")}


@pytest.fixture(scope="module")
def cuda_batch(processor):
    prompts = [
        chat(processor, "What colour?\nA. red\nB. blue"),
        chat(processor, "Context: a longer context line for the second row.\nWhich one?\nA. green\nB. blue\nC. yellow"),
    ]
    return encode(processor, prompts, images((200, 20, 20), (20, 20, 200))).to("cuda"), ["red blue", "green blue yellow"]


def load(testbed, **kwargs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(testbed["model"], **kwargs).eval()
    return model if "quantization_config" in kwargs else model.to("cuda")


def test_fastv_on_cuda_sdpa_matches_the_eager_rule_and_decodes_consistently(testbed, processor, cuda_batch):
    inputs, _ = cuda_batch
    model, eager = load(testbed, attn_implementation="sdpa"), load(testbed, attn_implementation="eager")
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    reduced = engine.reduce_prompt(prompt, engine.every_image_token(prompt), "mask")
    fastv = engine.LanguageModelRun(model, reduced, stages=fastv_stage(1, 9))
    fastv.prefill()
    assert kept_image_positions(fastv, prompt, reduced) == eager_fastv_choice(eager, inputs, 1, keep=9)
    cached = run(model, processor, reduced, use_cache=True, stages=fastv_stage(2, 6))
    assert cached.tolist() == run(model, processor, reduced, use_cache=False, stages=fastv_stage(2, 6)).tolist()
    assert cached.device.type == "cuda"


def test_stacked_pipeline_mask_equals_drop_on_cuda(testbed, processor, cuda_batch):
    inputs, texts = cuda_batch
    model = load(testbed)
    settings = ReductionSettings(reduction="simignore+fastv", keep=12, fastv_layer=1, fastv_keep=5)
    prompt, kept = simignore_prompt(model, processor, inputs, settings, texts)
    answers = [run(model, processor, engine.reduce_prompt(prompt, kept, a), stages=fastv_stage(1, 5)).tolist() for a in ("mask", "drop")]
    assert answers[0] == answers[1]


def test_random_choice_on_cuda_equals_the_cpu_choice(testbed, cuda_batch):
    inputs, _ = cuda_batch
    model = load(testbed)
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    settings = ReductionSettings(reduction="random", keep=7)
    on_cuda = engine.choose_kept_image_tokens(settings, prompt.image_features, image_seeds=[3, 4])
    on_cpu = engine.choose_kept_image_tokens(settings, prompt.image_features.cpu(), image_seeds=[3, 4])
    assert on_cuda.tolist() == on_cpu.tolist()


def test_bfloat16_fastv_generation_runs(testbed, processor, cuda_batch):
    inputs, _ = cuda_batch
    model = load(testbed, dtype=torch.bfloat16)
    reduced = unreduced(model, inputs)
    logits = engine.LanguageModelRun(model, reduced, stages=fastv_stage(1, 6)).prefill()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert run(model, processor, reduced, stages=fastv_stage(1, 6)).shape[0] == 2


def test_nf4_weights_work_with_fastv(testbed, processor, cuda_batch):
    pytest.importorskip("bitsandbytes")
    from lmms_simignore.models.quantization import nf4_quantization_config

    inputs, _ = cuda_batch
    quantized = load(testbed, quantization_config=nf4_quantization_config(torch.device("cuda")), device_map={"": "cuda"}, dtype=torch.float16)
    assert type(quantized.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not any(type(module).__name__ == "Linear4bit" for module in quantized.model.vision_tower.modules())
    reduced = unreduced(quantized, inputs)
    cached = run(quantized, processor, reduced, use_cache=True, stages=fastv_stage(1, 6))
    assert cached.tolist() == run(quantized, processor, reduced, use_cache=False, stages=fastv_stage(1, 6)).tolist()


def test_bench_runs_the_llava7b_shape_in_fp16_with_sdpa(tmp_path):
    """The GPU speed table's path: the exact LLaVA-1.5-7B shape with random weights, a short pass included."""
    import json
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "lmms_simignore", "bench", "--out", str(tmp_path), "--models", "llava7b-shape", "--batch-size", "1",
         "--warmup", "1", "--repeats", "1", "--decode-tokens", "2", "--pass-prompts", "4", "--pass-batch-sizes", "1,2"],
        capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["dtype"] == "torch.float16" and report["machine"]["gpu"]
    shape = report["models"]["llava7b-shape"]
    assert (shape["image_tokens"], shape["layers"]) == (576, 32)
    assert shape["rows"]["simignore_drop_50"]["computed_per_layer"] == [288] * 32
    assert report["scienceqa_pass"]["model"] == "llava7b-shape" and len(report["scienceqa_pass"]["results"]) == 6


def test_every_testbed_recipe_stage_trains_on_cuda(tmp_path):
    """A few steps of each stage on the GPU: the recipe's device handling, and the stages' hand-over on disk."""
    from lmms_simignore.testbed import llava_recipe
    from lmms_simignore.testbed.tower_pretraining import pretrain_tower

    quiet = dict(log=lambda line: None, device="cuda")
    tower = pretrain_tower(tmp_path / "tower", steps=2, batch_size=8, eval_every=2, held_out_size=8, **quiet)
    llava_recipe.pretrain_language_model(tmp_path / "lm", steps=2, batch_size=8, eval_every=2, **quiet)
    llava_recipe.align_projector(tmp_path / "stage1", tmp_path / "tower", tmp_path / "lm", steps=2, batch_size=8, eval_every=2, **quiet)
    summary = llava_recipe.tune_instructions(tmp_path / "model", tmp_path / "stage1", steps=2, batch_size=8, eval_every=2,
                                             held_out_size=16, **quiet)
    assert tower["device"] == summary["device"] == "cuda"
    assert set(summary["held_out"]["per_type"]) == {"colour", "shape", "exists", "count", "spatial"}
