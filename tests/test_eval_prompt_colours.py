"""The demo's grid check (sgm/eval/prompt_colours.py): the background colour a prompt names against the one an
image shows, read on the demo dataset's real images and on grids laid out as SampleImages writes them."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from sgm.data.demo_dataset import COLOURS, build_demo_dataset
from sgm.eval.prompt_colours import background_colour, grid_agreement, named_background


def test_the_named_background_is_read_from_demo_captions_only():
    assert named_background("grinning face emoji in yellow on a blue background, in the centre") == "blue"
    assert named_background("lungs emoji in brown on an orange background, at the left") == "orange"
    assert named_background("a photo on a velvet background") is None  # not a demo colour
    assert named_background("a red heart") is None


def test_the_background_of_real_demo_images_is_recovered(tmp_path):
    """Every demo image (emoji of every size and place, PNG and JPEG, 48..768 px sides) against its recorded
    background; a bucketed 64 px copy as the model sees it too."""
    build_demo_dataset(tmp_path, num_samples=48, num_emoji=8, samples_per_shard=48)
    results = []
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
        if not name.endswith((".png", ".jpg")):
            continue
        truth = json.loads(members[name.rsplit(".", 1)[0] + ".json"])["background"]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        small = image.resize((64, 64), Image.BICUBIC)
        results += [background_colour(np.asarray(image)) == truth, background_colour(np.asarray(small)) == truth]
    assert len(results) == 96 and sum(results) >= 94, f"{sum(results)}/96"


def grid(colours: list[list[str]], size: int = 32) -> Image.Image:
    """A grid of flat cells, each with a blob of another colour in the middle (the emoji)."""
    rows = []
    for row in colours:
        cells = []
        for colour in row:
            cell = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[colour], np.uint8)
            cell[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = COLOURS["green"]
            cells.append(cell)
        rows.append(np.concatenate(cells, axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


PROMPTS = [f"fencer emoji in green on a {c} background, in the centre" for c in ("red", "black", "white", "yellow")]


def test_a_grid_is_scored_cell_by_cell(tmp_path):
    right = grid([["red", "black", "white", "yellow"]] * 2)
    path = tmp_path / "grid.png"
    right.save(path)
    agreement = grid_agreement(path, PROMPTS, 32, 32)
    assert agreement.hits == 8 and agreement.describe() == "8/8 (red 2/2, black 2/2, white 2/2, yellow 2/2)"
    one_off = grid([["red", "black", "white", "yellow"], ["red", "white", "white", "yellow"]])
    agreement = grid_agreement(one_off, PROMPTS, 32, 32)
    assert agreement.shown[5] == "white" and agreement.describe() == "7/8 (red 2/2, black 1/2, white 2/2, yellow 2/2)"
    assert grid_agreement(right, ["a red heart", *PROMPTS[1:]], 32, 32) is None  # a prompt without a background
    with pytest.raises(ValueError, match="not 4 columns of 16x16"):
        grid_agreement(right, PROMPTS, 16, 16)
