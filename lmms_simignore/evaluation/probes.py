"""Linear probes of what the hidden states carry about the image, per decoder layer and token group ("Seeing Beyond
Redundancy", Hannan et al., arXiv 2602.06914, Figs. 4 and 5), without and with a reduction:

    python -m lmms_simignore probes --out DIR [--pretrained shipped:shapes-llava] [--num-questions 300] [--seed S]
                                    [--reduction reduction=simignore,keep=16] [--data SPLIT --labels COLUMN,...]

The labels come from the shapes scene generator: the object count (1-6) of scenes with one to six objects, and the
colour, shape, size and position (the 3 x 3 region of its centre, `scenes.region`) of the object of scenes with a
single object, so that every label names one thing in the picture. Every prompt asks the same question ("How many
objects are there?", options 1-6), so the text tokens can only know about the image what they read from it.

At each depth k (the residual stream after k decoder layers: depth 0 is the first layer's input, i.e. the embeddings
as the reduction left them; depth k < L is layer k's input, so after an in-LLM stage at layer k it holds only the
tokens the stage kept; depth L is the last layer's output, the final norm's input) three features per prompt: the
mean over the image tokens the layer still has (visible ones: a token a reduction dropped or masked is not counted;
merged tokens are), the mean over the text tokens after the image (the last one included), and the last token. A
ridge probe per attribute, group and depth is fitted on the first 60% of the prompts and scored on the last 40%
(held out); chance is the majority class's share of the held-out prompts. With `--reduction`, the probes are fitted
again on the reduced model's states, same prompts and split: where a line drops, the method removed what the probe
read. Writes probes.json and probes.png, and prints a Markdown table.

With `--data` (a local split in ScienceQA-IMG's columns, as `infoflow --data` reads, plus label columns) and
`--labels`, the probes read those columns instead: each label's classes are its distinct values, and the prompts are
the split's own questions (lmms-eval's scienceqa_img prompt), so a label the question names (or its options) can be
read from the text alone: compare the text group before the first layer with chance.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lmms_simignore import engine
from lmms_simignore.evaluation.reports import write_report
from lmms_simignore.settings import ReductionSettings
from lmms_simignore.testbed import scenes, shapes

GROUPS = ("image", "text", "last")
GROUP_WORDS = {"image": "image tokens (mean over those the layer has)", "text": "text tokens after the image (mean)",
               "last": "last token"}
POSITIONS = tuple("centre" if (row, column) == (1, 1) else f"{vertical} {horizontal}"
                  for row, vertical in enumerate(scenes.REGIONS[0]) for column, horizontal in enumerate(scenes.REGIONS[1]))
ATTRIBUTES = {"count": shapes.COUNTS, "colour": scenes.COLOURS, "shape": scenes.SHAPES, "size": tuple(scenes.SIZES),
              "position": POSITIONS}
SCENE_SETS = {"count": "scenes", "colour": "one_object", "shape": "one_object", "size": "one_object", "position": "one_object"}
QUESTION_TYPE = "count"  # every prompt: "How many objects are there?", options 1-6
TRAIN_SHARE = 0.6  # the first 60% of a set's prompts train the probes, the rest are held out
MIN_QUESTIONS = 20  # per set: at least 12 to train on and 8 held out
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge penalties tried, per training sample


def group_means(hidden: torch.Tensor, visible: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """(B, S, D) hidden states of a layer's sequence -> (B, 3, D): per row, the mean over its visible image tokens,
    the mean over its visible text tokens after the image's last column (the last token among them), and its last
    visible token (GROUPS, in that order). visible: (B, S) bool, the columns the attention mask lets the prompt see;
    is_image: (B, S) bool, image tokens (masked ones too: they still mark where the image ends). A row without a
    token in a group gets zeros there."""
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    last_image = torch.where(is_image, columns, -1).amax(dim=1)  # (B,)
    image = visible & is_image
    text = visible & ~is_image & (columns[None] > last_image[:, None])  # (B, S)
    last = columns[None] == torch.where(visible, columns, -1).amax(dim=1)[:, None]  # (B, S) one column per row
    weights = torch.stack([image, text, last], dim=1).to(hidden.dtype)  # (B, 3, S)
    hidden = hidden.masked_fill(~visible[..., None], 0)  # padding's states may be anything, even NaN
    return (weights @ hidden) / weights.sum(dim=2, keepdim=True).clamp_min(1)  # (B, 3, D)


@contextmanager
def inputs_of(module: torch.nn.Module):
    """A list that receives `module`'s first positional input at every call inside the block (the hook is removed on
    exit)."""
    received: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(partial(_record_input, received))
    try:
        yield received
    finally:
        handle.remove()


def _record_input(received: list, module, args) -> None:
    received.append(args[0])


@torch.inference_mode()
def depth_features(model, reduced: engine.ReducedPrompt, stages: tuple = ()) -> torch.Tensor:
    """(B, L + 1, 3, D) float32 `group_means` of a prompt pass at every depth: depth k < L is decoder layer k's input
    (the embeddings at k = 0; after an in-LLM stage at layer k, the tokens it kept), depth L the last layer's output
    (the final norm's input; same columns as layer L - 1's input). `stages`: the plan's in-LLM stages."""
    pooled, masks = [], []

    def observe(index, layer, hidden, position_embeddings, visible, columns, is_image):
        pooled.append(group_means(hidden, visible, is_image).float())
        masks[:] = [visible, is_image]

    run = engine.LanguageModelRun(model, reduced, observe=observe, stages=stages)
    with inputs_of(run.final_norm) as final:
        run.prefill()
    pooled.append(group_means(final[0], *masks).float())
    return torch.stack(pooled, dim=1).cpu()


