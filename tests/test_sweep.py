"""Configs under configs/: parsing, the exact commands, and the attribution table end to end through lmms-eval."""

from pathlib import Path

import pytest

from lmms_simignore.sweep import format_model_args, load_config, row_runs, run_sweep

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
    assert command[command.index("--tasks") + 1] == "scienceqa_img"


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
    from lmms_simignore.fixtures import PAPER_SHAPED, build_offline_testbed

    return build_offline_testbed(tmp_path_factory.mktemp("paper_shaped"), num_docs=4, seed=0, shape=PAPER_SHAPED)


def test_attribution_config_runs_end_to_end_offline(paper_shaped_testbed, tmp_path):
    """Every row of configs/attribution.yaml through the real lmms-eval CLI, with the paper's budgets
    (576 image tokens, FastV at layer 5) on a toy model of LLaVA-1.5's token geometry."""
    config = load_config(
        CONFIGS / "attribution.yaml", overrides={"pretrained": str(paper_shaped_testbed["model"])}, tasks="scienceqa_img_local"
    )
    lines = []
    summaries = run_sweep(
        config, tmp_path / "attribution", include_path=paper_shaped_testbed["tasks"], extra_args=("--limit", "3"), echo=lines.append
    )
    rows = {summary["name"]: summary for summary in summaries}
    assert list(rows) == [row.name for row in config.rows]
    expected_layers = {
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
    assert {name: row["visible_per_layer"] for name, row in rows.items()} == expected_layers
    assert rows["simignore_fastv"]["mean_visible"] == pytest.approx((5 * 452 + 144) / 6)
    assert all(len(row["answers"]["scienceqa_img_local"]) == 3 for row in rows.values())
    assert rows["simignore_mask"]["answers"] == rows["simignore_drop"]["answers"]  # mask = drop, through the CLI
    assert rows["simignore_fastv"]["answers"] != rows["baseline"]["answers"]
    table = (tmp_path / "attribution" / "table.md").read_text()
    assert "| simignore_fastv | 0.0000 | layers 0-4: 452, layer 5: 144 | 400.7 / 576 |" in table
    assert any("[10/10] random_keep144: running" in line for line in lines)
