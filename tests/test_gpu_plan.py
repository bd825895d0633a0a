"""The prepared GPU run's plan (`bench --preset gpu-numbers --plan`, `scripts/gpu-numbers.sh --dry-run`), offline:
estimates from the committed H100 run, no model built."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_simignore.bench import plan as planning

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "benchmarks/results/gpu-2026-11-26/bench.json"
METHODS_AT = ("simignore_drop", "simignore_mask", "random_drop", "fastv", "visionzip", "dart", "visiondrop", "divprune",
              "vispruner", "prumerge_plus", "sparsevlm")  # every method of the LLaVA-1.5 bench but pooling


@pytest.fixture(scope="module")
def gpu_numbers():
    return planning.plan_run("gpu-numbers", H100)


def _items(plan, step):
    return {estimate.item: estimate for estimate in plan.estimates if estimate.step == step}


def test_the_gpu_numbers_plan_fits_the_budget_and_the_10_minute_limit(gpu_numbers):
    assert gpu_numbers.total_s <= 9 * 60 < 10 * 60
    assert gpu_numbers.total_s == pytest.approx(sum(estimate.seconds for estimate in gpu_numbers.estimates))
    # the pass got what the rest left: at least 8 batches of 32, a whole number of them, at most the test split
    assert 256 <= gpu_numbers.pass_prompts <= 2017 and gpu_numbers.pass_prompts % 32 == 0
    assert gpu_numbers.estimates[0].step == "tests" and gpu_numbers.estimates[0].seconds == 80.99  # "in 80.99s"


def test_the_plan_lists_every_row_of_the_three_7b_shapes_and_the_six_pass_rows(gpu_numbers):
    llava = _items(gpu_numbers, "bench llava7b-shape")
    expected = {"none", "pool_25", "pdrop", "simignore_auto"} | {f"{method}_{percent}" for method in METHODS_AT for percent in (50, 25)}
    assert set(llava) - {"build and load"} == expected
    for shape in ("qwen2_5_vl7b-shape", "llava_next7b-shape"):
        rows = _items(gpu_numbers, f"bench {shape}")
        assert {"none", "simignore_drop_50", "fastv_25", "pdrop"} <= set(rows)
        assert all("extrapolated from llava7b-shape/none" in rows[row].source for row in rows if row != "build and load")
    for batch in (8, 32):
        rows = _items(gpu_numbers, f"pass batch {batch}")
        assert {"none", "simignore_drop_288", "fastv_288", "pdrop", "dart_288", "visionzip_288"} <= set(rows)
        assert rows["none"].seconds > rows["simignore_drop_288"].seconds > 0


def test_a_measured_row_is_its_bench_json_figures_recomputed(gpu_numbers):
    report = json.loads(H100.read_text())
    preset = planning.PRESETS["gpu-numbers"]
    fastv = report["models"]["llava7b-shape"]["rows"]["fastv_25"]
    rounds = preset.warmup + preset.repeats
    by_hand = rounds * (fastv["ttft_s"]["median"] + preset.decode_tokens * 4 / fastv["decode_tokens_per_s"]["median"])
    estimate = _items(gpu_numbers, "bench llava7b-shape")["fastv_25"]
    assert estimate.seconds == pytest.approx(by_hand) and estimate.source.startswith("measured")
    # the pass: seconds per prompt at batch 8 times the planned prompts
    none = next(r for r in report["scienceqa_pass"]["results"] if (r["batch_size"], r["row"]) == (8, "none"))
    assert _items(gpu_numbers, "pass batch 8")["none"].seconds == pytest.approx(none["seconds"] / 2017 * gpu_numbers.pass_prompts)
    assert _items(gpu_numbers, "pass batch 32")["none"].seconds == pytest.approx(none["seconds"] / 2017 * gpu_numbers.pass_prompts)


def test_rows_the_h100_did_not_time_are_scaled_by_flops_from_what_it_did(gpu_numbers):
    llava = _items(gpu_numbers, "bench llava7b-shape")
    assert llava["pdrop"].source.startswith("scaled by FLOPs from llava7b-shape/none")
    assert llava["visionzip_25"].seconds < llava["none"].seconds  # a quarter of the image tokens: less prefill
    assert "scaled by prefill FLOPs from simignore_drop_288" in _items(gpu_numbers, "pass batch 8")["dart_288"].source


def test_the_plan_counts_the_flops_the_h100_run_measured():
    """The planner's token counting (prompts through the processor, each row's nominal plan) gives the decoder FLOPs the
    H100 run counted from what each layer really computed."""
    from lmms_simignore.bench.flops import DecoderShape

    measured = json.loads(H100.read_text())["models"]["llava7b-shape"]
    prompts = planning.shape_prompts("llava7b-shape", 4)
    assert prompts.prompt_tokens == measured["prompt_tokens"]
    shape = DecoderShape.from_text_config(prompts.config.text_config)
    rows = {row.name: row for row in prompts.rows}
    for name, result in measured["rows"].items():
        fractions = planning.computed_fractions(planning.bench_family_plan(prompts, rows[name].settings))
        assert [round(f * 576) for f in fractions] == result["computed_per_layer"], name
        assert planning.batch_prefill_flops(shape, prompts.prompt_tokens, prompts.image_tokens, fractions) == result.get("layer_flops", result["prefill_flops"]), name  # before stage_flops: layers only


def test_a_budget_too_small_for_the_pass_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--budget-minutes: after the tests and the bench models, .* fewest 256 prompts"):
        planning.plan_run("gpu-numbers", H100, budget_minutes=7)
    with pytest.raises(ValueError, match="--budget-minutes: between 0 and 10"):
        planning.plan_run("gpu-numbers", H100, budget_minutes=11)
    with pytest.raises(ValueError, match="--preset: unknown preset 'gpu-everything'; allowed: gpu-numbers"):
        planning.plan_run("gpu-everything", H100)


def test_a_past_run_without_its_test_log_is_refused(tmp_path):
    (tmp_path / "bench.json").write_text(H100.read_text())
    with pytest.raises(ValueError, match="--plan-from .*bench.json: needs that bench.json and a test_gpu.log beside it"):
        planning.plan_run("gpu-numbers", tmp_path / "bench.json")


def test_the_test_duration_is_read_from_the_pytest_summary():
    assert planning.tests_seconds("=== 6 passed, 1 skipped in 80.99s (0:01:20) ===\n") == 80.99
    with pytest.raises(ValueError, match="test_gpu.log: no pytest duration"):
        planning.tests_seconds("collected 7 items\n")


def test_the_script_s_dry_run_prints_the_plan_and_its_total_without_a_gpu(tmp_path):
    completed = subprocess.run(["bash", str(ROOT / "scripts/gpu-numbers.sh"), "--dry-run"], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "gpu-run")}, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    total = re.search(r"^Total: (\d+) s = ([0-9.]+) min \(budget 9 min, limit 10 min\)", completed.stdout, re.MULTILINE)
    assert total and int(total[1]) <= 540
    assert f"--preset gpu-numbers --out {tmp_path / 'gpu-run'}" in completed.stdout
    assert re.search(r"^timeout-seconds tests=\d+$", completed.stdout, re.MULTILINE)
    assert "pass batch 32:" in completed.stdout and "llava_next7b-shape" in completed.stdout
    assert not (tmp_path / "gpu-run").exists()  # a dry run writes nothing


def test_the_cli_refuses_a_budget_too_small_before_any_compute(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--preset", "gpu-numbers", "--plan",
                                "--budget-minutes", "7", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                               cwd=ROOT)
    assert completed.returncode != 0 and "bench: --budget-minutes: after the tests and the bench models" in completed.stderr
    assert not (tmp_path / "run").exists()
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "bench", "--plan"], capture_output=True, text=True, timeout=300,
                               cwd=ROOT)
    assert completed.returncode != 0 and "--plan: plans a --preset run" in completed.stderr