@dataclass(frozen=True)
class Probe:
    """A linear read-out: class scores (N, C) = ((features - mean) / scale) @ weights + bias.

    mean, scale: (D,) of the training features; weights: (D, C); bias: (C,); penalty: the ridge penalty chosen, per
    training sample."""

    mean: torch.Tensor
    scale: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor
    penalty: float

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) the class with the highest score (the lowest index on ties)."""
        standard = (features.double() - self.mean) / self.scale  # (N, D)
        return (standard @ self.weights + self.bias).argmax(dim=1)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, penalties: tuple[float, ...] = PENALTIES) -> Probe:
    """Ridge regression of the one-hot labels on standardised features, in closed form (float64, deterministic).

    features: (N, D); labels: (N,) in [0, classes). The penalty (times N) is the one among `penalties` whose
    leave-one-out squared error on these N samples is lowest (exact for ridge: residual / (1 - leverage); the larger
    penalty on a tie): nothing outside the training split is looked at."""
    if features.shape[0] != labels.shape[0] or features.shape[0] < 2:
        raise ValueError(f"fit_probe needs the same number (>= 2) of feature rows and labels, got {features.shape[0]} "
                         f"and {labels.shape[0]}")
    count = features.shape[0]
    x = features.double()
    mean, spread = x.mean(dim=0), x.std(dim=0, unbiased=False)
    scale = torch.where(spread > 1e-12, spread, torch.ones_like(spread))  # a constant feature stays 0
    targets = torch.nn.functional.one_hot(labels.long(), classes).double()  # (N, C)
    bias = targets.mean(dim=0)  # (C,)
    u, singular, vt = torch.linalg.svd((x - mean) / scale, full_matrices=False)  # (N, R), (R,), (R, D)
    projected = u.T @ (targets - bias)  # (R, C)
    best_error, best_penalty = None, None
    for penalty in sorted(penalties):
        shrink = singular**2 / (singular**2 + penalty * count)  # (R,)
        fitted = u @ (shrink[:, None] * projected) + bias  # (N, C)
        leverage = (u**2) @ shrink + 1 / count  # (N,), the intercept's 1/N included
        error = ((targets - fitted) / (1 - leverage).clamp_min(1e-9)[:, None]).pow(2).mean()
        if best_error is None or error <= best_error:
            best_error, best_penalty = error, penalty
    weights = vt.T @ ((singular / (singular**2 + best_penalty * count))[:, None] * projected)  # (D, C)
    return Probe(mean, scale, weights, bias, best_penalty)


def held_out_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                      classes: int) -> float:
    """Accuracy on (M, D) `test` of the probe fitted on (N, D) `train`."""
    return (fit_probe(train, train_labels, classes).predict(test) == test_labels).double().mean().item()


def majority_share(labels: torch.Tensor, classes: int) -> float:
    """(N,) labels -> the share of the most frequent class (the accuracy of always answering it)."""
    return torch.bincount(labels.long(), minlength=classes).max().item() / labels.numel()


def attribute_labels(records: list[dict], attribute: str) -> torch.Tensor:
    """(N,) the index in ATTRIBUTES[attribute] of each record's object count, or of its single object's colour,
    shape, size or position (region of its centre); a record with several objects has no single-object label."""
    values = ATTRIBUTES[attribute]
    if attribute == "count":
        return torch.tensor([values.index(str(record["num_objects"])) for record in records])
    labels = []
    for record in records:
        if len(record["objects"]) != 1:
            raise ValueError(f"the {attribute} probe reads scenes with one object; a scene has {len(record['objects'])}")
        obj = scenes.PlacedObject(**record["objects"][0])
        labels.append(values.index(scenes.region(obj) if attribute == "position" else getattr(obj, attribute)))
    return torch.tensor(labels)


def column_labels(docs: list[dict], columns: list[str], argument: str = "--labels") -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """A local split's label columns -> (column -> its classes: the distinct values as text, sorted; column -> (N,)
    each doc's class index). Refuses a missing column, or one with fewer than two classes, naming it."""
    classes, labels = {}, {}
    for column in columns:
        missing = [index for index, doc in enumerate(docs) if doc.get(column) is None]
        if missing:
            raise ValueError(f"{argument}: column {column!r} is missing or empty in doc {missing[0]} of the split "
                             f"(its columns: {', '.join(sorted(docs[0]))})")
        values = [str(doc[column]) for doc in docs]
        classes[column] = tuple(sorted(set(values)))
        if len(classes[column]) < 2:
            raise ValueError(f"{argument}: column {column!r} has one value ({values[0]!r}) in the docs read: nothing to probe")
        labels[column] = torch.tensor([classes[column].index(value) for value in values])
    return classes, labels


