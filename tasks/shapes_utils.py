"""Prompt and scoring for the shapes benchmark: ScienceQA-IMG format, accuracy overall, per type and per object count."""

from __future__ import annotations

from lmms_simignore.tasks.scienceqa_utils import doc_to_target, doc_to_text, doc_to_visual, parse_letter

__all__ = ["doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]


def process_results(doc: dict, results: list[str]) -> dict:
    """exact_match, plus the same value under `acc_<question type>` and `acc_objects_<n>` for the breakdowns."""
    correct = float(parse_letter(results[0]) == doc_to_target(doc))
    return {"exact_match": correct, f"acc_{doc['question_type']}": correct, f"acc_objects_{doc['num_objects']}": correct}
