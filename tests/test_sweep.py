"""Configs under configs/: parsing, the exact commands, and the attribution table end to end through lmms-eval."""

import math
from pathlib import Path

import pytest

from lmms_simignore.bench import qwen_shapes, tiled_shapes
from lmms_simignore.evaluation.sweep import format_model_args, load_config, row_runs, run_sweep
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed.tiny_qwen import build_qwen_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_model_args_are_spelled_for_lmms_eval():
    assert format_model_args({"reduction": "simignore+fastv", "keep": 0.5, "text_bos": True}) == (
        "reduction=simignore+fastv,keep=0.5,text_bos=true"
    )
    with pytest.raises(ValueError, match="cannot hold ','"):
        format_model_args({"chat_template": "a,b"})


def test_rows_override_shared_args_and_set_overrides_everything(tmp_path):
    config = load_config(CONFIGS / "attribution.yaml", overrides={"quantization": "nf4"})
    runs = {run.name: run for run in row_runs(config, tmp_path)}
    assert "pretrained=llava-hf/llava-1.5-7b-hf,reduction=none" in runs["baseline"].model_args
    assert "preset=simignore_paper_7b,quantization=nf4" in runs["paper_preset"].model_args  # --set beats the row
    command = runs["simignore_mask"].command()
    assert command[command.index("--model_args") + 1].endswith(f"token_log={tmp_path / 'simignore_mask'}/tokens.jsonl")
    assert command[command.index("--tasks") + 1] == "scienceqa_img_llava"


@pytest.mark.parametrize(
    "text, message",
    [("rows: []\n", "non-empty `rows:`"), ("tasks: t\nrows: [{model_args: {}}]\n", "needs a `name:`"),
     ("tasks: t\nrows: [{name: a}, {name: a}]\n", "appears twice"), ("rows: [{name: a}]\n", "give `tasks:`"),
     ("tasks: t\nrow: []\nrows: [{name: a}]\n", r"unknown keys \['row'\]")],
)
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


@pytest.fixture(scope="module")
def paper_shaped_testbed(tmp_path_factory):
    from lmms_simignore.testbed.tiny import PAPER_SHAPED, build_offline_testbed

    return build_offline_testbed(tmp_path_factory.mktemp("paper_shaped"), num_docs=4, seed=0, shape=PAPER_SHAPED)


ATTRIBUTION_LAYERS = {  # image tokens each of the paper-shaped model's 6 layers sees, per row of attribution.yaml
    "baseline": [576] * 6,
    "simignore_mask": [452] * 6,
    "simignore_drop": [452] * 6,
    "fastv_k5_keep144": [576] * 5 + [144],
    "fastv_k2_r50": [576] * 2 + [288] * 4,
    "simignore_fastv": [452] * 5 + [144],
    "paper_preset": [452] * 5 + [144],
    "random_ignore124": [452] * 6,
    "random_fastv": [452] * 5 + [144],
    "random_keep144": [144] * 6,
}
# rows that run through lmms-eval (each mechanism once: mask, drop, a pipeline, a preset); every row is planned
ATTRIBUTION_RUN = ("baseline", "simignore_mask", "simignore_drop", "simignore_fastv", "paper_preset")


def test_attribution_config_plans_the_paper_budgets_on_a_model_of_llava_1_5_s_geometry(paper_shaped_testbed):
    """Every row of configs/attribution.yaml, planned as the model class plans it, on a toy model of LLaVA-1.5's token
    geometry (576 image tokens, FastV at layer 5)."""
    from transformers import AutoConfig

    from lmms_simignore.models.presets import reduction_settings_of

    config = load_config(CONFIGS / "attribution.yaml")
    model = AutoConfig.from_pretrained(paper_shaped_testbed["model"])
    planned_layers = {row.name: planned(model, reduction_settings_of(row.model_args)).visible_per_layer() for row in config.rows}
    assert planned_layers == ATTRIBUTION_LAYERS


