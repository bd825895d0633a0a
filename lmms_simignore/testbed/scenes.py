"""Shapes scenes with redundant image tokens: objects that span several patches on a textured page.

A 64 x 64 px image is read as 8 x 8 patches of 8 px (64 image tokens): objects come in
three sizes (about 1, 2 or 3 patches across) at free pixel positions, so one object covers 1 to 16
patches and most straddle patch borders; the page has a light noise texture, seeded by the scene, so no
two background tokens are identical (in real images, too, an object spans many patches and most tokens
are redundant). `shapes` asks the questions about these scenes (left-of compares centres at least
`MIN_GAP` px apart); every scene also has a caption (colour, size, shape and position of each object)
for contrastive pre-training of the vision tower and for aligning the projector.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RGB = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
IMAGE_SIZE = 64
PATCH = 8
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH
SIZES = {"small": 7, "medium": 14, "large": 21}  # side of the object's bounding box, px
MARGIN = 1  # px between two objects' boxes
MIN_GAP = PATCH  # px between the centres of two objects compared by a left-of question
TEXTURE = (232, 255)  # grey levels of the background noise
REGIONS = ("top", "middle", "bottom"), ("left", "centre", "right")


@dataclass(frozen=True)
class PlacedObject:
    """One object: colour, shape, size name, and the top-left corner of its bounding box (px)."""

    colour: str
    shape: str
    size: str
    left: int
    top: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre_x(self) -> float:
        return self.left + self.side / 2

    @property
    def centre_y(self) -> float:
        return self.top + self.side / 2

    def overlaps(self, other: PlacedObject) -> bool:
        return not (self.left + self.side + MARGIN <= other.left or other.left + other.side + MARGIN <= self.left
                    or self.top + self.side + MARGIN <= other.top or other.top + other.side + MARGIN <= self.top)


def random_scene(rng: random.Random, num_objects: int) -> list[PlacedObject]:
    """`num_objects` non-overlapping objects, each with a random colour, shape, size and position."""
    for _ in range(1000):
        objects: list[PlacedObject] = []
        while len(objects) < num_objects:
            size = rng.choice(tuple(SIZES))
            candidate = PlacedObject(rng.choice(COLOURS), rng.choice(SHAPES), size,
                                     rng.randrange(IMAGE_SIZE - SIZES[size] + 1), rng.randrange(IMAGE_SIZE - SIZES[size] + 1))
            if any(candidate.overlaps(placed) for placed in objects):
                if rng.random() < 0.02:  # a crowded start: begin the scene again
                    break
                continue
            objects.append(candidate)
        if len(objects) == num_objects:
            return objects
    raise RuntimeError(f"could not place {num_objects} objects on a {IMAGE_SIZE} px page")


def paint_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Paint `shape` filling the inclusive pixel box (left, top, right, bottom) on a PIL ImageDraw."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left, bottom), ((left + right + 1) // 2, top), (right, bottom)], fill=fill)


def _draw_object(draw, obj: PlacedObject, fill) -> None:
    paint_shape(draw, obj.shape, (obj.left, obj.top, obj.left + obj.side - 1, obj.top + obj.side - 1), fill)


def draw_scene(objects: list[PlacedObject]):
    """RGB PIL image of the scene on a grey noise texture whose seed is the scene's own (same scene, same pixels)."""
    import numpy
    from PIL import Image, ImageDraw

    seed = zlib.crc32(repr([obj.__dict__ for obj in objects]).encode())
    noise = numpy.random.default_rng(seed).integers(TEXTURE[0], TEXTURE[1] + 1, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=numpy.uint8)
    image = Image.fromarray(numpy.repeat(noise[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj, RGB[obj.colour])
    return image


def covered_patches(obj: PlacedObject, min_pixels: int = 1) -> list[int]:
    """Row-major indices of the patches (image tokens) in which the drawn object has at least `min_pixels` pixels."""
    import numpy
    from PIL import Image, ImageDraw

    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_object(ImageDraw.Draw(mask), obj, 255)
    pixels = (numpy.asarray(mask) > 0).reshape(PATCHES_PER_SIDE, PATCH, PATCHES_PER_SIDE, PATCH).sum(axis=(1, 3))  # (8, 8)
    return [int(index) for index in numpy.flatnonzero(pixels.reshape(-1) >= min_pixels)]


def region(obj: PlacedObject) -> str:
    """Where the object's centre lies in a 3 x 3 split of the page: 'top left', 'middle right', 'centre', ..."""
    vertical, horizontal = REGIONS
    row, column = min(2, int(obj.centre_y * 3 // IMAGE_SIZE)), min(2, int(obj.centre_x * 3 // IMAGE_SIZE))
    return "centre" if (row, column) == (1, 1) else f"{vertical[row]} {horizontal[column]}"


def phrase(obj: PlacedObject) -> str:
    """The object in words: 'large red circle'."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def caption(objects: list[PlacedObject]) -> str:
    """The scene in words, objects from left to right: 'a large red circle at the top left, a small blue ...'."""
    ordered = sorted(objects, key=lambda obj: (obj.centre_x, obj.centre_y))
    return ", ".join(f"a {phrase(obj)} at the {region(obj)}" for obj in ordered)

