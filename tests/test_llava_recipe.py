"""The testbed's LLaVA recipe: language-model pre-training, stage 1 (feature alignment), stage 2 (instruction tuning)."""

import random
import re
from types import SimpleNamespace

import pytest
import torch

from lmms_simignore.testbed import llava_recipe, scenes, shapes
from lmms_simignore.testbed.scenes import PlacedObject

LEFT = PlacedObject("red", "circle", "large", 2, 20)  # (colour, shape, size, left, top)
RIGHT = PlacedObject("blue", "square", "small", 44, 30)


def _record(objects):
    return {"objects": [obj.__dict__ for obj in objects], "image": scenes.draw_scene(objects)}


def test_scene_text_lists_the_objects_captions_them_and_answers_two_questions_truly():
    valid = {
        "What colour is the circle?": "red", "What colour is the square?": "blue",
        "What shape is the red object?": "circle", "What shape is the blue object?": "square",
        "How many objects are there?": "2",
        "Is the red circle left of the blue square?": "yes", "Is the blue square left of the red circle?": "no",
    }
    for seed in range(20):
        text = llava_recipe.scene_text(_record([LEFT, RIGHT]), random.Random(seed))
        listing, caption, questions = text.split(". ", 2)
        assert sorted(listing.split(", ")) == ["large red circle", "small blue square"]
        assert caption == "a large red circle at the middle left, a small blue square at the middle right"
        answered = re.findall(r"([A-Z][^?]*\?) (\w+)\.", questions)
        assert len(answered) == 2 and answered[0][0] != answered[1][0]
        for question, answer in answered:
            if question.startswith("Is there a "):
                assert answer == ("yes" if question[len("Is there a "):-1] in ("red circle", "blue square") else "no")
            else:
                assert valid[question] == answer, question