def test_attribution_rows_run_end_to_end_offline(paper_shaped_testbed, tmp_path):
    """Rows of configs/attribution.yaml through the real lmms-eval CLI, with the paper's budgets: the image tokens each
    layer saw, as counted while the model ran, are the planned ones; mask = drop through the CLI."""
    config = load_config(CONFIGS / "attribution.yaml", overrides={"pretrained": str(paper_shaped_testbed["model"])},
                         tasks="scienceqa_img_local", only_rows=",".join(ATTRIBUTION_RUN))
    lines = []
    summaries = run_sweep(
        config, tmp_path / "attribution", include_path=paper_shaped_testbed["tasks"], extra_args=("--limit", "3"), echo=lines.append
    )
    rows = {summary["name"]: summary for summary in summaries}
    assert list(rows) == list(ATTRIBUTION_RUN)
    assert {name: row["visible_per_layer"] for name, row in rows.items()} == {name: ATTRIBUTION_LAYERS[name] for name in ATTRIBUTION_RUN}
    assert rows["simignore_fastv"]["mean_visible"] == pytest.approx((5 * 452 + 144) / 6)
    assert all(len(row["answers"]["scienceqa_img_local"]) == 3 for row in rows.values())
    assert rows["simignore_mask"]["answers"] == rows["simignore_drop"]["answers"]  # mask = drop, through the CLI
    assert rows["simignore_fastv"]["answers"] != rows["baseline"]["answers"]
    table = (tmp_path / "attribution" / "table.md").read_text()
    assert "| simignore_fastv | 0.0000 | layers 0-4: 452, layer 5: 144 | 400.7 / 576 |" in table
    assert any("[5/5] paper_preset: running" in line for line in lines)
    printed = [line for line in lines if line.startswith("  $ ")]  # the command each row really ran
    assert len(printed) == 5 and "{run_dir}" not in "".join(printed)
    assert f"token_log={tmp_path / 'attribution' / 'paper_preset.partial'}/tokens.jsonl" in printed[-1]


PEER_ROWS_OFFLINE = ("visionzip_64", "dart_64", "pdrop_64", "visiondrop_64", "divprune_64", "vispruner_64",
                     "prumerge_plus_64", "sparsevlm_64")  # what attribution.yaml lacks


def test_peer_rows_run_offline_on_the_paper_shaped_model(paper_shaped_testbed, tmp_path):
    """configs/peers.yaml as written (stage layers as fractions of the depth) on a 6-layer toy with 576 image
    tokens, through the real lmms-eval CLI: the image tokens each layer saw, counted from the runs."""
    config = load_config(CONFIGS / "peers.yaml", overrides={"pretrained": str(paper_shaped_testbed["model"])},
                         tasks="scienceqa_img_local", only_rows=",".join(PEER_ROWS_OFFLINE))
    summaries = run_sweep(config, tmp_path / "peers", include_path=paper_shaped_testbed["tasks"], extra_args=("--limit", "2"),
                          echo=lambda line: None)
    assert {summary["name"]: summary["visible_per_layer"] for summary in summaries} == {
        "visionzip_64": [64] * 6,
        "dart_64": [576] * 2 + [64] * 4,
        "pdrop_64": [576, 109, 21, 4, 4, 4],  # layers 2/8/16 of 32 are 1/2/3 of 6
        "visiondrop_64": [96, 96, 70, 52, 52, 38],  # 84+12 in the tower, then 60+10, 44+8, 32+6 after layers 2/3/5 of 6
        "divprune_64": [64] * 6,
        "vispruner_64": [64] * 6,
        "prumerge_plus_64": [64] * 6,
        "sparsevlm_64": [576, 82, 32, 32, 18, 18],  # after layers 2/6/15 of 32 = 0/1/3 of 6: 66 + 16 merged, 30 + 2, 17 + 1
    }
    assert all(len(summary["answers"]["scienceqa_img_local"]) == 2 for summary in summaries)


def test_a_sweep_can_run_some_of_its_rows(tmp_path):
    config = load_config(CONFIGS / "peers.yaml", only_rows="dart_64,baseline")
    assert [row.name for row in config.rows] == ["baseline", "dart_64"]  # the config's order
    with pytest.raises(ValueError, match="no row named dart_65; the rows are baseline, simignore_192"):
        load_config(CONFIGS / "peers.yaml", only_rows="dart_64,dart_65")


