"""The questions the analysis commands (`infoflow`, `clusters`) run on: generated shapes questions (the testbed's
held-out split by default) or a local ScienceQA-IMG split, each with the function that turns a batch of them into
processor inputs."""

from __future__ import annotations


def shapes_prompts(processor):
    """batch of shapes records -> processor inputs (the testbed's prompt, left-padded)."""
    from lmms_simignore.testbed.llava_recipe import encode

    return lambda batch: encode(processor, batch, with_answers=False)


def scienceqa_prompts(processor):
    """batch of ScienceQA-IMG docs -> processor inputs (lmms-eval's scienceqa_img prompt in the chat template)."""
    from lmms_simignore.tasks.scienceqa_utils import POST_PROMPT, doc_to_text

    kwargs = {"pre_prompt": "", "post_prompt": POST_PROMPT}

    def prompts(batch):
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc_to_text(doc, kwargs)}]}],
                                               add_generation_prompt=True) for doc in batch]
        return processor(images=[doc["image"].convert("RGB") for doc in batch], text=texts, return_tensors="pt", padding=True)

    return prompts


def question_samples(processor, num_questions: int, seed: int | None = None, data: str | None = None):
    """(records, prompts(batch) -> inputs, a description of the source): `num_questions` generated shapes questions
    (default seed: the held-out one), or the first questions with an image of the local split `data`."""
    if data is not None:
        from lmms_simignore.bench.scienceqa_pass import local_docs

        docs = local_docs(data, num_questions, argument="--data")
        return docs, scienceqa_prompts(processor), {"data": str(data), "count": len(docs)}
    from lmms_simignore.testbed import shapes

    seed = shapes.HELD_OUT_SEED if seed is None else seed
    return shapes.shapes_records(num_questions, seed=seed), shapes_prompts(processor), {"seed": seed, "count": num_questions}