def probe_sets(num_questions: int, seed: int) -> dict[str, list[dict]]:
    """The two sets of shapes records, all asking the count question: "scenes" (1-6 objects, seed `seed`) for the
    count probe and "one_object" (seed `seed + 1`) for the single-object attributes."""
    return {"scenes": shapes.shapes_records(num_questions, seed=seed, question_types=(QUESTION_TYPE,)),
            "one_object": shapes.shapes_records(num_questions, seed=seed + 1, max_objects=1, question_types=(QUESTION_TYPE,))}


def check_probe_plan(settings: ReductionSettings, plan) -> None:
    """Refuse a reduction that leaves some decoder layer no image token: the image group would be empty there."""
    visible = plan.visible_per_layer()
    if min(visible) < 1:
        raise ValueError(f"--reduction: reduction={settings.reduction} leaves decoder layer {visible.index(min(visible))} no "
                         f"image token (image tokens per layer: {visible}); the image-token probes need at least one")


def prompt_features(model, processor, records: list[dict], settings: ReductionSettings, plan, batch_size: int,
                    progress=None, prompts=None) -> torch.Tensor:
    """(N, L + 1, 3, D) `depth_features` of `records` under `plan`, batched into processor inputs by `prompts(batch)`
    (default: shapes records in the testbed's prompt)."""
    from lmms_simignore.evaluation.samples import shapes_prompts
    from lmms_simignore.models.base import options_text

    prompts = prompts or shapes_prompts(processor)
    features = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        texts = [options_text(record["choices"], settings.text_style) for record in batch]
        reduced = engine.prepare_reduced_prompt(model, processor.tokenizer, plan, prompts(batch), texts,
                                                list(range(start, start + len(batch))))
        features.append(depth_features(model, reduced, plan.layers))
        if progress is not None:
            progress.update(len(batch))
    return torch.cat(features)