@pytest.fixture(scope="module")
def geometry() -> dict:
    """Each config's model's llava config (its image-token geometry: tokens per image, grid, decoder layers; its tower)."""
    from transformers import AutoConfig

    from lmms_simignore.bench.llava_shapes import HUB_IDS, shape_config
    from lmms_simignore.shipped import resolve_pretrained
    from lmms_simignore.testbed.tiny import build_tokenizer

    configs = {hub_id: shape_config(name, build_tokenizer()) for name, hub_id in HUB_IDS.items()}
    configs["shipped:shapes-llava"] = AutoConfig.from_pretrained(resolve_pretrained("shipped:shapes-llava"))
    configs[qwen_shapes.HUB_ID] = qwen_shapes.qwen25_vl_7b_config(build_qwen_tokenizer(qwen_shapes.FAMILY))
    for name, hub_id in tiled_shapes.HUB_IDS.items():
        configs[hub_id] = tiled_shapes.shape_config(name, tiled_shapes.shape_tokenizer(name))
    return configs


def planned(model_config, settings):
    """The settings planned as the model class plans them, refusals included: for one image of the model's (LLaVA-1.5),
    for an image at lmms-eval's max_pixels (Qwen-VL) or for the largest image (LLaVA-NeXT: its images have their own
    sizes)."""
    from lmms_simignore.engine import plan_for
    from lmms_simignore.families import llava_next, qwen_vl
    from lmms_simignore.models.qwen_vl_simignore import BUILTIN_CLASSES

    if model_config.model_type in qwen_vl.MODEL_TYPES:
        return qwen_vl.nominal_plan(model_config, settings, BUILTIN_CLASSES[model_config.model_type].max_pixels)
    if model_config.model_type in llava_next.MODEL_TYPES:
        return llava_next.nominal_plan(model_config, settings)
    return plan_for(model_config, settings)



