"""Contrastive pre-training of the testbed's vision tower (CLIP-like, on scene captions)."""

import math

import pytest
import torch

from lmms_simignore.tower_pretraining import info_nce, pretrain_tower


def test_info_nce_on_a_hand_computed_pair():
    embeddings = torch.eye(2)  # image i and text i identical, the two pairs orthogonal
    matched = info_nce(embeddings, embeddings, torch.tensor(0.0))  # logits [[1, 0], [0, 1]]
    assert matched.item() == pytest.approx(math.log(1 + math.exp(-1)))
    swapped = info_nce(embeddings, embeddings.flip(0), torch.tensor(0.0))  # each image nearest the other's text
    assert swapped.item() == pytest.approx(math.log(1 + math.exp(1)))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower")
    return out, pretrain_tower(out, steps=150, batch_size=64, eval_every=75, held_out_size=64, log=lambda line: None)


def test_a_short_pretraining_learns_to_match_scenes_to_their_captions(short_run):
    _, summary = short_run
    first, last = summary["history"][0]["held_out_top1"], summary["held_out_top1"]
    assert last >= 8 * summary["chance"] and last > first  # chance: 1 in 64


def test_the_saved_tower_loads_as_a_clip_vision_model_and_embeds_as_trained(short_run):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPTextModel, CLIPVisionModel

    from lmms_simignore.tower_pretraining import HELD_OUT_SCENES_SEED, encode_batch, scene_batch

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


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps must be"), ({"batch_size": 1}, "needs negatives")])
def test_bad_settings_are_refused_before_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrain_tower(tmp_path, **kwargs)
