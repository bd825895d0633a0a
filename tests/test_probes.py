"""`probes`: ridge probes of scene attributes from the hidden states per depth and token group, without and with a
reduction; the probe on toy sets, the pooling on hand-made rows, the states against transformers' own on the tiny
random LLaVA (3 layers, 25 image tokens), and one run on the shipped testbed."""

import json
import subprocess
import sys

import pytest
import torch
from test_fastv import NONE, padded_batch  # noqa: F401  (padded_batch is a fixture)

from lmms_simignore import engine
from lmms_simignore.evaluation.probes import (GROUPS, attribute_labels, column_labels, depth_features, fit_probe, group_means,
                                              held_out_accuracy, majority_share, probe_sets)
from lmms_simignore.methods.fastv import fastv_stage
from lmms_simignore.settings import ReductionSettings


def blobs(centres: torch.Tensor, per_class: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C * per_class, D) points around each of the (C, D) centres, interleaved by class, and their (N,) labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat(per_class)
    return centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=generator), labels


def test_the_probe_reads_separable_classes_perfectly_on_held_out_points():
    centres = 4 * torch.eye(4, 16)  # four classes, apart along their own axis
    train, train_labels = blobs(centres, 30, 0.5, seed=0)
    test, test_labels = blobs(centres, 50, 0.5, seed=1)
    assert held_out_accuracy(train, train_labels, test, test_labels, 4) == 1.0
    probe = fit_probe(train, train_labels, 4)
    assert torch.equal(probe.predict(train), train_labels) and probe.penalty in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def test_the_probe_is_at_chance_on_labels_independent_of_the_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 16, generator=generator)
    labels = torch.randint(0, 4, (1000,), generator=generator)
    accuracy = held_out_accuracy(features[:600], labels[:600], features[600:], labels[600:], 4)
    assert abs(accuracy - 0.25) < 0.06, accuracy
    assert majority_share(torch.tensor([2, 2, 1, 2]), 3) == 0.75 and majority_share(labels[600:], 4) < 0.31


def test_the_probe_is_the_same_fit_every_time_and_its_penalty_is_chosen_on_the_training_split_only():
    centres = torch.eye(3, 8)
    train, train_labels = blobs(centres, 20, 1.0, seed=2)
    first, second = fit_probe(train, train_labels, 3), fit_probe(train, train_labels, 3)
    assert torch.equal(first.weights, second.weights) and first.penalty == second.penalty
    noisy = fit_probe(torch.randn(60, 40, generator=torch.Generator().manual_seed(3)), train_labels, 3)
    assert noisy.penalty == 100.0  # no signal: the leave-one-out error prefers the strongest penalty
    with pytest.raises(ValueError, match="same number"):
        fit_probe(train[:5], train_labels, 3)


def test_groups_pool_the_visible_image_tokens_the_text_after_the_image_and_the_last_token():
    # row 0: pad, text, image, image (masked: dropped by a reduction), image, text, text; row 1: no padding
    hidden = torch.arange(14, dtype=torch.float32).reshape(2, 7, 1)
    hidden[0, 0] = float("nan")  # a padding column's state must not reach any group
    visible = torch.tensor([[False, True, True, False, True, True, True], [True] * 7])
    is_image = torch.tensor([[False, False, True, True, True, False, False], [False, True, True, False, False, False, False]])
    pooled = group_means(hidden, visible, is_image)  # (2, 3, 1)
    assert pooled.shape == (2, len(GROUPS), 1)
    torch.testing.assert_close(pooled[0].flatten(), torch.tensor([(2 + 4) / 2, (5 + 6) / 2, 6.0]))  # token 3 not counted
    torch.testing.assert_close(pooled[1].flatten(), torch.tensor([(8 + 9) / 2, (10 + 11 + 12 + 13) / 4, 13.0]))


def reduced_prompt(model, inputs, settings=NONE):
    prompt = engine.build_prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    plan = engine.plan_for(model.config, settings)
    kept = engine.choose_kept_image_tokens(plan, prompt.image_features, image_seeds=[0, 1])
    return prompt, engine.reduce_prompt(prompt, kept, settings.apply), kept


