"""Prompt and scoring for ScienceQA-IMG: lmms-eval's `scienceqa_img` format and LLaVA-1.5's official protocol."""

from __future__ import annotations

import re


# The instruction after the options, in both protocols (the task YAMLs' post_prompt holds the same text).
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


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


# -- LLaVA-1.5's official ScienceQA protocol (task `scienceqa_img_llava`) ----------------------------

LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The vicuna_v1 conversation as a chat template, in the spirit of the llava-1.5-hf processors: images first, then text.
# Handles both plain-string content (lmms-eval "simple" models) and typed content lists ("chat" models);
# a system message, if the conversation starts with one, replaces the default system prompt.
LLAVA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}" '{{ "' + LLAVA_SYSTEM_PROMPT + ' " }}' "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_OPTION_LETTERS = "ABCDE"  # the letters LLaVA's ScienceQA evaluation accepts
LLAVA_ANSWER_SENTENCE = re.compile(r"The answer is ([A-Z]).")


def doc_to_messages_llava(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """LLaVA-1.5's vicuna_v1 conversation: the system prompt, then one user turn (image, then the question).

    Through the llava-hf chat template this renders `{system} USER: <image>\\n{question...} ASSISTANT:`.
    """
    content = [{"type": "image", "url": image} for image in doc_to_visual(doc)]
    content.append({"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)})
    return [{"role": "system", "content": [{"type": "text", "text": LLAVA_SYSTEM_PROMPT}]}, {"role": "user", "content": content}]


def parse_letter_llava(prediction: str) -> str | None:
    """LLaVA-1.5's answer rule: the (stripped) reply is one of A-E, or starts with "X. ", or contains
    "The answer is X." exactly once; otherwise None (counted wrong)."""
    prediction = prediction.strip()
    if prediction in LLAVA_OPTION_LETTERS and len(prediction) == 1:
        return prediction
    if len(prediction) >= 3 and prediction[0] in LLAVA_OPTION_LETTERS and prediction[1:3] == ". ":
        return prediction[0]
    sentences = LLAVA_ANSWER_SENTENCE.findall(prediction)
    return sentences[0] if len(sentences) == 1 else None


def process_results_llava(doc: dict, results: list[str]) -> dict:
    """exact_match under LLaVA's rule: 1 when the parsed letter is the target letter."""
    return {"exact_match": float(parse_letter_llava(results[0]) == doc_to_target(doc))}
