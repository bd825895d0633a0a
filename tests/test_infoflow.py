"""`infoflow`: the last prompt token's attention to each image token per decoder layer (on the image grid) and its share
on image vs text tokens, without and with a reduction; checked on hand-made rows and against transformers' eager
attention weights on the tiny random LLaVA (3 layers, 25 image tokens)."""

import json
import subprocess
import sys

import pytest
import torch
from test_fastv import NONE, padded_batch  # noqa: F401  (padded_batch is a fixture)

from lmms_simignore import engine
from lmms_simignore.evaluation.infoflow import grid_attention, image_share, measure_flow
from lmms_simignore.methods.fastv import fastv_stage


def test_a_row_is_placed_on_the_grid_by_the_image_token_each_column_holds():
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.15, 0.1]])
    is_image = torch.tensor([[False, True, True, False], [True, False, True, False]])
    grid_index = torch.tensor([[0, 3, 1, 0], [2, 0, 0, 0]])  # row 0: columns 1, 2 hold tokens 3, 1; row 1: 0, 2 hold 2, 0
    torch.testing.assert_close(grid_attention(attention, is_image, grid_index, 4), torch.tensor([[0.0, 0.3, 0.0, 0.2], [0.15, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(image_share(attention, is_image), torch.tensor([0.5, 0.65]))


def eager_rows(testbed, inputs):
    """Transformers' eager attention weights of the last prompt token, mean over heads: (layers, B, L)."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(testbed["model"], attn_implementation="eager").eval()
    with torch.inference_mode():
        output = eager(**inputs, position_ids=engine.default_position_ids(inputs["attention_mask"]), output_attentions=True)
    return torch.stack([weights[:, :, -1, :].mean(dim=1) for weights in output.attentions])


def flow_of(model, inputs, settings=NONE, **stages):
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    kept = engine.choose_kept_image_tokens(engine.plan_for(model.config, settings), prompt.image_features, image_seeds=[0, 1])
    reduced = engine.reduce_prompt(prompt, kept, "drop")
    image_start = prompt.position_ids.gather(1, prompt.image_positions[:, :1]).flatten()
    return measure_flow(model, reduced, image_start, 25, **stages), kept


def test_the_flow_is_transformers_eager_attention_of_the_last_prompt_token(testbed, tiny_model, padded_batch):
    inputs, _ = padded_batch
    expected = eager_rows(testbed, inputs)  # (layers, B, L)
    flow, _ = flow_of(tiny_model, inputs)
    is_image = inputs["input_ids"] == tiny_model.config.image_token_id
    for row in range(2):
        torch.testing.assert_close(flow.grid[row], expected[:, row][:, is_image[row]], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(flow.image_share[row], expected[:, row][:, is_image[row]].sum(dim=1), atol=1e-6, rtol=1e-5)
    assert (flow.image_share > 0).all() and (flow.image_share < 1).all()


def test_a_reduction_leaves_flow_only_on_the_tokens_each_layer_still_has(tiny_model, padded_batch):
    """Random keeps 10 of 25 before the LLM: every layer's flow lands on those 10; FastV at layer 2 keeping 6: layers 0-1
    flow as without it, layer 2 only onto its 6."""
    from lmms_simignore.settings import ReductionSettings

    inputs, _ = padded_batch
    flow, kept = flow_of(tiny_model, inputs, ReductionSettings(reduction="random", keep=10))
    for row in range(2):
        for layer in range(3):
            assert set(flow.grid[row, layer].nonzero().flatten().tolist()) == set(kept[row].tolist())
    plain, _ = flow_of(tiny_model, inputs)
    fastv, _ = flow_of(tiny_model, inputs, stages=fastv_stage(2, 6))
    torch.testing.assert_close(fastv.grid[:, :2], plain.grid[:, :2])
    assert (fastv.grid[:, 2] > 0).sum(dim=1).tolist() == [6, 6]
    assert not torch.allclose(fastv.image_share[:, 2], plain.image_share[:, 2])


def test_infoflow_runs_on_the_testbed_and_writes_its_figures(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "infoflow", "--out", str(tmp_path), "--num-questions", "6",
                                "--reduction", "reduction=fastv,fastv_layer=2,fastv_keep=8"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((tmp_path / "infoflow.json").read_text())
    assert (report["samples"], report["image_tokens"], list(report["flows"])) == (6, 64, ["none", "reduced"])
    none, reduced = report["flows"]["none"], report["flows"]["reduced"]
    assert len(none["image_share"]["mean"]) == 4 and len(none["mean_grid"][0]) == 64
    assert none["mean_grid"][:2] == reduced["mean_grid"][:2]  # FastV acts from layer 2 on
    assert (tmp_path / "infoflow.png").stat().st_size > 0 and (tmp_path / "infoflow_samples.png").stat().st_size > 0
    assert "| layer 3 |" in completed.stdout


@pytest.mark.parametrize("reduction, message", [
    ("reduction=visionzip,keep=16", "--reduction: infoflow places each token on the image grid by its position"),
    ("reduction=pdrop", "stage_positions=repacked"),
    ("reduction=simignore,keep=999", "keep=999 exceeds the model's 64 image tokens"),
])
def test_reductions_infoflow_cannot_place_on_the_grid_are_refused_with_the_reason(tmp_path, reduction, message):
    from lmms_simignore.evaluation.infoflow import run_infoflow

    with pytest.raises(ValueError, match=message):
        run_infoflow(tmp_path, num_questions=2, reduction=reduction, echo=lambda line: None)
