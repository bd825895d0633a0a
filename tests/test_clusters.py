"""`clusters`: k-means over image tokens, each cluster's similarity to the text, and the accuracy with it ignored."""

import json
import subprocess
import sys

import pytest
import torch
from test_fastv import NONE, padded_batch  # noqa: F401  (padded_batch is a fixture)

from lmms_simignore import engine
from lmms_simignore.evaluation.clusters import accuracy_with_kept, kmeans


def test_kmeans_finds_three_separated_blobs_and_repeats_itself_for_a_seed():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centre + 0.3 * torch.randn(20, 2, generator=generator) for centre in centres])
    labels, centroids = kmeans(points, 3, seed=1)
    blobs = [set(labels[20 * blob : 20 * (blob + 1)].tolist()) for blob in range(3)]
    assert all(len(blob) == 1 for blob in blobs) and len(set.union(*blobs)) == 3  # each blob one cluster, all different
    for blob in range(3):
        torch.testing.assert_close(centroids[labels[20 * blob]], points[20 * blob : 20 * (blob + 1)].mean(0))
    assert torch.equal(kmeans(points, 3, seed=1)[0], labels)
    with pytest.raises(ValueError, match="k must be in \\[1, 60\\]"):
        kmeans(points, 61)


def test_flags_mask_any_number_of_tokens_per_image_like_indices_do(tiny_model, padded_batch):
    inputs, _ = padded_batch
    prompt = engine.build_prompt_embeddings(tiny_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    indices = torch.tensor([[0, 3, 4, 9], [1, 2, 7, 24]])
    flags = torch.zeros(2, 25, dtype=torch.bool)
    flags[torch.arange(2)[:, None], indices] = True
    by_index, by_flag = engine.reduce_prompt(prompt, indices, "mask"), engine.reduce_prompt(prompt, flags, "mask")
    assert torch.equal(by_index.attention_mask, by_flag.attention_mask) and by_flag.visible_image_tokens.tolist() == [4, 4]
    uneven = flags.clone()
    uneven[0, 10] = True
    assert engine.reduce_prompt(prompt, uneven, "mask").visible_image_tokens.tolist() == [5, 4]
    empty = flags.clone()
    empty[1] = False
    assert engine.reduce_prompt(prompt, empty, "mask").visible_image_tokens.tolist() == [4, 0]  # masking may hide a whole image
    with pytest.raises(ValueError, match="dropping needs at least one kept token per image"):
        engine.reduce_prompt(prompt, empty, "drop")


def test_accuracy_with_every_token_is_the_models_own_accuracy():
    """Through our engine with all flags set = transformers' forward scored by the recipe's evaluate (another path)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_simignore.shipped import resolve_pretrained
    from lmms_simignore.testbed import shapes
    from lmms_simignore.testbed.llava_recipe import evaluate

    path = resolve_pretrained("shipped:shapes-llava")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    records = shapes.shapes_records(40, seed=shapes.HELD_OUT_SEED)
    everything = accuracy_with_kept(model, processor, records, torch.ones(40, 64, dtype=torch.bool))
    with torch.inference_mode():
        assert everything == evaluate(model, processor, records, "cpu")["overall"]
    nothing = accuracy_with_kept(model, processor, records, torch.zeros(40, 64, dtype=torch.bool))
    assert nothing < everything  # control: without the image it answers worse


def test_clusters_runs_on_the_testbed(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "clusters", "--out", str(tmp_path), "--k", "3",
                                "--num-questions", "24"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((tmp_path / "clusters.json").read_text())
    clusters = report["clusters"]
    assert (report["images"], report["image_tokens"], len(clusters)) == (24, 64, 3)
    assert sum(entry["share"] for entry in clusters) == pytest.approx(1.0)
    assert [entry["mean_similarity"] for entry in clusters] == sorted(entry["mean_similarity"] for entry in clusters)
    assert all(entry["change"] == pytest.approx(entry["accuracy_without"] - report["accuracy_all_tokens"]) for entry in clusters)
    assert (tmp_path / "clusters.png").stat().st_size > 0 and "| cluster | share of tokens |" in completed.stdout


def test_clusters_and_infoflow_take_a_local_scienceqa_split(testbed, tmp_path):
    """--data: the questions with an image of a ScienceQA-IMG-shaped parquet (11 of its 12), on a tiny LLaVA."""
    from lmms_simignore.evaluation.clusters import run_clusters
    from lmms_simignore.evaluation.infoflow import run_infoflow

    report = run_clusters(tmp_path / "clusters", k=2, pretrained=str(testbed["model"]), num_questions=20, data=str(testbed["data"]),
                          echo=lambda line: None)
    assert (report["images"], report["image_tokens"], report["questions"]["count"]) == (11, 25, 11)
    flow = run_infoflow(tmp_path / "flow", pretrained=str(testbed["model"]), num_questions=4, data=str(testbed["data"]),
                        echo=lambda line: None)
    assert (flow["samples"], flow["image_tokens"], len(flow["flows"]["none"]["image_share"]["mean"])) == (4, 25, 3)
