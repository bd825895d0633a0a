"""CI fingerprints of every method on tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision and
InternVL3 checkpoints.

    python -m lmms_simignore fingerprints            # compare; exit 1 and list every moved answer or token count
    python -m lmms_simignore fingerprints --update   # an intentional change: rewrite the expected file

The shipped testbed guards accuracy on LLaVA-1.5; these random models have no accuracy to guard, but their greedy
answers and the image tokens each layer saw move whenever what a method keeps moves. Each family's checkpoint is built in
code (seeded), the docs are ScienceQA-shaped with one or two images of different sizes each, and every row runs through
the family's lmms-eval class in float32 on the CPU, batch 4, so the fingerprints are exact under the lock's torch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lmms_simignore.evaluation.regression import report_differences

FINGERPRINT_ROWS = {  # model_args of each row on the tiny models' 3 decoder layers
    "none": {},
    "simignore": dict(reduction="simignore", keep=0.4),
    "random": dict(reduction="random", keep=0.3),
    "fastv": dict(reduction="fastv", fastv_layer=1, keep=0.5),
    "pdrop": dict(reduction="pdrop", pdrop_layers="1/2", stage_positions="original"),
    "dart": dict(reduction="dart", dart_layer=1, keep=0.4),
    "pool": dict(reduction="pool", keep=0.25),
    "random+fastv": dict(reduction="random+fastv", keep=0.6, fastv_layer=2, fastv_keep=0.25),
    "divprune": dict(reduction="divprune", keep=0.3, divprune_positions="original"),
    # one stage after layer 1: Qwen3-VL's DeepStack adds to the outputs of layers 0 and 1, which a merged token lacks
    "sparsevlm": dict(reduction="sparsevlm", sparsevlm_layers="1", sparsevlm_schedule="5", stage_positions="original"),
}
# the tiled families (1-D positions): PyramidDrop with its own position rule, pooling on each grid of an image, a budget
# per tile, DivPrune (contiguous positions), SparseVLM's two stages (re-packed); VisionZip and VisPruner on LLaVA-NeXT's
# views (its CLIP tower has a CLS token)
TILED_ROWS = FINGERPRINT_ROWS | {"pdrop": dict(reduction="pdrop", pdrop_layers="1/2"),
                                 "random_per_tile": dict(reduction="random", keep=3, budget_per="tile"),
                                 "divprune": dict(reduction="divprune", keep=0.3),
                                 "sparsevlm": dict(reduction="sparsevlm", sparsevlm_layers="0/1", sparsevlm_schedule="12/5")}
CLS_ROWS = {"visionzip": dict(reduction="visionzip", keep=0.3), "vispruner": dict(reduction="vispruner", keep=0.3)}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TILED_FAMILIES = ("llava_next", "llava_onevision", "internvl")
IMAGE_SIZES = [(48, 48), (120, 64), (64, 150), (200, 90), (40, 220), (90, 90)]  # width x height: each image its own grid
SMALL_IMAGES = {"min_pixels": 8 * 28 * 28, "max_pixels": 40 * 28 * 28}  # 8..40 merged tokens per image
TASK, SPLIT = "sqa_fingerprint", "test"
UPDATE_COMMAND = "python -m lmms_simignore fingerprints --update"


def fingerprint_docs() -> list[dict]:
    """ScienceQA-shaped docs whose images all differ in size; the last has none."""
    from lmms_simignore.testbed.tiny import scienceqa_like_records

    records = scienceqa_like_records(num_docs=len(IMAGE_SIZES) + 1, seed=3)
    for record, size in zip(records, IMAGE_SIZES):
        record["image"] = record["image"].resize(size)
    return records


def one_or_two_images(doc: dict) -> list:
    """The doc's image and a wide strip of it: prompts hold one or two images of different sizes."""
    from lmms_simignore.tasks import scienceqa_utils

    visuals = scienceqa_utils.doc_to_visual(doc)
    return visuals + [visuals[0].crop((0, 0, visuals[0].width, max(8, visuals[0].height // 3)))] if visuals else []


def fingerprint_requests(docs: list[dict], chat: bool = False) -> list:
    """One `generate_until` Instance per doc: ScienceQA's prompt with one or two images, 6 new tokens; `chat`: as lmms-eval
    gives a chat class (the doc's messages)."""
    from lmms_eval.api.instance import Instance

    from lmms_simignore.tasks import scienceqa_utils

    kwargs = {"pre_prompt": "", "post_prompt": scienceqa_utils.POST_PROMPT}
    gen_kwargs = {"max_new_tokens": 6, "until": ["\n\n"]}

    def doc_to_messages(doc):
        content = [{"type": "image", "url": image} for image in one_or_two_images(doc)]
        return [{"role": "user", "content": content + [{"type": "text", "text": scienceqa_utils.doc_to_text(doc, kwargs)}]}]

    args = [("", doc_to_messages, dict(gen_kwargs)) if chat else (scienceqa_utils.doc_to_text(doc, kwargs), dict(gen_kwargs), one_or_two_images)
            for doc in docs]
    return [Instance("generate_until", (*request, doc_id, TASK, SPLIT), idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
            for doc_id, request in enumerate(args)]


def family_fingerprints(folder: str | Path, family: str) -> dict:
    """{row: {model_args, answers, visible_per_layer (per doc)}} of one family's checkpoint in `folder`."""
    from lmms_simignore.models.internvl_simignore import InternVLSimignoreChat
    from lmms_simignore.models.llava_simignore import LlavaSimignore
    from lmms_simignore.models.qwen_vl_simignore import Qwen2_5_VLSimignore, Qwen2VLSimignore, Qwen3VLSimignore

    if family == "internvl":
        model_class, rows, loading = InternVLSimignoreChat, TILED_ROWS, {}
    elif family in TILED_FAMILIES:
        model_class, rows, loading = LlavaSimignore, TILED_ROWS | (CLS_ROWS if family == "llava_next" else {}), {}
    else:
        model_class = {"qwen2_vl": Qwen2VLSimignore, "qwen2_5_vl": Qwen2_5_VLSimignore, "qwen3_vl": Qwen3VLSimignore}[family]
        rows, loading = FINGERPRINT_ROWS, SMALL_IMAGES
    docs = fingerprint_docs()
    fingerprints = {}
    for name, model_args in rows.items():
        model = model_class(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, **loading, **model_args)
        model.task_dict = {TASK: {SPLIT: docs}}
        answers = model.generate_until(fingerprint_requests(docs, chat=not model.is_simple))
        records = sorted(model.accounting.records, key=lambda record: record["doc_id"])
        fingerprints[name] = {"model_args": model_args, "answers": answers,
                              "visible_per_layer": [record["visible_per_layer"] for record in records]}
    return fingerprints


def all_fingerprints(workdir: str | Path) -> dict:
    """The expected file's content: every family's rows, each family's checkpoint built (seed 0) under `workdir`."""
    from lmms_simignore.testbed.tiny_internvl import build_tiny_internvl
    from lmms_simignore.testbed.tiny_llava_next import build_tiny_llava_next, build_tiny_llava_onevision
    from lmms_simignore.testbed.tiny_qwen import build_tiny_qwen

    builders = {"llava_next": build_tiny_llava_next, "llava_onevision": build_tiny_llava_onevision, "internvl": build_tiny_internvl}
    folders = {family: build_tiny_qwen(Path(workdir) / family, family, seed=0) for family in QWEN_FAMILIES}
    folders |= {family: builders[family](Path(workdir) / family, seed=0) for family in TILED_FAMILIES}
    return {"update_with": UPDATE_COMMAND, "families": {family: family_fingerprints(folder, family) for family, folder in folders.items()}}


def fingerprint_differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprint records ([] when they agree)."""
    found = []
    for family in sorted(expected["families"].keys() | actual["families"].keys()):
        want, got = expected["families"].get(family, {}), actual["families"].get(family, {})
        if list(want) != list(got):
            found.append(f"{family}: rows expected {list(want)}, got {list(got)}")
        for row in want.keys() & got.keys():
            if want[row]["model_args"] != got[row]["model_args"]:
                found.append(f"{family} {row}: model_args expected {want[row]['model_args']}, got {got[row]['model_args']}")
            for key in ("answers", "visible_per_layer"):
                if len(want[row][key]) != len(got[row][key]):
                    found.append(f"{family} {row}: {len(want[row][key])} docs' {key} expected, got {len(got[row][key])}")
                found += [f"{family} {row}: doc {doc_id} {key} expected {a!r}, got {b!r}"
                          for doc_id, (a, b) in enumerate(zip(want[row][key], got[row][key])) if a != b]
    return found


def dump_fingerprints(record: dict) -> str:
    """JSON with one line per row."""
    lines = [f' "update_with": {json.dumps(record["update_with"])},', ' "families": {']
    families = list(record["families"].items())
    for index, (family, rows) in enumerate(families):
        lines.append(f"  {json.dumps(family)}: {{")
        lines.append(",\n".join(f"   {json.dumps(name)}: {json.dumps(row)}" for name, row in rows.items()))
        lines.append("  }" + ("," if index + 1 < len(families) else ""))
    return "{\n" + "\n".join(lines) + "\n }\n}\n"


def run_fingerprints(expected_path: str | Path, update: bool = False, echo=print) -> int:
    """Compare the fingerprints with (or, with `update`, write them to) the expected file: 0 when they match."""
    expected_path = Path(expected_path)
    if not update and not expected_path.is_file():
        raise FileNotFoundError(f"--expected {expected_path}: no such file (create it with `{UPDATE_COMMAND}`)")
    with tempfile.TemporaryDirectory(prefix="lmms-simignore-fingerprints-") as scratch:
        actual = all_fingerprints(scratch)
    count = sum(len(rows) for rows in actual["families"].values())
    if update:
        expected_path.parent.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(dump_fingerprints(actual))
        echo(f"wrote {expected_path}: {count} rows")
        return 0
    found = fingerprint_differences(json.loads(expected_path.read_text()), actual)
    return report_differences(found, expected_path, UPDATE_COMMAND, f"fingerprints: all {count} rows match", echo)