def transformers_states(testbed, inputs):
    """transformers' own forward: output_hidden_states (the inputs of the 3 layers) and, read by a hook on the last
    layer, its output (before the final norm): (4, B, L, D)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(testbed["model"]).eval()
    outputs = []
    handle = model.model.language_model.layers[-1].register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with torch.inference_mode():
            output = model(**inputs, position_ids=engine.default_position_ids(inputs["attention_mask"]), output_hidden_states=True)
    finally:
        handle.remove()
    last = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    torch.testing.assert_close(model.model.language_model.norm(last), output.hidden_states[-1])  # the hook read the right thing
    return torch.stack([*output.hidden_states[:-1], last])


def test_the_features_at_every_depth_pool_transformers_own_hidden_states(testbed, tiny_model, padded_batch):  # noqa: F811
    inputs, _ = padded_batch
    expected_states = transformers_states(testbed, inputs)  # (4, B, L, D)
    visible, is_image = inputs["attention_mask"].bool(), inputs["input_ids"] == tiny_model.config.image_token_id
    expected = torch.stack([group_means(states, visible, is_image) for states in expected_states], dim=1)  # (B, 4, 3, D)
    _, reduced, _ = reduced_prompt(tiny_model, inputs)
    features = depth_features(tiny_model, reduced)
    assert features.shape == (2, 4, 3, tiny_model.config.text_config.hidden_size)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[:, 2], features[:, 3])  # the last layer's output is there, not its input again
    assert not tiny_model.model.language_model.norm._forward_pre_hooks  # the final norm's hook is gone


def test_with_a_reduction_before_the_llm_the_image_group_holds_only_the_kept_tokens(tiny_model, padded_batch):  # noqa: F811
    inputs, _ = padded_batch
    settings = ReductionSettings(reduction="random", keep=10)
    prompt, reduced, kept = reduced_prompt(tiny_model, inputs, settings)
    features = depth_features(tiny_model, reduced)
    kept_embeddings = prompt.image_features.gather(1, kept[..., None].expand(-1, -1, prompt.image_features.shape[-1]))
    torch.testing.assert_close(features[:, 0, 0], kept_embeddings.mean(dim=1))  # depth 0: the 10 kept tokens' embeddings
    assert not torch.allclose(features[:, 0, 0], prompt.image_features.mean(dim=1))
    _, masked, _ = reduced_prompt(tiny_model, inputs, ReductionSettings(reduction="random", keep=10, apply="mask"))
    torch.testing.assert_close(depth_features(tiny_model, masked), features, atol=1e-5, rtol=1e-5)  # mask = drop


def test_a_stage_inside_the_llm_changes_the_image_group_from_its_layer_on(tiny_model, padded_batch):  # noqa: F811
    """FastV at layer 2 keeping 6: depths 0-1 as without it; at depth 2 (layer 2's input) the text tokens and the last
    token are layer 1's outputs as before, the image group the mean of 6 of them."""
    inputs, _ = padded_batch
    _, reduced, _ = reduced_prompt(tiny_model, inputs)
    plain, fastv = depth_features(tiny_model, reduced), depth_features(tiny_model, reduced, fastv_stage(2, 6))
    torch.testing.assert_close(fastv[:, :2], plain[:, :2])
    torch.testing.assert_close(fastv[:, 2, 1:], plain[:, 2, 1:])
    assert not torch.allclose(fastv[:, 2, 0], plain[:, 2, 0]) and not torch.allclose(fastv[:, 3], plain[:, 3])


def test_labels_are_the_object_count_and_the_single_objects_attributes():
    sets = probe_sets(24, seed=5)
    assert {record["question"] for records in sets.values() for record in records} == {"How many objects are there?"}
    counts = attribute_labels(sets["scenes"], "count")
    assert counts.tolist() == [record["num_objects"] - 1 for record in sets["scenes"]] and len(set(counts.tolist())) > 2
    one = {"colour": "blue", "shape": "triangle", "size": "small", "left": 50, "top": 2}  # centre (53.5, 5.5)
    record = {"num_objects": 1, "objects": [one]}
    assert [attribute_labels([record], name).item() for name in ("colour", "shape", "size", "position")] == [2, 2, 0, 2]
    with pytest.raises(ValueError, match="the colour probe reads scenes with one object; a scene has 2"):
        attribute_labels([{"num_objects": 2, "objects": [one, {**one, "left": 0}]}], "colour")


def test_probes_runs_on_the_testbed_and_reads_the_colour_from_the_image_tokens(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "lmms_simignore", "probes", "--out", str(tmp_path), "--num-questions", "60",
                                "--reduction", "reduction=simignore,keep=16"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((tmp_path / "probes.json").read_text())
    assert (report["depths"], report["split"]["train"], report["split"]["held_out"]) == (5, 36, 24)
    assert report["image_tokens_per_layer"] == {"none": [64] * 4, "reduced": [16] * 4}
    assert list(report["accuracy"]) == ["none", "reduced"]
    for setting in report["accuracy"].values():
        assert list(setting) == ["count", "colour", "shape", "size", "position"]
        assert all(list(groups) == list(GROUPS) and all(len(line) == 5 for line in groups.values()) for groups in setting.values())
    chance = report["chance"]["colour"]
    assert 0.25 <= chance < 0.5
    for setting in ("none", "reduced"):  # shuffled or misaligned labels would sit near chance
        assert max(report["accuracy"][setting]["colour"]["image"]) >= 0.9
        # every prompt asks the same question: before any layer, the text knows nothing of the image
        assert all(report["accuracy"][setting][attribute]["text"][0] <= report["chance"][attribute] for attribute in report["chance"])
    assert (tmp_path / "probes.png").stat().st_size > 0
    assert "| colour | image |" in completed.stdout


@pytest.mark.parametrize("arguments, message", [
    ({"num_questions": 19}, "--num-questions must be at least 20"),
    ({"data": "sqa.parquet"}, "--labels names the label columns of --data"),
    ({"labels": "colour"}, "--labels names the label columns of --data"),
    ({"reduction": "reduction=simignore,keep=0"}, "leaves decoder layer 0 no image token"),
    ({"reduction": "reduction=fastv,fastv_layer=2,fastv_keep=0"}, "leaves decoder layer 2 no image token"),
])
def test_arguments_the_probes_cannot_take_are_refused_naming_them(tmp_path, arguments, message):
    from lmms_simignore.evaluation.probes import run_probes

    with pytest.raises(ValueError, match=message):
        run_probes(tmp_path, echo=lambda line: None, **arguments)
    assert not (tmp_path / "probes.json").exists()


def labelled_split(path, count=40):
    """A local split in ScienceQA-IMG's columns (generated one-object scenes, asking their count) with label columns:
    the object's colour, and a column of one value."""
    from datasets import Dataset, Features, Image, Sequence, Value

    records = probe_sets(count, seed=3)["one_object"]
    rows = [{"image": record["image"], "question": record["question"], "choices": record["choices"], "hint": record["hint"],
             "answer": record["answer"], "colour": record["objects"][0]["colour"], "source": "shapes"} for record in records]
    features = Features({"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")), "hint": Value("string"),
                         "answer": Value("int64"), "colour": Value("string"), "source": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(str(path))
    return rows


def test_column_labels_are_each_column_s_distinct_values_and_refuse_what_cannot_be_probed():
    docs = [{"colour": "red", "n": 2}, {"colour": "blue", "n": 2}, {"colour": "red", "n": 2}]
    classes, labels = column_labels(docs, ["colour"])
    assert classes == {"colour": ("blue", "red")} and labels["colour"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="--labels: column 'n' has one value"):
        column_labels(docs, ["n"])
    with pytest.raises(ValueError, match="--labels: column 'shape' is missing or empty in doc 0"):
        column_labels(docs, ["shape"])


def test_probes_read_the_label_columns_of_a_local_split(tmp_path):
    """The split's own prompts; the colour of its scenes' single object is read from the image tokens."""
    from lmms_simignore.evaluation.probes import run_probes

    rows = labelled_split(tmp_path / "split.parquet")
    with pytest.raises(ValueError, match="column 'source' has one value"):
        run_probes(tmp_path / "out", num_questions=40, data=str(tmp_path / "split.parquet"), labels="colour,source", echo=lambda line: None)
    report = run_probes(tmp_path / "out", num_questions=40, data=str(tmp_path / "split.parquet"), labels="colour", echo=lambda line: None)
    assert report["classes"] == {"colour": sorted({row["colour"] for row in rows})}
    assert (report["split"]["train"], report["split"]["held_out"], report["attribute_set"]) == (24, 16, {"colour": "data"})
    assert max(report["accuracy"]["none"]["colour"]["image"]) >= 0.9 > report["chance"]["colour"]
    assert json.loads((tmp_path / "out" / "probes.json").read_text())["sets"]["data"]["count"] == 40
