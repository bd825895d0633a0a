"""Clusters of image tokens and what each is worth to the answers (Simignore's Table 5, "spy" tokens), on a model:

    python -m lmms_simignore clusters [--k 8] [--pretrained shipped:shapes-llava] [--data SQA.parquet] --out DIR

k-means over the projected image tokens of every image of the questions; per cluster, its share of the tokens and
their mean Simignore score (best cosine similarity to the answer options' embeddings); then the accuracy when the
cluster's tokens are ignored (masked) in every image, one cluster at a time, against the accuracy with all tokens.
A cluster whose removal raises accuracy holds tokens that hurt ("spy" tokens). Writes clusters.json and clusters.png.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmms_simignore import engine
from lmms_simignore.evaluation.reports import write_report
from lmms_simignore.evaluation.samples import shapes_prompts
from lmms_simignore.methods import pairwise_similarity


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, Euclidean. points: (P, D) -> labels (P,) in [0, k), centroids (k, D).

    Deterministic for a seed; stops when no label changes. An emptied cluster is re-seeded at the farthest point."""
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k must be in [1, {points.shape[0]}] (the number of tokens), got {k}")
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    centroids = points[torch.randint(points.shape[0], (1,), generator=generator)]
    while centroids.shape[0] < k:  # k-means++: the next seed with probability proportional to the squared distance
        distance = torch.cdist(points, centroids).amin(dim=1) ** 2
        choice = torch.multinomial(distance / distance.sum(), 1, generator=generator) if distance.sum() > 0 else \
            torch.randint(points.shape[0], (1,), generator=generator)
        centroids = torch.cat([centroids, points[choice]])
    labels = torch.full((points.shape[0],), -1, dtype=torch.long)
    for _ in range(iterations):
        new_labels = torch.cdist(points, centroids).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(k):
            members = points[labels == cluster]
            if members.shape[0]:
                centroids[cluster] = members.mean(dim=0)
            else:
                centroids[cluster] = points[torch.cdist(points, centroids).amin(dim=1).argmax()]
    return labels, centroids


@torch.inference_mode()
def image_tokens_and_scores(model, processor, records: list[dict], batch_size: int = 64, prompts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, N, D) projected image tokens of each record's image and (I, N) their Simignore scores (best cosine
    similarity to the embeddings of the record's answer options, joined by spaces). `prompts(batch)` makes the
    processor inputs (default: the shapes prompt)."""
    from lmms_simignore.models.base import options_text

    prompts = prompts or shapes_prompts(processor)
    features, scores = [], []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = prompts(batch)
        prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        ids = [processor.tokenizer(options_text(record["choices"], "options"), add_special_tokens=False).input_ids for record in batch]
        text, mask = engine.embed_texts(model, ids)
        scores.append(pairwise_similarity(prompt.image_features, text[prompt.image_rows], mask[prompt.image_rows], "cosine").amax(dim=-1).float())
        features.append(prompt.image_features.float())
    return torch.cat(features), torch.cat(scores)


@torch.inference_mode()
def accuracy_with_kept(model, processor, records: list[dict], kept: torch.Tensor, batch_size: int = 64, prompts=None) -> float:
    """Accuracy of the first answer token (the option letter) with only the image tokens flagged in `kept` (I, N)
    visible (masked, original positions)."""
    prompts = prompts or shapes_prompts(processor)
    correct = 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = prompts(batch)
        prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        reduced = engine.reduce_prompt(prompt, kept[start : start + len(batch)], "mask")
        predicted = engine.LanguageModelRun(model, reduced).prefill().argmax(dim=-1)
        letters = processor.tokenizer.batch_decode(predicted[:, None])
        correct += sum(letter.strip() == chr(ord("A") + record["answer"]) for letter, record in zip(letters, batch))
    return correct / len(records)


def cluster_report(model, processor, records: list[dict], k: int, seed: int = 0, prompts=None) -> dict:
    """Per cluster: share of the tokens, mean Simignore score, accuracy with it ignored and the change from all tokens."""
    features, scores = image_tokens_and_scores(model, processor, records, prompts=prompts)
    images, tokens, _ = features.shape
    labels, _ = kmeans(features.reshape(images * tokens, -1), k, seed=seed)
    labels = labels.reshape(images, tokens)
    everything = accuracy_with_kept(model, processor, records, torch.ones(images, tokens, dtype=torch.bool), prompts=prompts)
    clusters = []
    for cluster in range(k):
        members = labels == cluster
        without = accuracy_with_kept(model, processor, records, ~members, prompts=prompts)
        clusters.append({"cluster": cluster, "share": members.float().mean().item(),
                         "images_touched": int(members.any(dim=1).sum()), "mean_similarity": scores[members].mean().item(),
                         "accuracy_without": without, "change": without - everything})
    clusters.sort(key=lambda entry: entry["mean_similarity"])
    return {"images": images, "image_tokens": tokens, "k": k, "seed": seed, "accuracy_all_tokens": everything,
            "mean_similarity_all_tokens": scores.mean().item(), "clusters": clusters}


def plot(report: dict, path: Path) -> None:
    """Accuracy change when a cluster is ignored, against the cluster's mean similarity (marker area = its share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    clusters = report["clusters"]
    axis.scatter([c["mean_similarity"] for c in clusters], [100 * c["change"] for c in clusters],
                 s=[3000 * c["share"] for c in clusters], alpha=0.6)
    for entry in clusters:
        axis.annotate(str(entry["cluster"]), (entry["mean_similarity"], 100 * entry["change"]), ha="center", va="center", fontsize=8)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xlabel("mean similarity of the cluster's tokens to the answer options")
    axis.set_ylabel("accuracy change when it is ignored (points)")
    axis.set_title(f"k-means over image tokens (k={report['k']}, {report['images']} images); all tokens: "
                   f"{report['accuracy_all_tokens']:.3f}", fontsize=10)
    axis.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cluster_table(report: dict) -> str:
    from lmms_simignore.markdown import table

    rows = [[entry["cluster"], f"{entry['share']:.3f}", f"{entry['mean_similarity']:.3f}", f"{entry['accuracy_without']:.3f}",
             f"{100 * entry['change']:+.1f}"] for entry in report["clusters"]]
    return table(["cluster", "share of tokens", "mean similarity", "accuracy without it", "change (points)"], rows, align="lrrrr")


def run_clusters(out_dir: str | Path, k: int = 8, pretrained: str = "shipped:shapes-llava", num_questions: int = 200,
                 seed: int | None = None, kmeans_seed: int = 0, data: str | None = None, echo=print) -> dict:
    """The cluster study on generated shapes questions (default: the held-out seed) or the ScienceQA-IMG split `data`;
    writes clusters.json and clusters.png."""
    from lmms_simignore.evaluation.samples import question_samples
    from lmms_simignore.models.mipha import load_llava

    if num_questions < 1:
        raise ValueError(f"--num-questions must be at least 1, got {num_questions}")
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    model, processor = load_llava(pretrained)
    records, prompts, source = question_samples(processor, num_questions, seed=seed, data=data)
    report = {"model": pretrained, "questions": source, **cluster_report(model, processor, records, k, seed=kmeans_seed, prompts=prompts)}
    out_dir = write_report(out_dir, "clusters", report, plot)
    echo(cluster_table(report))
    echo(f"\nall tokens: accuracy {report['accuracy_all_tokens']:.3f}; wrote {out_dir / 'clusters.json'} and clusters.png")
    return report
