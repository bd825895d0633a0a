"""Redundancy of image tokens inside the LLM, per decoder layer (after "Seeing Beyond Redundancy", Hannan et al.).

Three textbook measures (`DEFINITIONS`) over the hidden states X (N image tokens x D) of one image at one layer.
`python -m lmms_simignore redundancy` measures them for the shipped shapes model on generated questions and
writes a JSON and a plot against the number of objects in the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmms_simignore.evaluation.reports import write_report
from lmms_simignore.markdown import table

METRICS = ("stable_rank", "participation_ratio", "gini_of_norms")
DEFINITIONS = {  # written into every report
    "stable_rank": "||X||_F^2 / ||X||_2^2 = sum_i s_i^2 / s_max^2 (s: singular values of X, uncentred); "
                   "1 for rank-one X, N for N orthogonal tokens of equal norm",
    "participation_ratio": "(sum_i l_i)^2 / sum_i l_i^2 (l: eigenvalues of the covariance of the N tokens); "
                           "the effective number of directions the tokens vary along",
    "gini_of_norms": "Gini coefficient of the token norms a_n = ||x_n||: sum_ij |a_i - a_j| / (2 N^2 mean(a)); "
                     "0 when every token has the same norm, (N-1)/N when one token holds all of it",
}


def stable_rank(tokens: torch.Tensor) -> float:
    """tokens: (N, D) -> ||X||_F^2 / ||X||_2^2 (0 for an all-zero matrix)."""
    singular = torch.linalg.svdvals(tokens.double())
    return 0.0 if singular[0] == 0 else float((singular**2).sum() / singular[0] ** 2)


def participation_ratio(tokens: torch.Tensor) -> float:
    """tokens: (N, D) -> (sum l)^2 / sum l^2 over the eigenvalues l of the tokens' covariance (0 if they are all equal)."""
    centred = tokens.double() - tokens.double().mean(dim=0, keepdim=True)
    # the covariance's non-zero eigenvalues are the squared singular values of the centred tokens (over N - 1)
    eigenvalues = torch.linalg.svdvals(centred) ** 2
    total = eigenvalues.sum()
    return 0.0 if total == 0 else float(total**2 / (eigenvalues**2).sum())


def gini(values: torch.Tensor) -> float:
    """values: (N,) non-negative -> Gini coefficient sum_ij |a_i - a_j| / (2 N^2 mean(a)) (0 if all are zero)."""
    values = values.double().flatten()
    if (values < 0).any():
        raise ValueError("gini: values must be non-negative")
    mean = values.mean()
    if mean == 0:
        return 0.0
    return float((values[:, None] - values[None, :]).abs().sum() / (2 * values.numel() ** 2 * mean))


def token_measures(tokens: torch.Tensor) -> dict[str, float]:
    """tokens: (N, D) hidden states of one image's tokens -> the three measures."""
    return {
        "stable_rank": stable_rank(tokens),
        "participation_ratio": participation_ratio(tokens),
        "gini_of_norms": gini(tokens.double().norm(dim=-1)),
    }


@torch.inference_mode()
def image_token_states(model, processor, records: list[dict], batch_size: int = 32) -> list[torch.Tensor]:
    """Per record: (layers + 1, N, D) hidden states of its image tokens: the input embeddings, then the residual
    stream after each decoder layer (read with forward hooks, before the final norm).

    Image positions are read from the input ids (the processor's image token), never assumed.
    """
    from lmms_simignore.testbed.llava_recipe import encode

    image_token_id = model.config.image_token_id
    layers = model.model.language_model.layers
    states = []
    for start in range(0, len(records), batch_size):
        batch = encode(processor, records[start : start + batch_size], with_answers=False)
        outputs: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output))
                 for layer in layers]
        try:
            embeddings = model(**batch, output_hidden_states=True).hidden_states[0]  # (B, T, D)
        finally:
            for hook in hooks:
                hook.remove()
        stacked = torch.stack([embeddings, *outputs], dim=1)  # (B, layers + 1, T, D)
        for row in range(stacked.shape[0]):
            is_image = batch["input_ids"][row] == image_token_id
            states.append(stacked[row][:, is_image].float())
    return states


