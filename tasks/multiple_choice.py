"""Multiple-choice (log-likelihood) tasks on lmms-eval's simple path, whatever the model class.

lmms-eval 0.7.3 builds every task of a run as chat messages when the model class is a chat class (it reads
`lm.is_simple` once, before any task exists), and its chat tasks refuse log-likelihood requests ("Currently messages
is used for generation only"). A task YAML that names `class: !function multiple_choice.MultipleChoiceTask` is built as
a simple task in every run; each of our model classes, chat or simple, takes its (context, continuation,
doc_to_visual, doc_id, task, split) requests.
"""

from __future__ import annotations

from lmms_eval.api.task import ConfigurableTask

from lmms_simignore.tasks.scienceqa_utils import option_letters

__all__ = ["MultipleChoiceTask", "doc_to_answer_index", "doc_to_option_letters"]


class MultipleChoiceTask(ConfigurableTask):
    """lmms-eval's configurable (simple) task, built from the YAML config that names it."""

    def __init__(self, config: dict) -> None:
        super().__init__(config={key: value for key, value in config.items() if key != "class"})


def doc_to_option_letters(doc: dict) -> list[str]:
    """The options a model scores: their letters, "A", "B", ... (the prompt lists each option after its letter)."""
    return option_letters(len(doc["choices"]))


def doc_to_answer_index(doc: dict) -> int:
    """The index of the correct option."""
    return int(doc["answer"])
