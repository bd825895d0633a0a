"""The speed benchmark as a smoke test (no timing assertions: speed belongs in benchmarks, not unit tests)."""

import json
import subprocess
import sys


def test_quick_bench_writes_every_row_with_its_flop_ideal(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--quick", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["quick"] is True and report["machine"]["torch"]
    testbed = report["models"]["testbed"]
    assert (testbed["image_tokens"], testbed["layers"]) == (64, 4)
    rows = testbed["rows"]
    assert list(rows) == ["none", "simignore_drop_50", "simignore_mask_50", "random_drop_50", "fastv_50", "visionzip_50",
                          "dart_50", "visiondrop_50", "divprune_50", "vispruner_50", "prumerge_plus_50", "sparsevlm_50",
                          "simignore_drop_25", "simignore_mask_25", "random_drop_25", "fastv_25", "visionzip_25", "dart_25",
                          "visiondrop_25", "divprune_25", "vispruner_25", "prumerge_plus_25", "sparsevlm_25", "pool_25",
                          "pdrop", "simignore_auto"]
    assert rows["pool_25"]["computed_per_layer"] == [16] * 4  # the 8 x 8 grid pooled 2 x 2
    auto = rows["simignore_auto"]  # each image its own number; dropped rows are padded to the batch's largest
    visible, computed = auto["visible_per_layer"], auto["computed_per_layer"]
    assert len(set(visible)) == len(set(computed)) == 1 and visible[0] <= computed[0] and visible[0] < 64
    # what each layer computes on, and the ideal speed-up that follows from it
    assert rows["none"]["computed_per_layer"] == [64] * 4 and rows["none"]["ideal_prefill_speedup"] == 1.0
    assert rows["simignore_mask_50"]["computed_per_layer"] == [64] * 4 and rows["simignore_mask_50"]["ideal_prefill_speedup"] == 1.0
    assert rows["simignore_drop_50"]["computed_per_layer"] == [32] * 4
    assert rows["fastv_25"]["computed_per_layer"] == [64, 64, 16, 16]
    assert rows["dart_25"]["computed_per_layer"] == [64, 64, 16, 16] and rows["visionzip_25"]["computed_per_layer"] == [16] * 4
    assert rows["pdrop"]["computed_per_layer"] == [64, 32, 16, 8]
    assert rows["visiondrop_25"]["computed_per_layer"] == [24, 18, 13, 10]  # its schedule scaled to an average of 16
    assert rows["divprune_25"]["computed_per_layer"] == rows["vispruner_25"]["computed_per_layer"] == [16] * 4
    assert rows["prumerge_plus_25"]["computed_per_layer"] == [16] * 4  # 15 chosen + the merged rest
    assert rows["sparsevlm_25"]["computed_per_layer"] == [64, 19, 9, 5]  # its 64-token schedule / 4: 17, 8, 4 + merged
    assert rows["visionzip_25"]["ideal_prefill_speedup"] == rows["simignore_drop_25"]["ideal_prefill_speedup"]
    assert 1.0 < rows["fastv_50"]["ideal_prefill_speedup"] < rows["simignore_drop_50"]["ideal_prefill_speedup"] < rows["simignore_drop_25"]["ideal_prefill_speedup"]
    for result in rows.values():
        assert result["ttft_s"]["min"] <= result["ttft_s"]["median"] <= result["ttft_s"]["max"]
        assert result["decode_tokens_per_s"]["median"] > 0 and result["choice_s"]["median"] >= 0
    assert "| row | time to first token ms | LLM prefill ms" in (tmp_path / "bench.md").read_text()
    # the quick ScienceQA-IMG-sized pass: 8 prompts through the lmms-eval class, per batch size and row
    timed = report["scienceqa_pass"]
    assert (timed["model"], timed["prompts"], timed["image_tokens"], timed["max_new_tokens"]) == ("paper-shaped", 8, 576, 1)
    assert [(r["batch_size"], r["row"]) for r in timed["results"]] == [
        (1, "none"), (1, "simignore_drop_288"), (1, "fastv_288"), (4, "none"), (4, "simignore_drop_288"), (4, "fastv_288")]
    # every prompt answered; image tokens per layer averaged over the 6 layers: 576, 288, (2 * 576 + 4 * 288) / 6
    assert all(r["answered"] == 8 for r in timed["results"])
    assert [r["mean_visible_image_tokens"] for r in timed["results"][:3]] == [576, 288, 384]
    assert all(r["speedup"] == 1.0 for r in timed["results"] if r["row"] == "none")
    # the rows took turns piece by piece: batch 1 in 8 pieces of one prompt, batch 4 in 2 pieces of four
    assert [r["pieces"] for r in timed["results"]] == [8, 8, 8, 2, 2, 2]
    assert all(r["speedup_spread"]["min"] <= r["speedup"] <= r["speedup_spread"]["max"] for r in timed["results"])
    assert 576 + 40 < timed["prompt_tokens"]["median"] <= timed["prompt_tokens"]["max"]
    assert "## ScienceQA-IMG-sized pass: 8 prompts on paper-shaped" in (tmp_path / "bench.md").read_text()
    assert "## Against the targets (CPU)" in (tmp_path / "bench.md").read_text()


def test_the_targets_are_judged_on_the_worst_row():
    """Hand-made numbers: the worst drop row decides the FLOP-ideal target, the worst choice share the 1% target."""
    from lmms_simignore.bench.speed import against_targets

    def row(vs_ideal, share):
        return {"prefill_speedup_vs_ideal": vs_ideal, "choice_share_of_prefill": share}

    report = {"machine": {"gpu": "H100"}, "wrapper_overhead": {"overhead": 0.03}, "models": {"m": {"rows": {
        "none": row(1.0, 0.5), "simignore_drop_50": row(0.95, 0.004), "random_drop_25": row(0.88, 0.009), "fastv_50": row(0.5, 0.02)}}}}
    lines = against_targets(report)
    assert lines[0] == "## Against the targets (H100)"
    assert "| m: drop-mode prefill speed-up >= 0.9 x ideal | worst 0.88 (random_drop_25) | no |" in lines
    assert "| m: token choice <= 1% of prefill | worst 2.0% (fastv_50) | no |" in lines
    assert "| wrapper overhead <= 2% against `llava_hf` | +3.0% | no |" in lines
    report["models"]["m"]["rows"] = {"none": row(1.0, 0.5), "simignore_drop_50": row(0.95, 0.004), "fastv_50": row(0.5, 0.01)}
    report["wrapper_overhead"]["overhead"] = -0.1
    lines = against_targets(report)
    assert "| m: drop-mode prefill speed-up >= 0.9 x ideal | worst 0.95 (simignore_drop_50) | yes |" in lines
    assert "| m: token choice <= 1% of prefill | worst 1.0% (fastv_50) | yes |" in lines
    assert "| wrapper overhead <= 2% against `llava_hf` | -10.0% | yes |" in lines


def test_unknown_bench_model_is_refused_before_any_compute(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--models", "llava-70b", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "--models: unknown model 'llava-70b'" in completed.stderr
    assert not (tmp_path / "bench.json").exists()


def test_bad_pass_arguments_are_refused_before_any_compute(tmp_path):
    for arguments, message in ((["--pass-batch-sizes", "0,8"], "--pass-batch-sizes positive"),
                               (["--pass-batch-sizes", "one"], "--pass-batch-sizes: comma-separated positive integers"),
                               (["--pass-model", "gpt"], "--pass-model: unknown model 'gpt'"),
                               (["--pass-rows", "none,fastv,sparsevlm"], "--pass-rows: unknown 'sparsevlm'; allowed: none, simignore"),
                               (["--pass-rows", "fastv"], "--pass-rows: fastv lacks none"),
                               (["--pass-data", str(tmp_path / "missing.parquet")], "no such file or folder")):
        completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--out", str(tmp_path), *arguments],
                                   capture_output=True, text=True, timeout=120)
        assert completed.returncode != 0 and message in completed.stderr, (arguments, completed.stderr[-2000:])
    assert not (tmp_path / "bench.json").exists()


def test_wrapper_overhead_compares_the_same_answers_with_the_builtin_llava_hf():
    import torch

    from lmms_simignore.bench.speed import wrapper_overhead
    from lmms_simignore.testbed.shapes import HELD_OUT_SEED, shapes_records

    report = wrapper_overhead(shapes_records(6, seed=HELD_OUT_SEED), torch.device("cpu"), repeats=1, progress=lambda line: None)
    assert report["same_answers"] is True and report["prompts"] == 6
    assert set(report["seconds"]) == {"llava_simignore (reduction=none)", "llava_hf (built-in)"}


def test_a_bench_stopped_part_way_keeps_the_rows_it_finished(tmp_path):
    import pytest

    from lmms_simignore.bench.speed import run_bench

    def stop_at_the_second_batch_size(line):
        if line.startswith("  pass batch 4 none"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(tmp_path, quick=True, echo=stop_at_the_second_batch_size)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["models"]) == ["testbed"] and len(report["models"]["testbed"]["rows"]) == 26
    # batch size 1 is kept whole (its rows were measured side by side); nothing of batch size 4
    assert [(r["batch_size"], r["row"]) for r in report["scienceqa_pass"]["results"]] == [
        (1, "none"), (1, "simignore_drop_288"), (1, "fastv_288")]
    assert "| 1 | fastv_288 |" in (tmp_path / "bench.md").read_text()


def test_the_mipha_shape_benches_every_method_its_siglip_tower_allows(tmp_path, monkeypatch):
    """Mipha-3B's shape, narrowed to run on a CPU: its rows (no VisionZip, VisionDrop or PruMerge+: SigLIP has no CLS
    token; VisPruner with its SigLIP rule) and what each of its layers computed on, through the head with its bias."""
    import torch

    from lmms_simignore.bench import llava_shapes
    from lmms_simignore.bench.speed import _resized, bench_model, load_bench_model
    from lmms_simignore.models import mipha
    from lmms_simignore.testbed import shapes

    for key, value in {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
                       "num_key_value_heads": 4}.items():
        monkeypatch.setitem(llava_shapes.PHI_2, key, value)
    for key, value in {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2,
                       "image_size": 56}.items():
        monkeypatch.setitem(mipha.SIGLIP_SO400M_384, key, value)
    folder = llava_shapes.write_random_shape("mipha3b-shape", tmp_path / "mipha", torch.device("cpu"), torch.float32)
    model, processor = load_bench_model(folder, torch.device("cpu"), torch.float32)
    assert model.lm_head.bias is not None
    records = _resized(shapes.shapes_records(2, seed=shapes.HELD_OUT_SEED), processor)
    report = bench_model(model, processor, records, 2, 0, 1, 2, progress=lambda line: None)
    assert report["image_tokens"] == 16 and not any(name.startswith(("vision", "prumerge")) for name in report["rows"])
    assert report["rows"]["vispruner_25"]["computed_per_layer"] == [4] * 4  # its SigLIP rule: the attention received
    assert report["rows"]["fastv_25"]["computed_per_layer"] == [16, 16, 4, 4]
    assert report["rows"]["pdrop"]["computed_per_layer"] == [16, 8, 4, 2]


# -- Qwen2.5-VL ----------------------------------------------------------------------------------------------------------
def test_the_qwen2_5_vl_7b_shape_is_the_released_config_and_its_processor_lmms_eval_s():
    """Every number of Qwen/Qwen2.5-VL-7B-Instruct's config.json (config only: no weights), its FLOP shape, and lmms-eval's
    pixel limits: a 1280 x 960 photo becomes 1288 x 952 pixels, 46 x 34 = 1564 image tokens."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lmms_simignore.bench.flops import DecoderShape, layer_flops
    from lmms_simignore.bench.qwen_shapes import qwen25_vl_7b_config, qwen25_vl_processor
    from lmms_simignore.testbed.tiny_qwen import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer("qwen2_5_vl")
    config = qwen25_vl_7b_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.hidden_act, text.rms_norm_eps, text.max_position_embeddings) == (
        152064, 3584, 18944, 28, 28, 4, "silu", 1e-6, 128000)
    assert (text.rope_parameters["rope_theta"], text.rope_parameters["mrope_section"]) == (1000000.0, [16, 24, 24])
    assert config.tie_word_embeddings is False and text.use_sliding_window is False
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.out_hidden_size,
            vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.window_size,
            list(vision.fullatt_block_indexes), vision.tokens_per_second, vision.hidden_act, vision.in_channels) == (
        32, 1280, 3420, 16, 3584, 14, 2, 2, 112, [7, 15, 23, 31], 2, "silu", 3)
    assert len(tokenizer) < text.vocab_size and config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # the FLOP model: 28 query heads and 4 key/value heads of 128; its projections and MLP are 2 FLOPs per weight of
    # the layer's linear maps (the q/k/v biases left out), counted on a weightless (meta) model of this config
    shape = DecoderShape.from_text_config(text)
    assert shape == DecoderShape(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    layer = model.model.language_model.layers[0]
    weights = sum(module.weight.numel() for module in layer.modules() if isinstance(module, torch.nn.Linear))
    assert layer_flops(shape, 1) - 2 * 2 * 28 * 128 == 2 * weights == 2 * 233_046_016
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656  # the released 8.29 B
    processor = qwen25_vl_processor(tokenizer)
    assert (processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]) == (256 * 28 * 28, 1605632)
    grid = processor.image_processor(images=[Image.new("RGB", (1280, 960))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 952 // 14, 1288 // 14]] and int(grid[0].prod()) // 4 == 34 * 46 == 1564


def test_the_qwen2_5_vl_7b_shape_writes_and_loads_as_a_qwen_bench_model(tmp_path, monkeypatch):
    """The 7B shape's writer, narrowed to run on a CPU: safetensors, processor and tokenizer that the bench loads as Qwen."""
    import torch

    from lmms_simignore.bench import qwen_shapes
    from lmms_simignore.bench.speed import QWEN_VL_FAMILY, bench_family, load_bench_model

    for key, value in {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2}.items():
        monkeypatch.setitem(qwen_shapes.QWEN25_VL_7B_TEXT, key, value)
    monkeypatch.setitem(qwen_shapes.QWEN25_VL_7B_TEXT, "rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0,
                                                                            "mrope_section": [2, 3, 3]})
    for key, value in {"depth": 2, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64,
                       "fullatt_block_indexes": [1]}.items():
        monkeypatch.setitem(qwen_shapes.QWEN25_VL_7B_VISION, key, value)
    folder = qwen_shapes.write_random_shape(tmp_path / "qwen", torch.device("cpu"), torch.float32)
    assert (folder / "model.safetensors").exists()
    model, processor = load_bench_model(folder, torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and bench_family(model.config) is QWEN_VL_FAMILY
    assert (model.config.text_config.num_key_value_heads, model.config.vision_config.window_size) == (2, 112)
    assert processor.image_processor.size["longest_edge"] == 1605632 and processor.tokenizer.padding_side == "left"


def test_the_qwen_tiny_bench_runs_the_qwen_rows_on_each_image_s_own_tokens(tmp_path):
    """A quick bench of the tiny Qwen2.5-VL alone (the named model kept, no pass): its rows in order, and what each of its
    3 layers computed on, from the 1280 x 960 photo's grid at the tiny processor's limits (16..64 tokens of 28 x 28)."""
    import math

    from qwen_vl_utils import smart_resize

    from lmms_simignore.bench.flops import DecoderShape, prefill_flops
    from lmms_simignore.bench.speed import run_bench

    height, width = smart_resize(960, 1280, factor=28, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
    grid_rows, grid_cols = height // 28, width // 28  # 6 x 9
    tokens = grid_rows * grid_cols

    def half_up(fraction):
        return int(tokens * fraction + 0.5)

    report = run_bench(tmp_path, models=("qwen-tiny",), quick=True, pass_prompts=0, device="cpu", echo=lambda line: None)
    assert list(report["models"]) == ["qwen-tiny"] and "scienceqa_pass" not in report
    assert json.loads((tmp_path / "bench.json").read_text())["models"]["qwen-tiny"]["rows"].keys() == report["models"]["qwen-tiny"]["rows"].keys()
    tiny = report["models"]["qwen-tiny"]
    assert (tiny["image_tokens"], tiny["layers"], tiny["batch_size"]) == (tokens, 3, 2)
    rows = tiny["rows"]
    assert list(rows) == ["none", "simignore_drop_50", "simignore_mask_50", "random_drop_50", "fastv_50", "dart_50",
                          "divprune_50", "simignore_drop_25", "simignore_mask_25", "random_drop_25", "fastv_25", "dart_25",
                          "divprune_25", "pool_25", "pdrop", "simignore_auto"]
    computed = {name: result["computed_per_layer"] for name, result in rows.items()}
    assert computed["none"] == [tokens] * 3 and rows["none"]["ideal_prefill_speedup"] == 1.0
    for percent, fraction in ((50, 0.5), (25, 0.25)):
        kept = half_up(fraction)  # 27, then 14 (13.5 rounded half up)
        assert computed[f"simignore_drop_{percent}"] == computed[f"random_drop_{percent}"] == [kept] * 3
        assert computed[f"simignore_mask_{percent}"] == [tokens] * 3 and rows[f"simignore_mask_{percent}"]["visible_per_layer"] == [kept] * 3
        assert computed[f"fastv_{percent}"] == computed[f"dart_{percent}"] == [tokens, tokens, kept]  # all before layer 2
        assert computed[f"divprune_{percent}"] == [kept] * 3
        assert rows[f"divprune_{percent}"]["settings"].endswith("divprune_positions=original)")  # M-RoPE: its own positions
    assert computed["pool_25"] == [math.ceil(grid_rows / 2) * math.ceil(grid_cols / 2)] * 3  # 3 x 5: partial last windows
    assert computed["pdrop"] == [tokens, half_up(0.5), int(half_up(0.5) / 2 + 0.5)]  # its layers 1 and 2 of 3, lambda 0.5
    assert rows["pdrop"]["settings"].endswith("stage_positions=original)")  # Qwen-VL refuses re-packing M-RoPE positions
    auto = rows["simignore_auto"]
    assert auto["visible_per_layer"][0] <= auto["computed_per_layer"][0] <= tokens
    # the ideal counts each row's own image tokens: text tokens = prompt tokens - the image's tokens
    shape = DecoderShape(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)  # TinyQwenShape's
    assert rows["simignore_drop_25"]["layer_flops"] == sum(prefill_flops(shape, [n - tokens + half_up(0.25)] * 3)
                                                           for n in tiny["prompt_tokens"])
    assert 1.0 < rows["fastv_50"]["ideal_prefill_speedup"] < rows["simignore_drop_50"]["ideal_prefill_speedup"] < rows["simignore_drop_25"]["ideal_prefill_speedup"]
    assert f"## qwen-tiny: {tokens} image tokens, 3 layers, batch 2" in (tmp_path / "bench.md").read_text()


def test_the_pass_times_pdrop_dart_and_visionzip_on_request(tmp_path):
    import torch

    from lmms_simignore.bench import scienceqa_pass
    from lmms_simignore.bench.speed import bench_checkpoint
    from lmms_simignore.testbed.tiny import build_tokenizer

    assert list(scienceqa_pass.pass_rows(576, 6)) == ["none", "simignore_drop_288", "fastv_288"]  # the default: as before
    folder = bench_checkpoint("paper-shaped", tmp_path, torch.device("cpu"), torch.float32)
    docs = scienceqa_pass.synthetic_docs(build_tokenizer(), 4)
    timed = scienceqa_pass.time_pass(folder, docs, (2,), torch.device("cpu"), "float32", progress=lambda line: None, chunks=2,
                                     methods=("none", "pdrop", "dart", "visionzip"))
    rows = {result["row"]: result for result in timed["results"]}
    assert list(rows) == ["none", "pdrop", "dart_288", "visionzip_288"]
    assert rows["pdrop"]["model_args"] == {"reduction": "pdrop"} and rows["dart_288"]["model_args"]["dart_layer"] == 2
    assert all(result["answered"] == 4 and result["pieces"] == 2 for result in rows.values())
    # image tokens per layer over paper-shaped's 6 layers: none 576; VisionZip 288 from the tower on; DART 576 before
    # its layer 2, 288 after; PyramidDrop 576, then halved after layers 2, 3 and 5 (a quarter, a half, three quarters)
    assert [rows[row]["mean_visible_image_tokens"] for row in ("none", "visionzip_288", "dart_288")] == [576, 288, (2 * 576 + 4 * 288) / 6]
    assert rows["pdrop"]["mean_visible_image_tokens"] == (2 * 576 + 288 + 2 * 144 + 72) / 6


def test_the_pass_runs_llava_models_only():
    import pytest

    from lmms_simignore.bench.speed import run_bench

    with pytest.raises(ValueError, match="--pass-model: unknown model 'qwen-tiny'; allowed: testbed, paper-shaped"):
        run_bench("unused", pass_model="qwen-tiny")


# -- LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: tiled images --------------------------------------------------------------
def test_the_tiled_7b_shapes_are_the_released_configs_and_their_processors_fill_every_tile():
    """Every number of llava-hf/llava-v1.6-vicuna-7b-hf's and llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json
    (config only: parameters counted on a weightless model), and the bench's images: the largest squares whose tiles all
    reach the LLM, 672 x 672 (2 x 2 tiles: 576 + 48 x 48 = 2880 image tokens, 48 newlines) and 1152 x 1152 (3 x 3 tiles:
    729 + 81 x 81 = 7290, 81 newlines; anyres_max_9 leaves 9 tiles whole)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lmms_simignore.bench.flops import DecoderShape
    from lmms_simignore.bench.speed import TILED_FAMILY, _full_tiles, bench_family
    from lmms_simignore.bench.tiled_shapes import (LLAVA_NEXT_7B_SHAPE, LLAVA_ONEVISION_7B_SHAPE, shape_config, shape_processor,
                                                   shape_tokenizer)
    from lmms_simignore.families.llava_next import largest_image_tokens

    def text_numbers(text):
        return (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
                text.num_key_value_heads, text.hidden_act, text.rms_norm_eps, text.max_position_embeddings,
                text.rope_parameters["rope_theta"], text.tie_word_embeddings)

    def vision_numbers(vision):
        return (vision.model_type, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers,
                vision.num_attention_heads, vision.patch_size, vision.image_size)

    released = {  # text, vision, (layer, strategy), parameters, full-tile side, base tokens, grid side
        LLAVA_NEXT_7B_SHAPE: ((32064, 4096, 11008, 32, 32, 32, "silu", 1e-5, 4096, 10000.0, False),
                              ("clip_vision_model", 1024, 4096, 24, 16, 14, 336), (-2, "default"), 7_063_431_168, 672, 576, 48),
        LLAVA_ONEVISION_7B_SHAPE: ((152128, 3584, 18944, 28, 28, 4, "silu", 1e-6, 32768, 1000000.0, False),
                                   ("siglip_vision_model", 1152, 4304, 26, 16, 14, 384), (-1, "full"), 8_030_807_584, 1152, 729, 81),
    }
    for name, (text, vision, features, parameters, side, base, grid) in released.items():
        tokenizer = shape_tokenizer(name)
        config = shape_config(name, tokenizer)
        assert text_numbers(config.text_config) == text and vision_numbers(config.vision_config) == vision, name
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == features
        assert config.projector_hidden_act == "gelu" and config.tie_word_embeddings is False
        assert bench_family(config) is TILED_FAMILY and len(tokenizer) < config.text_config.vocab_size
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == parameters, name  # the released 7.06 B and 8.03 B
        processor = shape_processor(name, tokenizer)
        assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
        image = _full_tiles([{"image": Image.new("RGB", (640, 480))}], processor)[0]["image"]
        assert image.size == (side, side)
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"}]}]
        prompt = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        placeholders = int((processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"] == config.image_token_id).sum())
        assert placeholders == base + grid * grid + grid, name  # the base view, then each grid row and its newline
    next_config = shape_config(LLAVA_NEXT_7B_SHAPE, shape_tokenizer(LLAVA_NEXT_7B_SHAPE))
    assert next_config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert (next_config.image_seq_length, largest_image_tokens(next_config)) == (576, 2880)
    assert DecoderShape.from_text_config(next_config.text_config) == DecoderShape(hidden=4096, intermediate=11008, heads=32,
                                                                                  kv_heads=32, head_dim=128)
    onevision = shape_config(LLAVA_ONEVISION_7B_SHAPE, shape_tokenizer(LLAVA_ONEVISION_7B_SHAPE))
    assert onevision.vision_config.vision_use_head is False and onevision.vision_aspect_ratio == "anyres_max_9"
    assert onevision.image_grid_pinpoints == [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]


def test_the_tiled_7b_shapes_write_and_load_as_tiled_bench_models(tmp_path, monkeypatch):
    """The 7B shapes' writer, narrowed to run on a CPU: safetensors and processor that the bench loads as tiled LLaVAs."""
    import torch

    from lmms_simignore.bench import llava_shapes, tiled_shapes
    from lmms_simignore.bench.speed import TILED_FAMILY, bench_family, load_bench_model

    small_text = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    small_tower = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    for key, value in small_text.items():
        monkeypatch.setitem(tiled_shapes.VICUNA_7B, key, value)
        monkeypatch.setitem(tiled_shapes.QWEN2_7B, key, value)
    for key, value in small_tower.items():
        monkeypatch.setitem(llava_shapes.CLIP_VIT_L_336, key, value)
        monkeypatch.setitem(tiled_shapes.SIGLIP_SO400M_26, key, value)
    monkeypatch.setitem(tiled_shapes.VICUNA_7B, "vocab_size", 512)
    monkeypatch.setitem(tiled_shapes.QWEN2_7B, "vocab_size", 512)
    for name, model_class in ((tiled_shapes.LLAVA_NEXT_7B_SHAPE, "LlavaNextForConditionalGeneration"),
                              (tiled_shapes.LLAVA_ONEVISION_7B_SHAPE, "LlavaOnevisionForConditionalGeneration")):
        folder = tiled_shapes.write_random_shape(name, tmp_path / name, torch.device("cpu"), torch.float32)
        assert (folder / "model.safetensors").exists()
        model, processor = load_bench_model(folder, torch.device("cpu"), torch.float32)
        assert type(model).__name__ == model_class and bench_family(model.config) is TILED_FAMILY
        assert model.config.text_config.num_key_value_heads == 2 and processor.tokenizer.padding_side == "left"
        assert processor.image_processor.image_grid_pinpoints == model.config.image_grid_pinpoints


def test_the_tiny_tiled_benches_run_the_rows_each_family_plans_on_each_image_s_own_tokens(tmp_path):
    """A quick bench of the tiny LLaVA-NeXT and LLaVA-OneVision (no pass): the rows their family plans (pooling at 25%:
    stride 2 on the base view and the tile grid; VisionZip and VisPruner on NeXT's CLIP views only; no VisionDrop on
    tiles; no SparseVLM, whose three pruning layers 3 layers cannot hold), and what
    each of their 3 layers computed on, counted from the processor: its placeholders for the full-tile image less one
    newline per row of the tile grid."""
    from lmms_simignore.bench.flops import DecoderShape, prefill_flops
    from lmms_simignore.bench.speed import run_bench
    from lmms_simignore.testbed.tiny import build_tokenizer
    from lmms_simignore.testbed.tiny_llava_next import NEXT_SHAPE, build_next_processor, build_onevision_processor

    tokenizer = build_tokenizer(NEXT_SHAPE.vocab_target)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    tile, side = NEXT_SHAPE.image_size, NEXT_SHAPE.image_size // NEXT_SHAPE.patch_size  # 24 px tiles of 4 x 4 tokens
    processors = {"llava_next-tiny": (build_next_processor(tokenizer), 2),  # (its processor, tiles per side of the image)
                  "llava_onevision-tiny": (build_onevision_processor(tokenizer), 3)}
    report = run_bench(tmp_path, models=tuple(processors), quick=True, pass_prompts=0, device="cpu", echo=lambda line: None)
    assert list(report["models"]) == list(processors) and "scienceqa_pass" not in report
    expected_rows = {name: ["none", "simignore_drop_50", "simignore_mask_50", "random_drop_50", "fastv_50", *zipped[0],
                            "dart_50", "divprune_50", *pruned[0], "simignore_drop_25", "simignore_mask_25", "random_drop_25",
                            "fastv_25", *zipped[1], "dart_25", "divprune_25", *pruned[1], "pool_25", "pdrop", "simignore_auto"]
                     for name, zipped, pruned in (("llava_next-tiny", (["visionzip_50"], ["visionzip_25"]), (["vispruner_50"], ["vispruner_25"])),
                                                  ("llava_onevision-tiny", ([], []), ([], [])))}
    for name, (processor, tiles) in processors.items():  # a square image of tiles x tiles tiles
        pixels = tiles * tile
        placeholders = processor._get_number_of_features(pixels, pixels, tile, tile)
        if processor.vision_feature_select_strategy == "default":  # LLaVA-1.6's CLS, counted then dropped
            placeholders -= 1
        _, newlines = processor._get_unpadded_features(pixels, pixels, side, side, tiles, tiles)
        tokens = placeholders - newlines
        assert (tokens, newlines) == (side * side + (tiles * side) ** 2, tiles * side)  # 16 + 8 x 8 = 80; 16 + 12 x 12 = 160
        half, quarter = int(tokens * 0.5 + 0.5), int(tokens * 0.25 + 0.5)  # each image's budget, rounded half up
        tiny = report["models"][name]
        assert (tiny["image_tokens"], tiny["layers"], tiny["batch_size"]) == (tokens, 3, 2), name
        rows = tiny["rows"]
        assert list(rows) == expected_rows[name], name
        computed = {row: result["computed_per_layer"] for row, result in rows.items()}
        pooled = (side // 2) ** 2 + (tiles * side // 2) ** 2  # 4 + 16 = 20; 4 + 36 = 40
        assert computed["pool_25"] == [pooled] * 3, name
        if name == "llava_next-tiny":  # 5 views: a fifth of 40 or 20 in each, 7 + 1 or 3 + 1
            assert computed["visionzip_50"] == [5 * 8] * 3 and computed["visionzip_25"] == [5 * 4] * 3
            assert computed["vispruner_50"] == [5 * 8] * 3 and computed["vispruner_25"] == [5 * 4] * 3  # no padding to leave
        assert computed["none"] == [tokens] * 3 and rows["none"]["ideal_prefill_speedup"] == 1.0
        for percent, kept in ((50, half), (25, quarter)):
            assert computed[f"simignore_drop_{percent}"] == computed[f"random_drop_{percent}"] == [kept] * 3, name
            assert computed[f"simignore_mask_{percent}"] == [tokens] * 3
            assert rows[f"simignore_mask_{percent}"]["visible_per_layer"] == [kept] * 3
            assert computed[f"fastv_{percent}"] == computed[f"dart_{percent}"] == [tokens, tokens, kept]  # all before layer 2
            assert computed[f"divprune_{percent}"] == [kept] * 3, name
        assert computed["pdrop"] == [tokens, half, int(half / 2 + 0.5)]  # its layers 1 and 2 of 3, lambda 0.5
        assert rows["pdrop"]["settings"] == "ReductionSettings(reduction=pdrop, apply=drop, seed=0)"  # its own 1-D rule
        auto = rows["simignore_auto"]
        assert auto["visible_per_layer"][0] <= auto["computed_per_layer"][0] <= tokens
        # the ideal counts the newlines with the text: text tokens = prompt tokens - the image's tokens
        shape = DecoderShape(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)  # NEXT_SHAPE's decoder
        assert rows["simignore_drop_25"]["layer_flops"] == sum(prefill_flops(shape, [n - tokens + quarter] * 3)
                                                               for n in tiny["prompt_tokens"])
        assert f"## {name}: {tokens} image tokens, 3 layers, batch 2" in (tmp_path / "bench.md").read_text()


def test_per_image_rows_are_the_ones_the_family_plans():
    """The rows follow the family's refusals, not a list of names: a family that plans only Simignore keeps none (no
    stage) and Simignore's rows; one that refuses re-packed positions gets PyramidDrop with each token at its own."""
    from lmms_simignore.bench.rows import per_image_bench_rows

    def simignore_only(settings):
        if settings.reduction not in ("none", "simignore"):
            raise ValueError(f"{settings.reduction} refused")

    assert [row.name for row in per_image_bench_rows(4, simignore_only)] == [
        "none", "simignore_drop_50", "simignore_mask_50", "simignore_drop_25", "simignore_mask_25", "simignore_auto"]

    def original_positions_only(settings):
        if settings.reduction == "pdrop" and settings.stage_positions != "original":
            raise ValueError("re-packed positions refused")

    pdrop = next(row for row in per_image_bench_rows(4, original_positions_only) if row.name == "pdrop")
    assert pdrop.settings.stage_positions == "original"

    def own_positions_refused(settings):
        if settings.reduction == "divprune" and "divprune_positions" not in dict(settings.given):
            raise ValueError("contiguous positions refused")
        if settings.reduction == "sparsevlm" and settings.stage_positions != "original":
            raise ValueError("re-packed positions refused")

    rows = {row.name: row.settings for row in per_image_bench_rows(8, own_positions_refused)}
    assert [dict(rows[f"divprune_{percent}"].given) for percent in (50, 25)] == [{"divprune_positions": "original"}] * 2
    assert [rows[f"sparsevlm_{percent}"].stage_positions for percent in (50, 25)] == ["original"] * 2
