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
    assert (testbed["image_tokens"], testbed["layers"]) == (16, 4)
    rows = testbed["rows"]
    assert list(rows) == ["none", "simignore_drop_50", "simignore_mask_50", "random_drop_50", "fastv_50",
                          "simignore_drop_25", "simignore_mask_25", "random_drop_25", "fastv_25"]
    # what each layer computes on, and the ideal speed-up that follows from it
    assert rows["none"]["computed_per_layer"] == [16] * 4 and rows["none"]["ideal_prefill_speedup"] == 1.0
    assert rows["simignore_mask_50"]["computed_per_layer"] == [16] * 4 and rows["simignore_mask_50"]["ideal_prefill_speedup"] == 1.0
    assert rows["simignore_drop_50"]["computed_per_layer"] == [8] * 4
    assert rows["fastv_25"]["computed_per_layer"] == [16, 16, 4, 4]
    assert 1.0 < rows["fastv_50"]["ideal_prefill_speedup"] < rows["simignore_drop_50"]["ideal_prefill_speedup"] < rows["simignore_drop_25"]["ideal_prefill_speedup"]
    for result in rows.values():
        assert result["ttft_s"]["min"] <= result["ttft_s"]["median"] <= result["ttft_s"]["max"]
        assert result["decode_tokens_per_s"]["median"] > 0 and result["choice_s"]["median"] >= 0
    assert "| row | time to first token ms | LLM prefill ms" in (tmp_path / "bench.md").read_text()


def test_unknown_bench_model_is_refused_before_any_compute(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--models", "llava-70b", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "--models: unknown model 'llava-70b'" in completed.stderr
    assert not (tmp_path / "bench.json").exists()


def test_wrapper_overhead_compares_the_same_answers_with_the_builtin_llava_hf():
    import torch

    from lmms_simignore.bench import wrapper_overhead
    from lmms_simignore.shapes import HELD_OUT_SEED, shapes_records

    report = wrapper_overhead(shapes_records(6, seed=HELD_OUT_SEED), torch.device("cpu"), repeats=1, progress=lambda line: None)
    assert report["same_answers"] is True and report["prompts"] == 6
    assert set(report["seconds"]) == {"llava_simignore (reduction=none)", "llava_hf (built-in)"}
