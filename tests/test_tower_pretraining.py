"""Contrastive pre-training of the testbed's vision tower (CLIP-like, on scene captions)."""

import math

import pytest
import torch

from lmms_simignore.testbed.tower_pretraining import OBJECT_PHRASES, info_nce, object_regions, phrase_loss, pretrain_tower, region_states


def test_info_nce_on_a_hand_computed_pair():
    embeddings = torch.eye(2)  # image i and text i identical, the two pairs orthogonal
    matched = info_nce(embeddings, embeddings, torch.tensor(0.0))  # logits [[1, 0], [0, 1]]
    assert matched.item() == pytest.approx(math.log(1 + math.exp(-1)))
    swapped = info_nce(embeddings, embeddings.flip(0), torch.tensor(0.0))  # each image nearest the other's text
    assert swapped.item() == pytest.approx(math.log(1 + math.exp(1)))


def test_each_object_becomes_a_region_of_the_patches_it_covers_named_by_its_phrase():
    square = {"colour": "red", "shape": "square", "size": "large", "left": 0, "top": 0}  # 21 px: patches 0-2 of rows 0-2
    small = {"colour": "blue", "shape": "circle", "size": "small", "left": 57, "top": 57}  # 7 px in the last patch
    regions, phrases = object_regions([{"objects": [square]}, {"objects": [small]}])
    assert regions == [(0, [0, 1, 2, 8, 9, 10, 16, 17, 18]), (1, [63])]
    assert [OBJECT_PHRASES[index] for index in phrases] == ["large red square", "small blue circle"]
    assert len(set(OBJECT_PHRASES)) == 36  # 3 sizes x 4 colours x 3 shapes


def test_a_region_state_is_the_mean_of_its_patch_tokens_not_the_cls():
    hidden = torch.tensor([[[100.0, 100.0], [1.0, 2.0], [3.0, 4.0], [5.0, 8.0]]])  # (1, CLS + 3 patches, 2)
    assert region_states(hidden, [(0, [0, 2]), (0, [1])]).tolist() == [[3.0, 5.0], [3.0, 4.0]]


def test_phrase_loss_is_the_cross_entropy_over_all_phrases():
    phrases = torch.eye(3)  # three orthogonal phrase embeddings
    regions = torch.eye(3)[[0, 2]]  # region 0 equals phrase 0, region 1 equals phrase 2
    loss = phrase_loss(regions, phrases, torch.tensor([0, 1]), torch.tensor(0.0))  # logits: [1, 0, 0] and [0, 0, 1]
    right, wrong = math.log(math.e + 2) - 1, math.log(math.e + 2)  # -log softmax of the 1 and of a 0
    assert loss.item() == pytest.approx((right + wrong) / 2)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower")
    return out, pretrain_tower(out, steps=150, batch_size=64, eval_every=75, held_out_size=64, log=lambda line: None)


def test_a_short_pretraining_learns_to_match_scenes_to_their_captions(short_run):
    _, summary = short_run
    first, last = summary["history"][0]["held_out_top1"], summary["held_out_top1"]
    assert last >= 8 * summary["chance"] and last > first  # chance: 1 in 64


def test_the_region_term_teaches_patch_tokens_the_words_of_their_object(short_run):
    """Each held-out object's patch tokens (layer -2) against the 36 phrases: its colour is read off almost always."""
    _, summary = short_run
    phrase = summary["held_out_object_phrase"]
    assert phrase["colour"] >= 0.8 and phrase["phrase"] >= 4 / 36  # chance: 1/4 and 1/36
    assert summary["region_weight"] == 5.0 and summary["region_layer"] == -2


def test_the_saved_tower_loads_as_a_clip_vision_model_and_embeds_as_trained(short_run):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPTextModel, CLIPVisionModel

    from lmms_simignore.testbed.tower_pretraining import HELD_OUT_SCENES_SEED, encode_batch, scene_batch

    out, summary = short_run
    vision, text = CLIPVisionModel.from_pretrained(out / "vision").eval(), CLIPTextModel.from_pretrained(out / "text").eval()
    projections = load_file(str(out / "projections.safetensors"))
    batch = encode_batch(scene_batch(64, seed=HELD_OUT_SCENES_SEED), AutoTokenizer.from_pretrained(out / "text"),
                         CLIPImageProcessorPil.from_pretrained(out / "vision"))
    with torch.inference_mode():
        images = torch.nn.functional.normalize(vision(pixel_values=batch["pixel_values"]).pooler_output @ projections["vision_projection"].T, dim=-1)
        hidden = text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        texts = torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)) @ projections["text_projection"].T, dim=-1)
    top1 = ((images @ texts.T).argmax(1) == torch.arange(64)).float().mean().item()
    assert top1 == pytest.approx(summary["held_out_top1"])
    assert vision.config.image_size // vision.config.patch_size == 8  # 64 patch tokens


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps must be"), ({"batch_size": 1}, "needs negatives"),
                                             ({"region_weight": -1.0}, "region_weight must be >= 0")])
def test_bad_settings_are_refused_before_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrain_tower(tmp_path, **kwargs)


class _PatchFeatures(torch.nn.Module):
    """A stand-in tower whose every hidden state is, per 8 x 8 patch, the mean RGB (`colours`) or noise."""

    device = torch.device("cpu")

    def __init__(self, colours: bool):
        super().__init__()
        self.colours = colours

    def forward(self, pixel_values, output_hidden_states=True):
        from types import SimpleNamespace

        patches = pixel_values.unfold(2, 8, 8).unfold(3, 8, 8).mean(dim=(-1, -2)).flatten(2).transpose(1, 2)  # (B, 64, 3)
        if not self.colours:
            patches = torch.randn(patches.shape, generator=torch.Generator().manual_seed(0))
        hidden = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)  # CLS first
        return SimpleNamespace(hidden_states=(hidden, hidden))


def test_the_linear_probe_reads_what_the_patch_tokens_carry_and_nothing_else():
    from lmms_simignore.testbed.tower_pretraining import probe_object_attributes
    from lmms_simignore.testbed.tower_pretraining import shapes_image_processor

    processor = shapes_image_processor(64)
    colours = probe_object_attributes(_PatchFeatures(colours=True), processor, train_scenes=200, test_scenes=100)
    noise = probe_object_attributes(_PatchFeatures(colours=False), processor, train_scenes=200, test_scenes=100)
    assert colours["colour"] >= 0.95  # the mean colour of an object's patches names its colour
    assert max(noise.values()) <= 0.5  # noise tells nothing (chance 1/4, 1/3, 1/3)
