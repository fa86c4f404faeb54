"""The conditioning study's synthetic shapes: honest ground truth, and the crop effect the study needs.

Ground truth is checked against the pixels themselves (sizes, where the object is, its area), and
one test runs the real training loader to show that its random crops cut objects often enough
for crop conditioning to have something to learn.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_demo_dataset import read_samples  # the shards as {key, ext, image, caption, meta}

from data import build_shapes_dataset as cli
from sgm.data.crop import covering_size
from sgm.data.loader import BucketedLoader
from sgm.data.shards import ShardError
from sgm.eval import shapes_dataset as shapes
from sgm.eval.conditioning_metrics import mask_touches_border, parse_prompt, touches_border

NUM_SAMPLES = 96


def pixels(sample: dict) -> np.ndarray:
    with Image.open(io.BytesIO(sample["image"])) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("shapes") / "a"
    summary = shapes.build_shapes_dataset(out, num_samples=NUM_SAMPLES, seed=0, samples_per_shard=32)
    assert summary.written == NUM_SAMPLES and len(summary.shards) == 3 and not summary.skipped
    return out, read_samples(out)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    out, _ = built
    shapes.build_shapes_dataset(tmp_path / "again", num_samples=NUM_SAMPLES, seed=0, samples_per_shard=32)
    shapes.build_shapes_dataset(tmp_path / "other", num_samples=32, seed=1, samples_per_shard=32)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (out / "00000.tar").read_bytes() != (tmp_path / "other" / "00000.tar").read_bytes()


def test_recorded_sizes_are_the_true_sizes_across_small_and_large_and_ratios(built):
    _, samples = built
    ratios, long_sides = set(), []
    for sample in samples:
        meta = sample["meta"]
        height, width = pixels(sample).shape[:2]
        assert (meta["original_height"], meta["original_width"]) == (height, width)  # saved at its own size
        assert 0.5 <= height / width <= 2.0
        ratios.add(round(height / width, 2))
        long_sides.append(max(height, width))
    assert len(ratios) >= 7
    assert min(long_sides) >= shapes.MIN_SIDE and max(long_sides) <= shapes.MAX_SIDE
    assert sum(side <= 96 for side in long_sides) >= NUM_SAMPLES // 5, "too few small images to upscale"
    assert sum(side >= 256 for side in long_sides) >= NUM_SAMPLES // 8, "too few large, sharp images"


def test_captions_name_the_ground_truth_and_classes_are_balanced(built):
    _, samples = built
    combos = Counter()
    for sample in samples:
        meta = sample["meta"]
        assert sample["caption"] == meta["caption"] == f"a {meta['colour']} {meta['shape']}"
        assert parse_prompt(sample["caption"]) == (meta["colour"], meta["shape"])
        combos[meta["shape"], meta["colour"]] += 1
    assert set(combos) == {(s, c) for s in shapes.SHAPES for c in shapes.COLOURS}
    assert set(combos.values()) == {NUM_SAMPLES // 12}  # shuffled rounds: exactly balanced


def test_objects_lie_inside_where_the_json_says_in_the_named_colour(built):
    _, samples = built
    for sample in samples:
        meta, image = sample["meta"], pixels(sample).astype(int)
        height, width = image.shape[:2]
        top, left, box_h, box_w = meta["object_box_top_left_height_width"]
        assert box_h == box_w and min(top, left) >= shapes.MARGIN - 1e-3
        assert top + box_h <= height - shapes.MARGIN + 1e-3 and left + box_w <= width - shapes.MARGIN + 1e-3
        # framed near the centre: the box starts within FRAMING of the free range along each axis
        for start, extent, side in ((top, height, box_h), (left, width, box_w)):
            free = extent - 2 * shapes.MARGIN - side
            if free > 1:
                low, high = shapes.FRAMING
                assert low - 1e-3 <= (start - shapes.MARGIN) / free <= high + 1e-3
        drawn = np.abs(image - np.array(shapes.BACKGROUND)).sum(axis=2) > 0
        rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
        assert math.floor(top) <= rows[0] and rows[-1] < math.ceil(top + box_h)  # nothing drawn outside the box
        assert math.floor(left) <= cols[0] and cols[-1] < math.ceil(left + box_w)
        assert not mask_touches_border(drawn)
        assert rows[-1] - rows[0] + 1 >= box_h - 2 and cols[-1] - cols[0] + 1 >= box_w - 2  # and fills it
        # the square's centre, the circle's centre and the triangle's base centre are fully covered
        y = int(top + box_h * (0.9 if meta["shape"] == "triangle" else 0.5))
        assert tuple(image[y, int(left + box_w / 2)]) == shapes.NAMED_COLOURS[meta["colour"]]


def test_json_geometry_redraws_the_stored_image_exactly(built):
    _, samples = built
    for sample in samples[:24]:
        meta = sample["meta"]
        spec = shapes.ShapeSpec(
            meta["shape"], meta["colour"], meta["object_size_fraction"], *meta["object_centre_yx_fraction"]
        )
        redrawn = shapes.render_shape(spec, meta["original_height"], meta["original_width"])
        np.testing.assert_array_equal(redrawn, pixels(sample))


@pytest.mark.parametrize("side", [7.3, 23.0, 61.7])
def test_anti_aliased_coverage_has_the_true_area(side):
    areas = {"square": side**2, "circle": math.pi * side**2 / 4, "triangle": side**2 / 2}
    for shape, area in areas.items():
        alpha = shapes.coverage(shape, 3.4, 5.7, side, 80, 80)
        assert abs(alpha.sum() - area) < 0.01 * area + 0.1, shape
        assert 0 < alpha.min(initial=1, where=alpha > 0) < 1  # partial pixels exist: drawn anti-aliased


def test_bad_arguments_end_in_one_clear_message(tmp_path, capsys):
    with pytest.raises(ShardError, match="num_samples must be >= 1"):
        shapes.build_shapes_dataset(tmp_path / "x", num_samples=0)
    assert cli.main(["--out", str(tmp_path / "y"), "--min-side", "8"]) == 2
    assert "min_side" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        shapes.coverage("star", 0, 0, 4, 8, 8)


def test_cli_writes_shards(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "cli"), "--num-samples", "12", "--samples-per-shard", "8"]) == 0
    assert "wrote 12 shape samples in 2 shards" in capsys.readouterr().out
    assert len(read_samples(tmp_path / "cli")) == 12


def object_in_crop(meta: dict, batch: dict, index: int) -> tuple[float, float, float, int, int]:
    """(top, left, side, crop_h, crop_w): the object's box mapped through the loader's resize and crop."""
    height, width = meta["original_height"], meta["original_width"]
    target_h, target_w = batch["target_size_as_tuple"][index].tolist()
    crop_top, crop_left = batch["crop_coords_top_left"][index].tolist()
    resized_h, resized_w = covering_size(height, width, target_h, target_w)
    top, left, side, _ = meta["object_box_top_left_height_width"]
    scale = (resized_h / height + resized_w / width) / 2  # the two agree up to the ceil of one side
    return top * resized_h / height - crop_top, left * resized_w / width - crop_left, side * scale, target_h, target_w


def test_training_loader_random_crops_cut_objects(tmp_path):
    """Random square crops at 64 (the study's loader setting) cut a measurable share of objects (the effect crop
    conditioning must undo), and touches_border sees exactly those cuts on the loader's pixels."""
    shapes.build_shapes_dataset(tmp_path, num_samples=192, seed=3, samples_per_shard=64)
    truth = {sample["key"]: sample["meta"] for sample in read_samples(tmp_path)}
    loader = BucketedLoader(
        str(tmp_path / "*.tar"), batch_size=8, square_size=64, crop="random", seed=0, shuffle_buffer=32, num_epochs=1
    )
    seen = cut = batches = batches_with_cut = agree = compared = 0
    for batch in loader:
        batches += 1
        batch_cut = False
        for index, key in enumerate(batch["__key__"]):
            meta = truth[key]
            top, left, side, crop_h, crop_w = object_in_crop(meta, batch, index)
            is_cut = min(top, left) < 0 or top + side > crop_h or left + side > crop_w
            seen, cut, batch_cut = seen + 1, cut + is_cut, batch_cut or is_cut
            visible = shapes.coverage(meta["shape"], top, left, side, crop_h, crop_w) >= 0.5
            if visible.sum() >= 8:  # an object cropped away entirely cannot be seen to touch the border
                image = batch["jpg"][index].permute(1, 2, 0).numpy()
                compared += 1
                agree += touches_border(image) == mask_touches_border(visible)
        batches_with_cut += batch_cut
    assert seen == 192 and compared >= 180
    assert 0.05 <= cut / seen <= 0.5, f"{cut}/{seen} crops cut the object"
    assert batches_with_cut >= 0.25 * batches, f"{batches_with_cut}/{batches} batches hold a cut object"
    assert agree >= 0.95 * compared, f"touches_border agreed with the ground truth on {agree}/{compared}"
