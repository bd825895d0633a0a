"""Information flow from the image to the answer (Simignore's Figures 2 and 4), measured on a model:

    python -m lmms_simignore infoflow [--pretrained shipped:shapes-llava] [--data SCIENCEQA.parquet]
                                      [--reduction reduction=simignore,keep=16] --out DIR

In every decoder layer, the attention the last prompt token pays each image token (mean over heads; on the image's
grid, per sample and averaged over samples) and the share of its attention on the image tokens against the text
tokens, without a reduction and, with `--reduction`, with one. Rows are recomputed from each layer's own norm,
projections and rotary embedding (`engine.last_token_attention`) inside our layer loop: no switch to eager attention.
Writes infoflow.json, infoflow.png (image share per layer; mean attention over the grid per layer) and
infoflow_samples.png (the first samples' heatmaps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_simignore import engine
from lmms_simignore.settings import ReductionSettings


def grid_attention(attention: torch.Tensor, is_image: torch.Tensor, grid_index: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, S) attention over a sequence -> (B, N) the part each image token of the grid received (0 for tokens not in
    the sequence). is_image: (B, S) bool; grid_index: (B, S) the image token each column holds (read where is_image)."""
    grid = attention.new_zeros(attention.shape[0], tokens)
    rows, columns = is_image.nonzero(as_tuple=True)
    grid[rows, grid_index[rows, columns]] = attention[rows, columns]
    return grid