def test_stage_2_puts_the_loss_on_the_answer_letter_and_the_end_token_only(recipe):
    from transformers import AutoProcessor

    root, _, _ = recipe
    processor = AutoProcessor.from_pretrained(root / "stage1")
    records = shapes.shapes_records(4, seed=2)
    batch = llava_recipe.encode(processor, records, with_answers=True)
    for row, record in enumerate(records):
        labelled = batch["input_ids"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.convert_ids_to_tokens(labelled) == ["ABCDEF"[record["answer"]], "</s>"]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its answer


def _question_type(question):
    for prefix, question_type in (("What colour", "colour"), ("What shape", "shape"), ("Is there", "exists"), ("How many", "count")):
        if question.startswith(prefix):
            return question_type
    return "spatial"


def test_a_dialogue_is_the_stage_2_prompt_with_the_description_in_place_of_the_image(recipe):
    from transformers import AutoProcessor

    root, _, _ = recipe
    processor = AutoProcessor.from_pretrained(root / "model")
    letters = {"What colour is the circle?": "A", "What colour is the square?": "C", "What shape is the red object?": "A",
               "What shape is the blue object?": "B", "How many objects are there?": "B",
               "Is the red circle left of the blue square?": "A", "Is the blue square left of the red circle?": "B",
               "Is there a red circle?": "A", "Is there a blue square?": "A"}
    scene = _record([LEFT, RIGHT])
    asked = set()
    for seed in range(30):
        dialogue = llava_recipe.scene_dialogue(scene, random.Random(seed), processor.tokenizer)
        question = re.search(r"\n([^\n]*\?)\n", dialogue).group(1)
        record = {"question": question, "choices": list(shapes.OPTIONS[_question_type(question)]), "image": scene["image"]}
        prompt = processor.tokenizer.decode(llava_recipe.encode(processor, [record], with_answers=False)["input_ids"][0])
        before, after = prompt.removeprefix("<s>").split("<image>" * 64)
        description = dialogue[len(before):len(dialogue) - len(after) - 1]
        assert dialogue.startswith(before) and dialogue[:-1].endswith(after)
        assert description.endswith(". a large red circle at the middle left, a small blue square at the middle right.")
        assert dialogue[-1] == letters.get(question, "B"), question  # an absent object: B. no
        asked.add(_question_type(question))
    assert asked == set(shapes.QUESTION_TYPES)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Every stage for a few steps: tower -> language model -> stage 1 -> stage 2."""
    from lmms_simignore.testbed.tower_pretraining import pretrain_tower

    root = tmp_path_factory.mktemp("recipe")
    quiet = dict(log=lambda line: None)
    pretrain_tower(root / "tower", steps=2, batch_size=8, eval_every=2, held_out_size=8, **quiet)
    llava_recipe.pretrain_language_model(root / "lm", steps=3, batch_size=8, eval_every=3, **quiet)
    stage1 = llava_recipe.align_projector(root / "stage1", root / "tower", root / "lm", steps=3, batch_size=8, eval_every=3, **quiet)
    stage2 = llava_recipe.tune_instructions(root / "model", root / "stage1", steps=3, batch_size=8, eval_every=3, held_out_size=16, **quiet)
    return root, stage1, stage2


def _weights(folder):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).state_dict()


def test_stage_1_trains_the_projector_only(recipe):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    root, _, _ = recipe
    tower = CLIPVisionModel.from_pretrained(root / "tower" / "vision")
    language_model = LlamaForCausalLM.from_pretrained(root / "lm")
    model, _ = llava_recipe.assemble_llava(root / "tower", root / "lm", seed=0)  # the same fresh projector stage 1 began with
    trained = _weights(root / "stage1")
    for name, value in tower.state_dict().items():
        assert torch.equal(trained[f"model.vision_tower.{name}"], value), name
    for name, value in language_model.model.state_dict().items():
        assert torch.equal(trained[f"model.language_model.{name}"], value), name
    fresh = model.model.multi_modal_projector.state_dict()
    assert all(not torch.equal(trained[f"model.multi_modal_projector.{name}"], value) for name, value in fresh.items())


def test_stage_2_trains_projector_and_language_model_and_keeps_the_tower(recipe):
    root, _, stage2 = recipe
    before, after = _weights(root / "stage1"), _weights(root / "model")
    tower = [name for name in before if name.startswith("model.vision_tower.")]
    language = [name for name in before if name.startswith("model.language_model.layers.")]
    assert tower and language
    assert all(torch.equal(before[name], after[name]) for name in tower)
    assert all(not torch.equal(before[name], after[name]) for name in language if name.endswith("proj.weight"))
    assert [record["stage"].split(" ")[0] for record in stage2["previous_stages"]] == ["contrastive", "language", "LLaVA"]


def test_stage_2_trains_the_tower_only_when_asked(recipe, tmp_path):
    root, _, _ = recipe
    summary = llava_recipe.tune_instructions(tmp_path / "model", root / "stage1", steps=2, batch_size=8, eval_every=2,
                                             held_out_size=8, train_tower=True, log=lambda line: None)
    before, after = _weights(root / "stage1"), _weights(tmp_path / "model")
    # the features come from the second-to-last layer: the first of the tower's two layers gets the gradients
    tower = [name for name in before if name.startswith("model.vision_tower.encoder.layers.0.") and name.endswith("proj.weight")]
    assert tower and all(not torch.equal(before[name], after[name]) for name in tower)
    assert summary["train_tower"] is True and "trained too" in summary["stage"]


def test_the_shipped_layout_reads_64_image_tokens_and_ties_the_output_to_the_input_embeddings(recipe):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, _, _ = recipe
    model = LlavaForConditionalGeneration.from_pretrained(root / "model")
    processor = AutoProcessor.from_pretrained(root / "model")
    batch = processor(images=[_record([LEFT])["image"]], text=["<image>\nhi"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 64
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vision_feature_layer == -2


def test_caption_batch_labels_exactly_the_caption_and_its_end(recipe):
    from transformers import AutoProcessor

    root, _, _ = recipe
    processor = AutoProcessor.from_pretrained(root / "stage1")
    records = [_record([LEFT, RIGHT]), _record([RIGHT])]
    batch = llava_recipe.caption_batch(processor, records)
    for row, record in enumerate(records):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        caption = scenes.caption(llava_recipe.scene_objects(record))
        assert processor.tokenizer.decode(labelled) == caption + processor.tokenizer.eos_token


class _StubLlava:
    """A model whose image tokens are chosen by the test: `features` (B, 64, D) over an embedding table."""

    device = torch.device("cpu")

    def __init__(self, embedding, features):
        self._embedding = embedding
        self.model = SimpleNamespace(get_image_features=lambda pixel_values, return_dict: SimpleNamespace(pooler_output=list(features)))

    def get_input_embeddings(self):
        return self._embedding


def _word(tokenizer, embedding, word):
    return embedding.weight[tokenizer(" " + word, add_special_tokens=False).input_ids].mean(0)


@pytest.mark.parametrize("colour_of", [lambda colour: colour, lambda colour: shapes.COLOURS[(shapes.COLOURS.index(colour) + 1) % 4]])
def test_word_alignment_scores_image_tokens_against_the_object_words(recipe, colour_of):
    from transformers import AutoProcessor

    root, _, _ = recipe
    processor = AutoProcessor.from_pretrained(root / "stage1")
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(len(processor.tokenizer), 128)
    records = [_record([LEFT, RIGHT]), _record([RIGHT])]
    features = torch.randn(len(records), 64, 128) * 0.1  # background: small random vectors
    for row, record in enumerate(records):
        for obj in llava_recipe.scene_objects(record):
            word_sum = _word(processor.tokenizer, embedding, colour_of(obj.colour)) + _word(processor.tokenizer, embedding, obj.shape)
            features[row, scenes.covered_patches(obj)] = word_sum.detach()
    report = llava_recipe.word_alignment(_StubLlava(embedding, features), processor, records)
    correct = colour_of("red") == "red"
    assert report["colour_top1"] == (1.0 if correct else 0.0)
    assert report["shape_top1"] == 1.0
    assert report["best_colour_cosine_object"] > 0.5 > report["best_colour_cosine_background"]
    assert report["background_patches"] == 2 * 64 - sum(len(scenes.covered_patches(o)) for r in records for o in llava_recipe.scene_objects(r))


@pytest.mark.parametrize("stage, kwargs, message", [
    ("pretrain_language_model", {"steps": 0}, "steps must be a positive integer"),
    ("align_projector", {"batch_size": 0, "tower_dir": "t", "language_model_dir": "l"}, "batch_size must be a positive integer"),
    ("tune_instructions", {"init_from": "m", "mix": ("colour", "size")}, "mix must list question types among colour"),
    ("tune_instructions", {"init_from": "m", "curriculum": 1.5}, "curriculum must be a fraction of the steps in"),
])
def test_bad_settings_are_refused_before_anything_loads(tmp_path, stage, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(llava_recipe, stage)(tmp_path / "out", **kwargs)


def test_a_stage_refuses_a_folder_that_no_earlier_stage_wrote(recipe, tmp_path):
    root, _, _ = recipe
    with pytest.raises(FileNotFoundError, match=r"tower_dir=.*not a folder written by `pretrain-tower`"):
        llava_recipe.align_projector(tmp_path / "out", root / "lm", root / "lm")
    with pytest.raises(FileNotFoundError, match=r"language_model_dir=.*not a folder written by `pretrain-lm`"):
        llava_recipe.align_projector(tmp_path / "out", root / "tower", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"init_from=.*not a folder written by `align-projector`"):
        llava_recipe.tune_instructions(tmp_path / "out", root / "tower")
