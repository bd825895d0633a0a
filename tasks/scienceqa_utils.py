"""Prompt and scoring for ScienceQA-IMG in the LLaVA-1.5 / lmms-eval format (letter answers)."""

from __future__ import annotations


def option_letters(num_choices: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(num_choices)]


def doc_to_visual(doc: dict) -> list:
    """The doc's image as RGB, or no visual for text-only questions."""
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """`[Context: {hint}\\n]{question}\\nA. {c0}\\nB. {c1}...{post_prompt}`."""
    kwargs = lmms_eval_specific_kwargs or {}
    context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(option_letters(len(doc["choices"])), doc["choices"]))
    return f"{kwargs.get('pre_prompt', '')}{context}{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return option_letters(len(doc["choices"]))[doc["answer"]]


def parse_letter(prediction: str) -> str | None:
    """The answered letter: the whole reply is one letter, or it starts with "X."; otherwise None."""
    prediction = prediction.strip()
    if len(prediction) == 1 and prediction.isalpha():
        return prediction.upper()
    if len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == ".":
        return prediction[0]
    return None


def process_results(doc: dict, results: list[str]) -> dict:
    """exact_match = 1 when the parsed letter is the target; unparseable replies count as wrong."""
    return {"exact_match": float(parse_letter(results[0]) == doc_to_target(doc))}
