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
                          "dart_50", "visiondrop_50", "simignore_drop_25", "simignore_mask_25", "random_drop_25", "fastv_25",
                          "visionzip_25", "dart_25", "visiondrop_25", "pool_25", "pdrop", "simignore_auto"]
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
    assert list(report["models"]) == ["testbed"] and len(report["models"]["testbed"]["rows"]) == 18
    # batch size 1 is kept whole (its rows were measured side by side); nothing of batch size 4
    assert [(r["batch_size"], r["row"]) for r in report["scienceqa_pass"]["results"]] == [
        (1, "none"), (1, "simignore_drop_288"), (1, "fastv_288")]
    assert "| 1 | fastv_288 |" in (tmp_path / "bench.md").read_text()


def test_the_mipha_shape_benches_every_method_its_siglip_tower_allows(tmp_path, monkeypatch):
    """Mipha-3B's shape, narrowed to run on a CPU: its rows (no VisionZip/VisionDrop: SigLIP has no CLS token) and what
    each of its layers computed on, through the head with its bias."""
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
    assert report["image_tokens"] == 16 and not any(name.startswith("vision") for name in report["rows"])
    assert report["rows"]["fastv_25"]["computed_per_layer"] == [16, 16, 4, 4]
    assert report["rows"]["pdrop"]["computed_per_layer"] == [16, 8, 4, 2]