def probe_accuracies(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], classes: dict[str, tuple] = ATTRIBUTES,
                     attribute_set: dict[str, str] = SCENE_SETS) -> dict[str, dict[str, list[float]]]:
    """features: set name -> (N, L + 1, 3, D); labels: attribute -> (N,) over its set (`attribute_set`), indices into
    `classes[attribute]` -> attribute -> group -> held-out accuracy per depth (the first TRAIN_SHARE of the prompts
    train, the rest are held out)."""
    accuracy = {}
    for attribute, values in classes.items():
        states, targets = features[attribute_set[attribute]], labels[attribute]
        train = int(len(targets) * TRAIN_SHARE)
        accuracy[attribute] = {
            group: [round(held_out_accuracy(states[:train, depth, index], targets[:train], states[train:, depth, index],
                                            targets[train:], len(values)), 4) for depth in range(states.shape[1])]
            for index, group in enumerate(GROUPS)
        }
    return accuracy


def run_probes(out_dir: str | Path, pretrained: str = "shipped:shapes-llava", num_questions: int = 300, seed: int | None = None,
               reduction: str | None = None, data: str | None = None, labels: str | None = None, batch_size: int = 32,
               echo=print) -> dict:
    """Probe without a reduction and, if `reduction` ("reduction=simignore,keep=16") is given, with it, on two sets
    of `num_questions` generated shapes prompts (`probe_sets`; default seed: the held-out one), or on the first
    `num_questions` docs of the local split `data` for its columns `labels` ("colour,shape"); write probes.json and
    probes.png. Bad arguments are refused before any prompt is run."""
    from lmms_eval.utils import simple_parse_args_string
    from tqdm import tqdm

    from lmms_simignore.models.mipha import load_llava

    if (data is None) != (not labels):
        raise ValueError("--labels names the label columns of --data (a local split); give both or neither")
    if num_questions < MIN_QUESTIONS:
        raise ValueError(f"--num-questions must be at least {MIN_QUESTIONS} (per set: {TRAIN_SHARE:.0%} to fit each probe "
                         f"on, the rest held out), got {num_questions}")
    settings = {"none": ReductionSettings()}
    if reduction:
        settings["reduced"] = ReductionSettings(**simple_parse_args_string(reduction))
    if data is not None:  # read (and refused) before the model loads
        from lmms_simignore.bench.scienceqa_pass import local_docs

        docs = local_docs(data, num_questions, argument="--data")
        if len(docs) < MIN_QUESTIONS:
            raise ValueError(f"--data {data}: {len(docs)} questions with an image; the probes need at least {MIN_QUESTIONS}")
        columns = [column.strip() for column in labels.split(",") if column.strip()]
        classes, label_indices = column_labels(docs, columns)
    model, processor = load_llava(pretrained)
    plans = {name: engine.plan_for(model.config, value) for name, value in settings.items()}
    for name, value in settings.items():
        check_probe_plan(value, plans[name])
    if data is None:
        seed = shapes.HELD_OUT_SEED if seed is None else seed
        sets, prompts = probe_sets(num_questions, seed), None
        classes, attribute_set = ATTRIBUTES, SCENE_SETS
        label_indices = {attribute: attribute_labels(sets[SCENE_SETS[attribute]], attribute) for attribute in ATTRIBUTES}
        question = "How many objects are there? (options 1-6), for every prompt"
        sources = {"scenes": {"seed": seed, "count": num_questions, "objects": "1-6"},
                   "one_object": {"seed": seed + 1, "count": num_questions, "objects": "1"}}
    else:
        from lmms_simignore.evaluation.samples import scienceqa_prompts

        sets, prompts, attribute_set = {"data": docs}, scienceqa_prompts(processor), {column: "data" for column in columns}
        question = "each doc's own question (lmms-eval's scienceqa_img prompt)"
        sources = {"data": {"path": str(data), "count": len(docs)}}
    count = len(next(iter(sets.values())))
    with tqdm(total=len(settings) * sum(len(records) for records in sets.values()), desc="probes: prompt passes", unit="prompt") as progress:
        features = {name: {set_name: prompt_features(model, processor, records, settings[name], plans[name], batch_size, progress,
                                                     prompts) for set_name, records in sets.items()} for name in settings}
    train = int(count * TRAIN_SHARE)
    num_layers = model.config.text_config.num_hidden_layers
    report = {
        "model": pretrained, "reduction": reduction or "none",
        "question": question,
        "sets": sources,
        "split": {"train": train, "held_out": count - train, "order": "the first prompts of each set train"},
        "depths": num_layers + 1,
        "depth": "k: the residual stream after k decoder layers (0: the embeddings as the reduction left them; k < L: "
                 "layer k's input; L: the last layer's output, before the final norm)",
        "groups": GROUP_WORDS,
        "image_tokens_per_layer": {name: plan.visible_per_layer() for name, plan in plans.items()},
        "probe": "ridge on standardised features, penalty by leave-one-out error on the training split",
        "chance": {attribute: round(majority_share(label_indices[attribute][train:], len(values)), 4)
                   for attribute, values in classes.items()},
        "chance_rule": "the majority class's share of the held-out prompts",
        "classes": {attribute: list(values) for attribute, values in classes.items()},
        "attribute_set": attribute_set,
        "accuracy": {name: probe_accuracies(by_set, label_indices, classes, attribute_set) for name, by_set in features.items()},
    }
    out_dir = write_report(out_dir, "probes", report, plot)
    echo(probe_table(report))
    echo(f"\nwrote {out_dir / 'probes.json'} and probes.png")
    return report


