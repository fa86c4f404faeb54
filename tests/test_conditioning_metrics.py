"""The study's image measures on ground-truth renders: exact on clean ones, robust to mild damage.

Renders come from the dataset generator (sgm.eval.shapes_dataset), so every image has a
known shape, colour and placement; "small then upscaled" uses Pillow's bicubic resize, as the
training loader does.
"""

from __future__ import annotations

import math
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sgm.eval import conditioning_metrics as cm
from sgm.eval import shapes_dataset as shapes
from sgm.eval.masks import background_colour, find_object, largest_component

RATIOS = ((1, 1), (1, 2), (2, 1), (3, 4))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def blurred(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def renders(long_side: int, count: int, seed: int) -> list[tuple[shapes.ShapeSpec, np.ndarray]]:
    """Ground-truth renders with the dataset's size/position distribution, classes in rotation."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        ratio_h, ratio_w = rng.choice(RATIOS)
        height, width = long_side * ratio_h // max(ratio_h, ratio_w), long_side * ratio_w // max(ratio_h, ratio_w)
        spec = shapes.sample_spec(rng, shapes.SHAPES[index % 3], shapes.COLOURS[index % 4], height, width)
        out.append((spec, shapes.render_shape(spec, height, width)))
    return out


def accuracies(cases: list[tuple[shapes.ShapeSpec, np.ndarray]]) -> tuple[float, float]:
    results = [cm.analyse(image) for _, image in cases]
    colour = np.mean([r["colour"] == spec.colour for (spec, _), r in zip(cases, results)])
    shape = np.mean([r["shape"] == spec.shape for (spec, _), r in zip(cases, results)])
    assert all(r["object_found"] and not r["touches_border"] for r in results)
    return float(colour), float(shape)


@pytest.mark.parametrize("long_side", [32, 64, 128, 256])
def test_colour_and_shape_on_clean_renders(long_side):
    colour, shape = accuracies(renders(long_side, 48 if long_side < 256 else 24, seed=long_side))
    assert colour == 1.0
    assert shape >= 0.95


@pytest.mark.parametrize("damage", ["noise", "blur", "blur+noise"])
def test_colour_and_shape_survive_mild_noise_and_blur(damage):
    """Generated samples are imperfect: Gaussian noise sigma 8 / blur radius 1 at 64 and 128 px."""
    cases = []
    for index, (spec, image) in enumerate(renders(64, 36, seed=1) + renders(128, 24, seed=2)):
        if "blur" in damage:
            image = blurred(image, 1.0)
        if "noise" in damage:
            image = noisy(image, 8.0 if damage == "noise" else 4.0, seed=index)
        cases.append((spec, image))
    colour, shape = accuracies(cases)
    assert colour == 1.0
    assert shape >= 0.95


def test_small_blurred_triangles_are_told_from_circles_by_their_weight_at_the_bottom():
    """Blur rounds a small triangle's corners until its fill ratio looks like a circle's (the
    fill ratio alone gets 92% here); the top-half share still gives it away."""
    cases = [(spec, blurred(image, 1.0)) for spec, image in renders(40, 60, seed=3)]
    assert accuracies(cases)[1] >= 0.95


def edge_cases(seed: int, count: int, size: int = 64) -> list[tuple[bool, np.ndarray]]:
    """(crosses the frame, image): objects across each edge by 15-45% of their side, or inside
    with a margin of at least 2 px."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        shape, colour = shapes.SHAPES[index % 3], shapes.COLOURS[index % 4]
        fraction = rng.uniform(0.3, 0.7)
        half = fraction / 2
        if index % 2:  # across one of the four edges
            overhang = rng.uniform(0.15, 0.45) * fraction
            along = rng.uniform(half, 1 - half)
            across = [half - overhang, 1 - half + overhang][rng.randrange(2)]
            centre = (across, along) if rng.randrange(2) else (along, across)
        else:
            margin = 2 / size
            centre = (rng.uniform(half + margin, 1 - half - margin), rng.uniform(half + margin, 1 - half - margin))
        spec = shapes.ShapeSpec(shape, colour, fraction, *centre)
        cases.append((bool(index % 2), shapes.render_shape(spec, size, size)))
    return cases


@pytest.mark.parametrize("damage", ["clean", "noise+blur"])
def test_border_touch_is_detected_exactly(damage):
    cases = edge_cases(seed=5, count=80)
    if damage != "clean":
        cases = [(crosses, noisy(blurred(image, 0.7), 6.0, seed=i)) for i, (crosses, image) in enumerate(cases)]
    assert [cm.touches_border(image) for _, image in cases] == [crosses for crosses, _ in cases]
    assert cm.border_cut_fraction([image for _, image in cases]) == 0.5


@pytest.mark.parametrize("sigma", [0.0, 8.0])
def test_sharpness_orders_upscaled_small_below_native(sigma):
    """The same object rendered at 1/2 or 1/3 of the sample size and upscaled (as the loader does
    with small originals) must score below it rendered large and downscaled, on >= 95% of pairs."""
    rng = random.Random(7)
    wins, pairs, means = 0, 0, {2: [], 3: [], "large": []}
    for index in range(36):
        size = (64, 128)[index % 2]
        spec = shapes.sample_spec(rng, shapes.SHAPES[index % 3], shapes.COLOURS[index % 4], size, size)
        large = resize(shapes.render_shape(spec, 4 * size, 4 * size), size, size)
        large_score = cm.sharpness(noisy(large, sigma, seed=index) if sigma else large)
        means["large"].append(large_score)
        for factor in (2, 3):
            small = resize(shapes.render_shape(spec, size // factor, size // factor), size, size)
            score = cm.sharpness(noisy(small, sigma, seed=1000 + index) if sigma else small)
            means[factor].append(score)
            wins, pairs = wins + (score < large_score), pairs + 1
    assert wins >= 0.95 * pairs
    assert np.mean(means[3]) < np.mean(means[2]) < np.mean(means["large"])  # monotone in the upscale factor


def test_spectral_sharpness_orders_clean_renders_and_is_zero_when_flat():
    rng = random.Random(8)
    for index in range(12):
        spec = shapes.sample_spec(rng, shapes.SHAPES[index % 3], shapes.COLOURS[index % 4], 64, 64)
        small = resize(shapes.render_shape(spec, 24, 24), 64, 64)
        assert cm.spectral_sharpness(small) < cm.spectral_sharpness(shapes.render_shape(spec, 64, 64))
    assert cm.spectral_sharpness(np.full((16, 16, 3), 200, dtype=np.uint8)) == 0.0


def test_background_is_estimated_so_a_drifted_background_still_works():
    spec = shapes.ShapeSpec("triangle", "blue", 0.6, 0.45, 0.5)
    for background in ((225, 225, 225), (250, 235, 215), (60, 60, 60)):
        image = shapes.render_shape(spec, 64, 64, background=background)
        np.testing.assert_allclose(background_colour(image), background)
        result = cm.analyse(image)
        assert (result["colour"], result["shape"], result["touches_border"]) == ("blue", "triangle", False)


def test_specks_are_ignored_and_an_empty_image_has_no_object():
    image = shapes.render_shape(shapes.ShapeSpec("square", "red", 0.5, 0.5, 0.5), 64, 64)
    image[3:5, 40:42] = (20, 20, 20)  # dark specks, one of them on the frame
    image[0, 10] = (40, 70, 220)
    image[50:52, 8:10] = (40, 160, 60)
    result = cm.analyse(image)
    assert (result["colour"], result["shape"], result["touches_border"]) == ("red", "square", False)
    flat = np.full((32, 48, 3), 240, dtype=np.uint8)
    empty = cm.analyse(noisy(flat, 4.0, seed=0))
    assert not empty["object_found"] and empty["colour"] is None and empty["shape"] is None
    assert math.isnan(cm.sharpness(flat)) and cm.dominant_colour(flat) is None and cm.shape_class(flat) is None


def test_largest_component_matches_a_breadth_first_search():
    rng = np.random.default_rng(0)
    for trial in range(20):
        mask = rng.random((17, 23)) < (0.3 + 0.02 * trial)
        expected = _largest_by_bfs(mask)
        np.testing.assert_array_equal(largest_component(mask), expected)


def _largest_by_bfs(mask: np.ndarray) -> np.ndarray:
    """Reference: 8-connected components by BFS in raster order; the first of the largest wins."""
    seen, best = np.zeros_like(mask), np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        component, queue = np.zeros_like(mask), deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            component[y, x] = True
            for ny in range(max(0, y - 1), min(mask.shape[0], y + 2)):
                for nx in range(max(0, x - 1), min(mask.shape[1], x + 2)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if component.sum() > best.sum():
            best = component
    return best


def test_parse_prompt():
    assert cm.parse_prompt("a red circle") == ("red", "circle")
    assert cm.parse_prompt("Two GRAY Triangles, on white") == ("grey", "triangle")
    assert cm.parse_prompt("a yellow disc") == ("yellow", "circle")
    assert cm.parse_prompt("something else entirely") == (None, None)


def test_score_samples_aggregates_against_the_prompts():
    cases = renders(64, 6, seed=11)
    images = [image for _, image in cases] + [np.full((64, 64, 3), 240, dtype=np.uint8)]
    prompts = [shapes.caption_for(spec.shape, spec.colour) for spec, _ in cases] + ["a green square"]
    prompts[0] = "a purple " + cases[0][0].shape  # the first sample is the wrong colour for its prompt
    edge = shapes.render_shape(shapes.ShapeSpec("circle", "green", 0.5, 0.1, 0.5), 64, 64)
    scores = cm.score_samples([*images, edge], [*prompts, "a green circle"])
    assert scores["count"] == 8 and scores["no_object"] == 1
    assert scores["colour_accuracy"] == 6 / 8  # wrong colour and no object both count as wrong
    assert scores["shape_accuracy"] == 7 / 8
    assert scores["border_cut_fraction"] == 1 / 8
    assert 0.5 < scores["mean_sharpness"] <= 1.0 and len(scores["samples"]) == 8
    assert [s["expected_colour"] for s in scores["samples"]][:1] == ["purple"]


def test_bad_inputs_end_in_one_clear_message():
    with pytest.raises(ValueError, match=r"uint8 image of shape \(H, W, 3\).*permute\(1, 2, 0\)"):
        cm.analyse(np.zeros((3, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cm.sharpness(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="too small"):
        cm.touches_border(np.zeros((3, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one prompt per image"):
        cm.score_samples([np.zeros((8, 8, 3), dtype=np.uint8)], [])


def test_find_object_reports_contrast_of_the_object():
    image = shapes.render_shape(shapes.ShapeSpec("circle", "yellow", 0.6), 48, 48)
    found = find_object(image)
    expected = np.linalg.norm(np.subtract(shapes.NAMED_COLOURS["yellow"], shapes.BACKGROUND))
    assert found.found and abs(found.contrast - expected) < 1.0
