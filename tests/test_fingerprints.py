"""CI guard of every method on the tiny random Qwen-VL, LLaVA-NeXT, LLaVA-OneVision and InternVL3 checkpoints: answers and
per-layer image tokens of each row equal the committed file (after an intentional change: python -m lmms_simignore
fingerprints --update)."""

import copy
import json
from pathlib import Path

import pytest

from lmms_simignore.evaluation.fingerprints import (CLS_ROWS, FINGERPRINT_ROWS, TILED_ROWS, all_fingerprints,
                                                   fingerprint_differences)

pytest.importorskip("torchvision")  # transformers' Qwen-VL processors need it

EXPECTED = Path(__file__).parent / "expected" / "fingerprints.json"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return all_fingerprints(tmp_path_factory.mktemp("fingerprints"))


def test_every_method_on_every_qwen_family_answers_as_the_expected_file(measured):
    found = fingerprint_differences(json.loads(EXPECTED.read_text()), measured)
    assert found == [], "\n".join(found[:40]) + "\n(intentional? python -m lmms_simignore fingerprints --update)"
    assert {family: list(rows) for family, rows in measured["families"].items()} == {
        **{family: list(FINGERPRINT_ROWS) for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
        **{family: list(TILED_ROWS) for family in ("llava_onevision", "internvl")}, "llava_next": [*TILED_ROWS, *CLS_ROWS]}


def test_the_rows_differ_from_each_other_and_a_moved_answer_is_named(measured):
    """Each method changes something on each family (else the fingerprint could not catch its breakage)."""
    for family, rows in measured["families"].items():
        fingerprints = [json.dumps([row["answers"], row["visible_per_layer"]]) for row in rows.values()]
        assert len(set(fingerprints)) == len(fingerprints), family
    moved = copy.deepcopy(measured)
    moved["families"]["qwen3_vl"]["dart"]["answers"][2] += "!"
    moved["families"]["qwen2_vl"]["pool"]["visible_per_layer"][0] = [1, 1, 1]
    assert fingerprint_differences(measured, moved) == [
        f"qwen2_vl pool: doc 0 visible_per_layer expected {measured['families']['qwen2_vl']['pool']['visible_per_layer'][0]!r}, got [1, 1, 1]",
        f"qwen3_vl dart: doc 2 answers expected {measured['families']['qwen3_vl']['dart']['answers'][2]!r}, "
        f"got {moved['families']['qwen3_vl']['dart']['answers'][2]!r}",
    ]
