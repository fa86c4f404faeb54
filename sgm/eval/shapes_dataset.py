"""The conditioning study's synthetic dataset: one named shape in one named colour per image.

Built by `python data/build_shapes_dataset.py` and by the study itself (sgm.eval.conditioning_study).

Ground truth for the SDXL micro-conditioning study (issue 6). Each image holds one circle, square
or triangle (axis-aligned; the triangle points up and is as tall as it is wide, so every shape's
bounding box is a square) in red, green, blue or yellow on one fixed light-grey background, with
the caption "a red circle". Objects are drawn anti-aliased (coverage sampled on an 8x8 or 4x4
subpixel grid) and lie wholly inside the canvas with a margin, framed near its centre as a photographed
subject is, so any border cut seen later comes from the loader's crop. Canvas sizes are log-uniform in their long side over 32..512 px at nine
aspect ratios 1:2..2:1, saved at their own size as PNG: a small image stays small, so the loader
upscales it and it looks blurry at the bucket size, while a large one is downscaled and stays
sharp; that is what size conditioning must learn. The object's side is 35-80% of the short side.

Every image's json holds the ground truth next to img2dataset's fields: `shape`, `colour`,
`background` (RGB), `object_box_top_left_height_width` (float px, the shape's tight box) and
`object_size_fraction` / `object_centre_yx_fraction` (the geometry relative to the canvas, so
`render_shape` can draw the same object at any size). Everything follows from the seed: the same
seed, numpy and Pillow give byte-identical shards. Class combinations come in shuffled rounds,
so shapes and colours stay balanced.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sgm.data.shards import BuildSummary, ShardError, ShardWriter, prepare_output_dir, write_json_atomic
from sgm.eval.conditioning_metrics import NAMED_COLOURS, SHAPES

COLOURS = ("red", "green", "blue", "yellow")  # drawn with NAMED_COLOURS' RGB values
BACKGROUND = (240, 240, 240)  # fixed light grey: each of COLOURS is >= 210 RGB units away from it
# (h, w): 1:2 .. 2:1, so bucketing has tall, square and wide images to sort.
ASPECT_RATIOS = ((1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1))
MIN_SIDE, MAX_SIDE = 32, 512  # long side, log-uniform
OBJECT_FRACTION = (0.35, 0.8)  # object side / short side
MARGIN = 2  # px kept free around the object at its original size, so it stays clear of the edge when resized
# Framing: the object's box starts this far into the free range along each axis (0: at the margin, 1: at the
# far margin), so it sits near the centre, as a photographed subject does. That is what makes crop
# coordinates informative: with objects placed anywhere (0..1), where a crop lands says little about
# where the object is, and models ignored the crop input (issue 6: denoising error +0.25% at most when
# crops were swapped, after 3000 and 6000 steps).
FRAMING = (0.3, 0.7)


@dataclass(frozen=True)
class ShapeSpec:
    """One object, with geometry relative to the canvas so it can be drawn at any size.

    `size` is the side of the object's square box as a fraction of the canvas's short side;
    `centre_y` / `centre_x` are fractions of the canvas height / width (outside 0..1 is allowed:
    the object is then clipped, which tests use to draw cut objects)."""

    shape: str
    colour: str
    size: float
    centre_y: float = 0.5
    centre_x: float = 0.5

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The shape's tight box (top, left, height, width) in px on a height x width canvas."""
        side = self.size * min(height, width)
        return self.centre_y * height - side / 2, self.centre_x * width - side / 2, side, side