def probe_table(report: dict) -> str:
    """Markdown: per attribute and group, the held-out accuracy at each depth ("none / reduced" with a reduction)."""
    from lmms_simignore.markdown import table

    names = list(report["accuracy"])
    rows = []
    for attribute in report["classes"]:
        for group in GROUPS:
            cells = zip(*(report["accuracy"][name][attribute][group] for name in names))
            rows.append([attribute, group, f"{report['chance'][attribute]:.3f}",
                         *(" / ".join(f"{value:.3f}" for value in values) for values in cells)])
    heading = f"held-out accuracy ({' / '.join(names)}; reduction: {report['reduction']})"
    return heading + "\n\n" + table(["attribute", "tokens", "chance", *(f"depth {depth}" for depth in range(report["depths"]))],
                                    rows, align="llr" + "r" * report["depths"])


def plot(report: dict, path: Path) -> None:
    """One panel per attribute: held-out accuracy against depth, a colour per token group, solid without the
    reduction and dashed with it, chance as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": "-", "reduced": "--"}
    depths = range(report["depths"])
    attributes = list(report["classes"])
    figure, axes = plt.subplots(1, len(attributes), figsize=(3.2 * max(len(attributes), 2), 3.4), sharey=True,
                                constrained_layout=True, squeeze=False)
    axes = axes[0]
    for axis, attribute in zip(axes, attributes):
        axis.axhline(report["chance"][attribute], color="grey", linewidth=1, label="chance")
        for index, group in enumerate(GROUPS):
            for name, accuracy in report["accuracy"].items():
                label = f"{group} ({'none' if name == 'none' else report['reduction']})"
                axis.plot(depths, accuracy[attribute][group], styles[name], color=f"C{index}", marker="o", markersize=3, label=label)
        axis.set_title(f"{attribute} ({len(report['classes'][attribute])} classes)")
        axis.set_xticks(list(depths))
        axis.set_xlabel("decoder layers passed")
        axis.set_ylim(0, 1.02)
    axes[0].set_ylabel("held-out accuracy")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    figure.suptitle(f"Linear probes of {report['model']} ({report['split']['train']} train / {report['split']['held_out']} "
                    f"held-out prompts per set)")
    figure.savefig(path, dpi=110)
    plt.close(figure)