def image_share(attention: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """(B, S) attention (each row sums to 1 over the visible columns), (B, S) bool -> (B,) the part on image tokens."""
    return (attention * is_image).sum(dim=1)


@dataclass
class Flow:
    """grid: (B, layers, N) attention of the last prompt token to each image token (mean over heads);
    image_share: (B, layers) the part of its attention on image tokens (the rest is on text)."""

    grid: torch.Tensor
    image_share: torch.Tensor


@torch.inference_mode()
def measure_flow(model, reduced: engine.ReducedPrompt, image_start: torch.Tensor, tokens: int, **stages) -> Flow:
    """The flow of one batch whose rows hold one image each, the image's first token at position `image_start` (B,)
    and its `tokens` tokens in order (positions identify them: the reduction must keep original positions)."""
    grids, shares = [], []

    def observe(index, layer, hidden, position_embeddings, visible, columns, is_image):
        attention = engine.last_token_attention(layer, hidden, position_embeddings, visible).mean(dim=1)  # (B, S)
        grid_index = (reduced.position_ids.gather(1, columns) - image_start[:, None]).clamp(0, tokens - 1)
        grids.append(grid_attention(attention, is_image, grid_index, tokens))
        shares.append(image_share(attention, is_image & visible))

    engine.LanguageModelRun(model, reduced, observe=observe, **stages).prefill()
    return Flow(torch.stack(grids, dim=1), torch.stack(shares, dim=1))


def _check_plan(settings: ReductionSettings, plan) -> None:
    if plan.changes_positions:
        raise ValueError(f"--reduction: infoflow places each token on the image grid by its position; reduction="
                         f"{settings.reduction} merges tokens or moves positions (a shorter image, or stage_positions="
                         f"repacked); use a reduction that keeps them (simignore, random, fastv, dart, or pdrop with "
                         f"stage_positions=original)")


def flows(model, processor, records: list[dict], settings: ReductionSettings, batch_size: int = 16, prompts=None) -> Flow:
    """The flow over `records` (one image each), batched into processor inputs by `prompts(batch)` (default: the
    shapes prompt)."""
    from lmms_simignore.evaluation.samples import shapes_prompts
    from lmms_simignore.models.base import options_text

    prompts = prompts or shapes_prompts(processor)
    tokens = engine.image_tokens_per_image(model.config)
    plan = engine.plan_for(model.config, settings)
    _check_plan(settings, plan)
    grids, shares = [], []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = prompts(batch)
        is_image = inputs["input_ids"] == model.config.image_token_id
        if (is_image.sum(dim=1) != tokens).any():
            raise ValueError(f"infoflow takes one image per sample ({tokens} image tokens); a sample has "
                             f"{is_image.sum(dim=1).tolist()}")
        positions = engine.default_position_ids(inputs["attention_mask"])
        image_start = positions.masked_fill(~is_image, 10**9).amin(dim=1)
        texts = [options_text(record["choices"], settings.text_style) for record in batch]
        reduced = engine.prepare_reduced_prompt(model, processor.tokenizer, plan, inputs, texts, list(range(start, start + len(batch))))
        flow = measure_flow(model, reduced, image_start, tokens, stages=plan.layers)
        grids.append(flow.grid.float().cpu())
        shares.append(flow.image_share.float().cpu())
    return Flow(torch.cat(grids), torch.cat(shares))


def summary(flow: Flow) -> dict:
    """Per layer: the mean image share (and its spread) and the grid attention averaged over samples."""
    return {
        "image_share": {"mean": flow.image_share.mean(0).tolist(), "std": flow.image_share.std(0, unbiased=False).tolist()},
        "text_share": {"mean": (1 - flow.image_share).mean(0).tolist()},
        "mean_grid": flow.grid.mean(0).tolist(),  # (layers, N)
    }


def plot(report: dict, flows_by_name: dict[str, Flow], out_dir: Path, samples: int = 4) -> None:
    """infoflow.png: the image share per layer, and each layer's mean grid attention; infoflow_samples.png: heatmaps
    of the first samples, one row per sample, one column per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(flows_by_name)
    layers = len(report["flows"][names[0]]["image_share"]["mean"])
    side = int(math.isqrt(report["image_tokens"]))
    figure, axes = plt.subplots(len(names), layers + 1, figsize=(3 * (layers + 1), 3 * len(names)), squeeze=False,
                                constrained_layout=True)
    for row, name in enumerate(names):
        flow = report["flows"][name]
        share = axes[row][0]
        share.plot(range(layers), flow["image_share"]["mean"], marker="o", label="on image tokens")
        share.plot(range(layers), flow["text_share"]["mean"], marker="o", label="on text tokens")
        share.set_title(f"{name}: last prompt token's attention")
        share.set_xlabel("decoder layer")
        share.set_ylim(0, 1)
        share.legend(fontsize=7)
        for layer in range(layers):
            axis = axes[row][layer + 1]
            axis.imshow(torch.tensor(flow["mean_grid"][layer]).reshape(side, side).numpy(), cmap="viridis")
            axis.set_title(f"{name}, layer {layer}", fontsize=9)
            axis.axis("off")
    figure.suptitle(f"Attention of the last prompt token to the image ({report['samples']} samples, mean over heads)")
    figure.savefig(out_dir / "infoflow.png", dpi=110)
    plt.close(figure)

    shown = min(samples, flows_by_name[names[0]].grid.shape[0])
    figure, axes = plt.subplots(shown * len(names), layers, figsize=(2.2 * layers, 2.2 * shown * len(names)), squeeze=False,
                                constrained_layout=True)
    for block, name in enumerate(names):
        for sample in range(shown):
            for layer in range(layers):
                axis = axes[block * shown + sample][layer]
                axis.imshow(flows_by_name[name].grid[sample, layer].reshape(side, side).numpy(), cmap="viridis")
                axis.set_title(f"{name} #{sample} L{layer}", fontsize=7)
                axis.axis("off")
    figure.savefig(out_dir / "infoflow_samples.png", dpi=110)
    plt.close(figure)


def run_infoflow(out_dir: str | Path, pretrained: str = "shipped:shapes-llava", num_questions: int = 64, seed: int | None = None,
                 data: str | None = None, reduction: str | None = None, echo=print) -> dict:
    """Measure the flow without a reduction and, if `reduction` ("reduction=simignore,keep=16") is given, with it, on
    generated shapes questions (default) or the ScienceQA-IMG parquet `data`; write infoflow.json and the PNGs."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_simignore.evaluation.samples import question_samples
    from lmms_simignore.models.mipha import load_llava

    if num_questions < 1:
        raise ValueError(f"--num-questions must be at least 1, got {num_questions}")
    settings = {"none": ReductionSettings()}
    if reduction:
        settings["reduced"] = ReductionSettings(**simple_parse_args_string(reduction))
    model, processor = load_llava(pretrained)
    if reduction:  # refused before any compute
        _check_plan(settings["reduced"], engine.plan_for(model.config, settings["reduced"]))
    records, prompts, source = question_samples(processor, num_questions, seed=seed, data=data)
    flows_by_name = {name: flows(model, processor, records, value, prompts=prompts) for name, value in settings.items()}
    report = {"model": pretrained, "questions": source, "samples": len(records), "image_tokens": engine.image_tokens_per_image(model.config),
              "reduction": reduction or "none", "flows": {name: summary(flow) for name, flow in flows_by_name.items()}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "infoflow.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, flows_by_name, out_dir)
    echo(flow_table(report))
    echo(f"\nwrote {out_dir / 'infoflow.json'}, infoflow.png and infoflow_samples.png")
    return report


def flow_table(report: dict) -> str:
    """Markdown: per layer, the share of the last prompt token's attention on image tokens, per setting."""
    from lmms_simignore.markdown import table

    names = list(report["flows"])
    layers = len(report["flows"][names[0]]["image_share"]["mean"])
    rows = [[f"layer {layer}", *(f"{report['flows'][name]['image_share']['mean'][layer]:.3f}" for name in names)] for layer in range(layers)]
    return table(["layer", *(f"on image tokens ({name})" for name in names)], rows)