def measure(model, processor, records: list[dict], progress: bool = True) -> dict:
    """Mean and standard deviation of each measure per layer, overall and per object count."""
    from tqdm import tqdm

    states = image_token_states(model, processor, records)
    num_layers = states[0].shape[0]
    per_record = [
        [token_measures(layer_states) for layer_states in record_states]
        for record_states in tqdm(states, desc="redundancy measures", disable=not progress)
    ]  # record -> layer -> metric

    def summarize(indices: list[int]) -> dict:
        summary = {}
        for metric in METRICS:
            values = torch.tensor([[per_record[i][layer][metric] for layer in range(num_layers)] for i in indices])
            summary[metric] = {"mean": values.mean(0).tolist(), "std": values.std(0, unbiased=False).tolist()}
        return summary

    counts = sorted({record["num_objects"] for record in records})
    return {
        "layers": ["embeddings"] + [f"after layer {layer}" for layer in range(num_layers - 1)],
        "image_tokens": states[0].shape[1],
        "images": len(records),
        "overall": summarize(list(range(len(records)))),
        "per_object_count": {
            str(count): {"images": sum(r["num_objects"] == count for r in records),
                         **summarize([i for i, r in enumerate(records) if r["num_objects"] == count])}
            for count in counts
        },
    }


def plot(report: dict, path: Path) -> None:
    """One panel per measure: the measure against the number of objects, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(count) for count in report["per_object_count"]]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), constrained_layout=True)
    titles = {"stable_rank": "stable rank", "participation_ratio": "participation ratio", "gini_of_norms": "Gini of token norms"}
    for axis, metric in zip(axes, METRICS):
        for layer, name in enumerate(report["layers"]):
            means = [report["per_object_count"][str(count)][metric]["mean"][layer] for count in counts]
            axis.plot(counts, means, marker="o", label=name)
        axis.set_title(titles[metric])
        axis.set_xlabel("objects in the image")
        axis.set_xticks(counts)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Image-token redundancy per LLM layer ({report['images']} images, {report['image_tokens']} tokens each)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_redundancy(out_dir: str | Path, pretrained: str = "shipped:shapes-llava", num_questions: int = 600, seed: int | None = None,
                   echo=print) -> dict:
    """Measure on generated shapes questions (default: the held-out seed); write redundancy.json and redundancy.png."""
    from lmms_simignore.models.mipha import load_llava
    from lmms_simignore.testbed import shapes

    if num_questions < 1:
        raise ValueError(f"num_questions must be at least 1, got {num_questions}")
    seed = shapes.HELD_OUT_SEED if seed is None else seed
    model, processor = load_llava(pretrained)
    records = shapes.shapes_records(num_questions, seed=seed)
    report = {"model": pretrained, "questions": {"seed": seed, "count": num_questions}, **measure(model, processor, records)}
    report["definitions"] = DEFINITIONS
    out_dir = write_report(out_dir, "redundancy", report, plot)
    echo(redundancy_table(report))
    echo(f"\nwrote {out_dir / 'redundancy.json'} and {out_dir / 'redundancy.png'}")
    return report


def redundancy_table(report: dict) -> str:
    """Markdown: per layer, each measure's mean for the fewest and the most objects."""
    counts = list(report["per_object_count"])
    low, high = counts[0], counts[-1]
    header = ["layer", *(f"{metric} ({low} -> {high} objects)" for metric in METRICS)]
    body = [[name, *(f"{report['per_object_count'][low][metric]['mean'][layer]:.2f} -> "
                     f"{report['per_object_count'][high][metric]['mean'][layer]:.2f}" for metric in METRICS)]
            for layer, name in enumerate(report["layers"])]
    return table(header, body, align="l" + "r" * len(METRICS))