def coverage(shape: str, top: float, left: float, side: float, height: int, width: int) -> np.ndarray:
    """Fraction of each canvas pixel (H x W float32) the shape covers; pixel (i, j) spans [j, j+1) x [i, i+1).

    Exact at the subpixel grid's resolution: 8x8 samples per pixel for sides under 48 px, 4x4
    above (a larger shape's edge is a smaller share of it)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    alpha = np.zeros((height, width), dtype=np.float32)
    y0, x0 = max(0, math.floor(top)), max(0, math.floor(left))
    y1, x1 = min(height, math.ceil(top + side)), min(width, math.ceil(left + side))
    if y1 <= y0 or x1 <= x0:
        return alpha
    k = 8 if side < 48 else 4
    ys = (np.arange(y0 * k, y1 * k, dtype=np.float64)[:, None] + 0.5) / k - top
    xs = (np.arange(x0 * k, x1 * k, dtype=np.float64)[None, :] + 0.5) / k - left
    if shape == "square":
        inside = (ys >= 0) & (ys < side) & (xs >= 0) & (xs < side)
    elif shape == "circle":
        inside = (ys - side / 2) ** 2 + (xs - side / 2) ** 2 <= (side / 2) ** 2
    else:  # triangle, apex up: half-width at depth d is d / 2
        inside = (ys >= 0) & (ys < side) & (np.abs(xs - side / 2) <= ys / 2)
    alpha[y0:y1, x0:x1] = inside.reshape(y1 - y0, k, x1 - x0, k).sum(axis=(1, 3), dtype=np.uint8) / (k * k)
    return alpha


def render_shape(spec: ShapeSpec, height: int, width: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """The object of `spec` drawn anti-aliased on a plain height x width canvas (uint8 H x W x 3)."""
    if spec.colour not in NAMED_COLOURS:
        raise ValueError(f"unknown colour {spec.colour!r}; choose one of {sorted(NAMED_COLOURS)}")
    top, left, side, _ = spec.box(height, width)
    alpha = coverage(spec.shape, top, left, side, height, width)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = background
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size:  # blend only the object's box
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        back = np.asarray(background, dtype=np.float32)
        blended = back + alpha[box][..., None] * (np.asarray(NAMED_COLOURS[spec.colour], dtype=np.float32) - back)
        image[box] = np.round(blended).astype(np.uint8)
    return image


def caption_for(shape: str, colour: str) -> str:
    """The one caption template: it names exactly what is drawn, so prompt adherence is checkable."""
    return f"a {colour} {shape}"


def _canvas_size(rng: random.Random, min_side: int, max_side: int) -> tuple[int, int]:
    """(h, w): long side log-uniform in [min_side, max_side], one of ASPECT_RATIOS."""
    ratio_h, ratio_w = rng.choice(ASPECT_RATIOS)
    long = round(math.exp(rng.uniform(math.log(min_side), math.log(max_side))))
    short = math.ceil(long * min(ratio_h, ratio_w) / max(ratio_h, ratio_w))  # ceil: never beyond 1:2
    return (long, short) if ratio_h >= ratio_w else (short, long)


def sample_spec(rng: random.Random, shape: str, colour: str, height: int, width: int) -> ShapeSpec:
    """Random size and position for one object that lies MARGIN px inside a height x width canvas, framed
    near its centre (FRAMING)."""
    short = min(height, width)
    side = min(rng.uniform(*OBJECT_FRACTION) * short, short - 2 * MARGIN)
    top = MARGIN + rng.uniform(*FRAMING) * (height - 2 * MARGIN - side)
    left = MARGIN + rng.uniform(*FRAMING) * (width - 2 * MARGIN - side)
    return ShapeSpec(shape, colour, side / short, (top + side / 2) / height, (left + side / 2) / width)


def build_shapes_dataset(
    out: str | Path = "outputs/shapes_data",
    num_samples: int = 2048,
    seed: int = 0,
    samples_per_shard: int = 256,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
) -> BuildSummary:
    """Render `num_samples` captioned shapes into shards in `out` (replacing earlier shards there)."""
    if num_samples < 1:
        raise ShardError(f"num_samples must be >= 1 (got {num_samples})")
    if not 24 <= min_side <= max_side:
        raise ShardError(f"need 24 <= min_side <= max_side (got {min_side}, {max_side}); pass --min-side/--max-side")
    rng = random.Random(seed)
    combos = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    out = prepare_output_dir(out, overwrite=True)
    with ShardWriter(out, samples_per_shard) as writer:
        order: list[tuple[str, str]] = []
        for _ in range(num_samples):
            if not order:
                order = list(combos)
                rng.shuffle(order)
            shape, colour = order.pop()
            height, width = _canvas_size(rng, min_side, max_side)
            spec = sample_spec(rng, shape, colour, height, width)
            buffer = io.BytesIO()
            Image.fromarray(render_shape(spec, height, width)).save(buffer, "PNG")
            fields = {
                "shape": shape,
                "colour": colour,
                "background": list(BACKGROUND),
                "object_box_top_left_height_width": [round(v, 4) for v in spec.box(height, width)],
                "object_size_fraction": spec.size,
                "object_centre_yx_fraction": [spec.centre_y, spec.centre_x],
            }
            writer.write(buffer.getvalue(), "png", caption_for(shape, colour), width, height, fields)
    write_json_atomic(out / "_build_summary.json", writer.summary.to_dict())
    return writer.summary