@pytest.mark.parametrize("config_path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_row_of_every_config_is_a_valid_reduction_for_its_model(config_path, tmp_path, geometry):
    """Checked before any run: the settings parse and the budgets fit the model (as the model would refuse them)."""
    from lmms_simignore.models.presets import reduction_settings_of

    config = load_config(config_path)
    for row in config.rows:
        args = {**config.model_args, **row.model_args}
        model = geometry[args["pretrained"]]
        plan = planned(model, reduction_settings_of(args))
        visible = plan.visible_per_layer()
        assert len(visible) == model.text_config.num_hidden_layers, row.name
        assert all(0 <= count <= plan.image_tokens for count in visible), row.name
    assert len(row_runs(config, tmp_path)) == len(config.rows)


def test_paper_tables_name_the_published_budgets():
    table2 = load_config(CONFIGS / "table2.yaml")
    assert [row.model_args.get("ignore") for row in table2.rows[1:]] == [72, 124, 144, 216, 288, 360, 432, 504, 576]
    peers = load_config(CONFIGS / "peers.yaml")
    assert {row.name: row.reported["value"] for row in peers.rows if row.reported and row.name.startswith("fastv")} == {
        "fastv_192": 67.3, "fastv_128": 60.2, "fastv_64": 51.1}
    table1 = load_config(CONFIGS / "table1.yaml")
    assert [row.reported["value"] for row in table1.rows] == [65.15, 68.02, 72.09, 73.23, 70.40, 70.85]


def test_peer_rows_keep_what_their_name_says_on_llava_1_5(geometry):
    """N tokens: N in every layer, except FastV and DART (all 576 in layers 0-1, as their papers count) and the
    multi-stage methods, whose average over the 32 layers is N (within a token)."""
    from lmms_simignore.engine import plan_for
    from lmms_simignore.settings import ReductionSettings

    model = geometry["llava-hf/llava-1.5-7b-hf"]
    layers = model.text_config.num_hidden_layers
    for row in load_config(CONFIGS / "peers.yaml").rows[1:]:
        method, budget = row.name.rsplit("_", 1)
        visible = plan_for(model, ReductionSettings(**row.model_args)).visible_per_layer()
        if method in ("fastv", "dart"):
            assert visible == [576] * 2 + [int(budget)] * 30, row.name
        elif method in ("pdrop", "visiondrop"):
            assert abs(sum(visible) / layers - int(budget)) < 1 and len(set(visible)) == 4, row.name
        elif method == "sparsevlm":  # its code's schedule for N: all 576 up to its first pruning layer (2), then 3 stages
            assert visible[:3] == [576] * 3 and len(set(visible)) == 4, row.name
        else:
            assert visible == [int(budget)] * layers, row.name


def test_qwen_peer_rows_run_offline_on_a_tiny_qwen(testbed, tmp_path):
    """configs/peers_qwen2_5_vl.yaml as written on the fixtures' tiny Qwen2.5-VL (8 decoder layers; the task's small
    images become 16 x 16 = 256 tokens at lmms-eval's min_pixels) through `--model qwen2_5_vl_simignore`."""
    from lmms_simignore.testbed.tiny_qwen import FIXTURE_SHAPE, build_tiny_qwen

    pytest.importorskip("torchvision")
    folder = build_tiny_qwen(tmp_path / "tiny-qwen2_5_vl", "qwen2_5_vl", shape=FIXTURE_SHAPE)
    config = load_config(CONFIGS / "peers_qwen2_5_vl.yaml", overrides={"pretrained": str(folder)}, tasks="scienceqa_img_local",
                         only_rows="baseline,pdrop_22,pool_11,sparsevlm_11")
    summaries = run_sweep(config, tmp_path / "peers", include_path=testbed["tasks"], extra_args=("--limit", "2"),
                          echo=lambda line: None)
    assert {summary["name"]: summary["visible_per_layer"] for summary in summaries} == {
        "baseline": [256] * 8,
        "pdrop_22": [256, 105, 43, 43, 18, 18, 18, 18],  # layers 2/7/14 of 28 are 1/2/4 of 8; 256 x 0.41, ...
        "pool_11": [36] * 8,  # stride 3 on 16 x 16: 5 whole windows and a partial one per side
        # 11.1% of 256 is 28: its 64 schedule x 28/64 = 29/13/7 kept after layers 1/2/4 (2/6/15 of 32), + 7, 1, 1 merged
        "sparsevlm_11": [256, 256, 29 + 7, 13 + 1, 13 + 1, 7 + 1, 7 + 1, 7 + 1],
    }


def test_llava_next_peer_rows_keep_the_tokens_their_name_says_of_a_full_tile_image(geometry):
    """On LLaVA-1.6-7B's largest image (2880 image tokens): N in every layer, from layer 2 for FastV and DART, on average
    over the 32 layers for PyramidDrop (within a token)."""
    config = load_config(CONFIGS / "peers_llava_next.yaml")
    model = geometry[config.model_args["pretrained"]]
    for row in config.rows[1:]:
        method, budget = row.name.rsplit("_", 1)
        visible = planned(model, ReductionSettings(**row.model_args)).visible_per_layer()
        if method in ("fastv", "dart"):
            assert visible == [2880] * 2 + [int(budget)] * 30, row.name
        elif method == "pdrop":
            assert abs(sum(visible) / 32 - int(budget)) < 1 and len(set(visible)) == 4, row.name
        elif method == "sparsevlm":  # its schedule for N: every token up to its first pruning layer (2), then 3 stages
            assert visible[:3] == [2880] * 3 and len(set(visible)) == 4 and visible[3] > int(budget) > visible[-1], row.name
        else:
            assert visible == [int(budget)] * 32, row.name


def test_llava_next_peer_rows_run_offline_on_the_fixtures_tiny_llava_next(testbed, tmp_path):
    """configs/peers_llava_next.yaml as written on the fixtures' tiny LLaVA-NeXT (8 decoder layers), through lmms-eval."""
    from lmms_simignore.testbed.tiny_llava_next import FIXTURE_SHAPE, build_tiny_llava_next

    folder = build_tiny_llava_next(tmp_path / "tiny-llava_next", shape=FIXTURE_SHAPE)
    config = load_config(CONFIGS / "peers_llava_next.yaml", overrides={"pretrained": str(folder)}, tasks="scienceqa_img_local",
                         only_rows="baseline,pdrop_320,dart_160,visionzip_160,pool_320,vispruner_160")
    summaries = {summary["name"]: summary["visible_per_layer"] for summary in run_sweep(
        config, tmp_path / "peers", include_path=testbed["tasks"], extra_args=("--limit", "2"), echo=lambda line: None)}
    tokens = summaries["baseline"][0]  # the task's 48 px images: their base view and grid, newlines not counted
    assert summaries["baseline"] == [tokens] * 8 and tokens > 16
    assert summaries["dart_160"] == [tokens] * 2 + [math.floor(0.0556 * tokens + 0.5)] * 6
    assert summaries["pdrop_320"][0] == tokens and len(set(summaries["pdrop_320"])) == 4
    # a 48 px image in 48 px tiles: its base view (8 x 8) and 1 x 2 crops unpadded to its square (8 x 8), 3 views
    assert tokens == 64 + 64
    assert summaries["visionzip_160"] == [3 * 2] * 8  # 0.0556 of 128 tokens = 7: 2 in each of the 3 views
    assert summaries["pool_320"] == [3 * 3 + 3 * 3] * 8  # stride 3 on each 8 x 8 grid, a partial last window per side
    # 2 patches in each view; the crops' kept patches in their padding (the outer quarters of the 8 x 16 grid) leave
    assert summaries["vispruner_160"][1:] == summaries["vispruner_160"][:-1] and 2 <= summaries["vispruner_160"][0] <= 6


def test_qwen_peer_rows_keep_the_fraction_their_name_says(geometry):
    """On Qwen2.5-VL-7B, for an image at max_pixels (45 x 45 = 2025 tokens): the fraction of each image's tokens in every
    layer, from layer 2 for FastV and DART, on average over the 28 layers for PyramidDrop (within half a point), at least
    it for pooling (whole windows of the 45 x 45 grid and a partial last one: 23 x 23 at 25%, 15 x 15 at 11.1%)."""
    model = geometry[qwen_shapes.HUB_ID]
    config = load_config(CONFIGS / "peers_qwen2_5_vl.yaml")
    assert config.model == "qwen2_5_vl_simignore" and config.model_args["pretrained"] == qwen_shapes.HUB_ID
    for row in config.rows[1:]:
        method, percent = row.name.rsplit("_", 1)
        plan = planned(model, ReductionSettings(**row.model_args))
        tokens, visible = plan.image_tokens, plan.visible_per_layer()
        fraction = row.model_args.get("fastv_keep", row.model_args.get("keep"))
        assert tokens == 2025 and len(visible) == 28, row.name
        if method in ("fastv", "dart"):
            assert visible == [tokens] * 2 + [math.floor(fraction * tokens + 0.5)] * 26, row.name
        elif method == "pdrop":
            assert abs(sum(visible) / 28 / tokens - int(percent) / 100) < 0.005 and len(set(visible)) == 4, row.name
        elif method == "pool":
            assert visible == [{"25": 23 * 23, "11": 15 * 15}[percent]] * 28, row.name
        elif method == "sparsevlm":  # its schedule for the share: every token up to layer 2 (2/32 of 28), then 3 stages
            average = math.floor(fraction * tokens + 0.5)
            assert visible[:3] == [tokens] * 3 and len(set(visible)) == 4 and visible[3] > average > visible[-1], row.name
        else:
            assert visible == [math.floor(fraction * tokens + 0.5)] * 28 and abs(fraction - int(percent) / 100) < 0.005, row.name


@pytest.mark.parametrize("reported", ["{value: 1.0}", "{value: 1.0, source: a paper}", "{value: 1.0, source: a paper, protocol: vqa}"])
def test_a_reported_figure_needs_its_value_source_and_protocol(tmp_path, reported):
    path = tmp_path / "bad.yaml"
    path.write_text(f"tasks: t\nrows: [{{name: a, reported: {reported}}}]\n")
    with pytest.raises(ValueError, match="reported must be \\{value: number, source: text, protocol: llava \\| lmms-eval \\| unknown\\}"):
        load_config(path)


@pytest.mark.parametrize("config_path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_published_figure_is_compared_with_a_run_of_its_protocol(config_path):
    """Simignore's figures (LLaVA's evaluation scripts) with scienceqa_img_llava; figures of an unstated protocol with
    any; and Simignore's tables and the attribution run its protocol even without a figure on every row."""
    from lmms_simignore.evaluation.sweep import task_protocol

    config = load_config(config_path)
    ran = {task_protocol(task) for task in config.tasks.split(",")}
    for row in config.rows:
        if row.reported is not None and row.reported["protocol"] != "unknown":
            assert row.reported["protocol"] in ran, row.name
    if config.name in ("table1", "table2", "table3", "table4", "attribution"):
        assert ran == {"llava"}


def test_a_sweep_says_when_a_figure_is_compared_with_another_protocol(tmp_path):
    config = load_config(CONFIGS / "table1.yaml", tasks="scienceqa_img_local")
    lines = []
    run_sweep(config, tmp_path, dry_run=True, echo=lines.append)
    assert "note: row llava7b_baseline is compared with a figure measured with LLaVA's evaluation scripts, but runs scienceqa_img_local" in lines


@pytest.mark.parametrize("flag", ["--include_path", "--include-path"])
def test_sweep_takes_lmms_evals_spelling_of_include_path_and_the_old_one(tmp_path, capsys, flag):
    from lmms_simignore.cli import main

    assert main(["sweep", str(CONFIGS / "table3.yaml"), "--output", str(tmp_path), flag, str(tmp_path / "tasks"), "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert commands and all(command.endswith(f"--include_path {tmp_path / 'tasks'}") for command in commands)


FAKE_LMMS_EVAL = '''"""Stands in for `python -m lmms_eval` (given as the launcher): writes a results and a samples file, counts its runs."""
import json, sys
from pathlib import Path

args = sys.argv[sys.argv.index("lmms_eval") + 1:]
output, task = Path(args[args.index("--output_path") + 1]) / "fake", args[args.index("--tasks") + 1]
output.mkdir(parents=True)
(output / "x_results.json").write_text(json.dumps({"results": {task: {"exact_match,none": 1.0}}}))
(output / f"x_samples_{task}.jsonl").write_text(json.dumps({"doc_id": 0, "filtered_resps": ["A"]}) + "\\n")
with open(Path(__file__).with_name("runs.log"), "a") as log:
    log.write(args[args.index("--model_args") + 1] + "\\n")
'''


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """A two-row config whose rows run a fake lmms-eval in a fraction of a second, at a commit the test sets:
    sweep(commit, **kwargs) -> (lines echoed, how many rows ran so far)."""
    import sys

    from lmms_simignore.evaluation import runs, sweep

    script = tmp_path / "fake_lmms_eval.py"
    script.write_text(FAKE_LMMS_EVAL)
    (tmp_path / "config.yaml").write_text("name: fake\nmodel: fake\ntasks: fake_task\nrows: [{name: a}, {name: b, model_args: {keep: 2}}]\n")
    monkeypatch.setattr(sweep, "launcher", lambda processes: (sys.executable, str(script)))

    def run(commit, **kwargs):
        monkeypatch.setattr(runs, "git_commit", lambda: commit)
        lines = []
        run_sweep(load_config(tmp_path / "config.yaml"), tmp_path / "out", echo=lines.append, show_table=False, **kwargs)
        log = tmp_path / "runs.log"
        return lines, len(log.read_text().splitlines()) if log.exists() else 0

    return run


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def test_a_finished_row_at_the_same_commit_is_reused(fake_sweep):
    assert fake_sweep(COMMIT_A)[1] == 2
    lines, ran = fake_sweep(COMMIT_A)
    assert ran == 2 and "[1/2] a: done, reading" in lines and "[2/2] b: done, reading" in lines
    assert not any("was produced" in line for line in lines)


def test_a_finished_row_recorded_at_another_commit_is_run_again_and_says_why(fake_sweep):
    fake_sweep(COMMIT_A)
    lines, ran = fake_sweep(COMMIT_B)
    assert ran == 4
    assert "row a was produced at commit aaaaaaa, now bbbbbbb: re-running (--reuse-stale keeps it)" in lines
    assert any(line.startswith("[2/2] b: running") for line in lines)
    assert fake_sweep(COMMIT_B)[1] == 4  # now produced at this commit


def test_reuse_stale_reads_rows_of_another_commit_back_as_they_are(fake_sweep):
    fake_sweep(COMMIT_A)
    lines, ran = fake_sweep(COMMIT_B, reuse_stale=True)
    assert ran == 2
    assert "row b was produced at commit aaaaaaa, now bbbbbbb: reusing it as it is (--reuse-stale)" in lines
    assert "[2/2] b: done, reading" in lines


@pytest.mark.parametrize(
    "recorded, now, change",
    [
        ("a" * 40, "a" * 40, None),
        ("a" * 40, "b" * 40 + "+dirty", "at commit aaaaaaa, now bbbbbbb+dirty"),  # another commit: changed, dirty or not
        ("a" * 40 + "+dirty", "a" * 40, None),  # same commit, uncommitted changes: the (same) version decides
        ("unknown (not a git checkout)", "unknown (not a git checkout)", None),
    ],
)
def test_what_counts_as_other_code(recorded, now, change):
    from lmms_simignore.evaluation.runs import code_change

    version = {"lmms-simignore": "0.1.0"}
    assert code_change({"git_commit": recorded, "versions": version}, {"git_commit": now, "versions": version}) == change


@pytest.mark.parametrize("recorded, now", [("a" * 40 + "+dirty", "a" * 40 + "+dirty"), ("unknown (not a git checkout)", "b" * 40),
                                           (None, "a" * 40)])
def test_without_a_telling_commit_the_package_version_decides(recorded, now):
    from lmms_simignore.evaluation.runs import code_change

    old = {"git_commit": recorded, "versions": {"lmms-simignore": "0.1.0"}}
    assert code_change(old, {"git_commit": now, "versions": {"lmms-simignore": "0.2.0"}}) == "by lmms-simignore 0.1.0, now 0.2.0"
    assert code_change(old, {"git_commit": now, "versions": {"lmms-simignore": "0.1.0"}}) is None
    assert code_change(old, {"git_commit": now, "versions": {"lmms-simignore": "not installed"}}) is None


@pytest.mark.parametrize("flags, reuse_stale", [([], False), (["--reuse-stale"], True)])
def test_sweep_passes_reuse_stale_on(tmp_path, monkeypatch, flags, reuse_stale):
    from lmms_simignore.cli import main
    from lmms_simignore.evaluation import sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: seen.update(kwargs))
    assert main(["sweep", str(CONFIGS / "table3.yaml"), "--output", str(tmp_path), "--dry-run", *flags]) == 0
    assert seen["reuse_stale"] is reuse_stale


def test_keep_going_runs_the_other_rows_and_lists_the_failed_ones(tmp_path, monkeypatch):
    """Row b fails (as a row the model's family refuses): without --keep-going the sweep stops there; with it, row c
    runs, failed.json names b with its first error line, the command exits 1 after writing the leaderboard of a and c."""
    import json
    import sys

    from lmms_simignore import cli
    from lmms_simignore.evaluation import sweep
    from lmms_simignore.evaluation.runs import LmmsEvalFailed

    script = tmp_path / "fake_lmms_eval.py"
    script.write_text(FAKE_LMMS_EVAL.replace('args = sys.argv[sys.argv.index("lmms_eval") + 1:]', '''args = sys.argv[sys.argv.index("lmms_eval") + 1:]
if "keep=2" in args[args.index("--model_args") + 1]:
    sys.exit("ValueError: visiondrop is budgeted by keep=N")'''))
    (tmp_path / "config.yaml").write_text("name: fake\nmodel: fake\ntasks: fake_task\n"
                                          "rows: [{name: a}, {name: b, model_args: {keep: 2}}, {name: c, model_args: {keep: 3}}]\n")
    monkeypatch.setattr(sweep, "launcher", lambda processes: (sys.executable, str(script)))
    with pytest.raises(LmmsEvalFailed, match="visiondrop is budgeted"):
        run_sweep(load_config(tmp_path / "config.yaml"), tmp_path / "stop", echo=lambda line: None)
    assert not (tmp_path / "stop" / "c").exists()
    exit_code = cli.main(["sweep", str(tmp_path / "config.yaml"), "--output", str(tmp_path / "on"), "--keep-going"])
    assert exit_code == 1
    assert json.loads((tmp_path / "on" / "failed.json").read_text()) == {"b": "ValueError: visiondrop is budgeted by keep=N"}
    assert [entry["name"] for entry in json.loads((tmp_path / "on" / "summary.json").read_text())] == ["a", "c"]
    assert (tmp_path / "on" / "leaderboard.md").is_file()


def test_local_tasks_names_each_task_s_local_copy_or_the_missing_one(tmp_path):
    from lmms_simignore.evaluation.sweep import local_task_names

    (tmp_path / "mme_local.yaml").write_text("task: mme_local\n")
    (tmp_path / "pope_local.yaml").write_text("task: pope_local\n")
    assert local_task_names("mme,pope", tmp_path) == "mme_local,pope_local"
    with pytest.raises(ValueError, match="no local copy of gqa .*gqa_local.yaml.*local-tasks --data DATA"):
        local_task_names("mme,gqa", tmp_path)
