"""Scenes with redundant image tokens: objects over several patches on a textured page."""

import random

import numpy
import pytest

from lmms_simignore.testbed import shapes
from lmms_simignore.testbed.scenes import (IMAGE_SIZE, PATCH, PATCHES_PER_SIDE, RGB, PlacedObject, caption, covered_patches,
                                   draw_scene, random_scene)


@pytest.fixture(scope="module")
def records():
    return shapes.shapes_records(300, seed=3)


def objects_of(record):
    return [PlacedObject(**obj) for obj in record["objects"]]


def test_objects_stay_on_the_page_and_never_touch(records):
    for record in records:
        objects = objects_of(record)
        assert all(0 <= obj.left and obj.left + obj.side <= IMAGE_SIZE and 0 <= obj.top and obj.top + obj.side <= IMAGE_SIZE
                   for obj in objects)
        assert not any(a.overlaps(b) for i, a in enumerate(objects) for b in objects[i + 1:])
        assert record["image"].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_covered_patches_of_a_square_are_the_patches_it_paints():
    square = PlacedObject("red", "square", "medium", left=PATCH, top=PATCH)  # 14 px from (8, 8): patches (1,1)..(2,2)
    assert covered_patches(square) == [9, 10, 17, 18]
    shifted = PlacedObject("red", "square", "small", left=PATCH - 3, top=0)  # 7 px straddling a border
    assert covered_patches(shifted) == [0, 1]


def test_one_object_spans_one_to_many_tokens_by_its_size(records):
    spans = {"small": set(), "medium": set(), "large": set()}
    for record in records:
        for obj in objects_of(record):
            spans[obj.size].add(len(covered_patches(obj)))
    assert min(spans["small"]) == 1 and max(spans["small"]) <= 4
    assert min(spans["large"]) > max(spans["small"]) and max(spans["large"]) >= 12


def test_background_tokens_all_differ_and_the_same_scene_draws_the_same_pixels(records):
    record = records[0]
    pixels = numpy.asarray(record["image"])  # (64, 64, 3)
    covered = {index for obj in objects_of(record) for index in covered_patches(obj)}
    patches = pixels.reshape(PATCHES_PER_SIDE, PATCH, PATCHES_PER_SIDE, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(-1, PATCH * PATCH * 3)
    background = [patches[index].tobytes() for index in range(PATCHES_PER_SIDE ** 2) if index not in covered]
    assert len(background) > 30 and len(set(background)) == len(background)
    assert draw_scene(objects_of(record)).tobytes() == record["image"].tobytes()
    assert records[1]["image"].tobytes() != record["image"].tobytes()


def test_a_square_is_painted_in_its_colour_over_the_texture():
    square = PlacedObject("blue", "square", "large", left=20, top=30)
    image = draw_scene([square])
    assert image.getpixel((30, 40)) == RGB["blue"]
    assert image.getpixel((5, 5)) != RGB["blue"] and min(image.getpixel((5, 5))) >= 232


def test_the_caption_names_every_object_left_to_right():
    objects = [PlacedObject("green", "circle", "large", left=40, top=2), PlacedObject("red", "triangle", "small", left=1, top=50)]
    assert caption(objects) == "a small red triangle at the bottom left, a large green circle at the top right"
    assert caption([PlacedObject("blue", "square", "medium", left=25, top=25)]) == "a medium blue square at the centre"


def test_crowded_scenes_are_still_placed():
    assert len(random_scene(random.Random(0), shapes.MAX_OBJECTS)) == shapes.MAX_OBJECTS
