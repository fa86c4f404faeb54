"""Whether sampled images show the background colour their prompts name: the demo's check that the grid follows
its prompts, measured rather than left to the eye.

The demo's captions name a background from the demo vocabulary's colours ("... on a red background, ...",
sgm.data.demo_dataset.COLOURS). An image's background is read from its outer ring of pixels (the emoji sits
inside, so the ring is mostly canvas): the ring's median colour, named by the nearest vocabulary colour in RGB.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sgm.data.demo_dataset import COLOURS

BACKGROUND = re.compile(r"\bon an? (\w+) background\b")


@dataclass(frozen=True)
class ColourAgreement:
    """Per image (row-major over the grid): the colour its prompt names and the colour it shows."""

    named: list[str]
    shown: list[str]

    @property
    def hits(self) -> int:
        return sum(a == b for a, b in zip(self.named, self.shown))

    def describe(self) -> str:
        """'8/8 (red 2/2, black 2/2, ...)': the count, then per named colour in prompt order."""
        per = {name: [0, 0] for name in dict.fromkeys(self.named)}
        for named, shown in zip(self.named, self.shown):
            per[named][0] += named == shown
            per[named][1] += 1
        detail = ", ".join(f"{name} {hit}/{total}" for name, (hit, total) in per.items())
        return f"{self.hits}/{len(self.named)} ({detail})"


def named_background(prompt: str) -> str | None:
    """The vocabulary colour a prompt names as its background, or None."""
    found = BACKGROUND.search(prompt)
    return found.group(1) if found and found.group(1) in COLOURS else None


def background_colour(image: np.ndarray) -> str:
    """The vocabulary colour nearest the median of an RGB image's outer ring (1/16 of its short side, >= 2 px)."""
    ring = max(2, min(image.shape[:2]) // 16)
    pixels = np.concatenate(
        [image[:ring].reshape(-1, 3), image[-ring:].reshape(-1, 3)]
        + [image[ring:-ring, :ring].reshape(-1, 3), image[ring:-ring, -ring:].reshape(-1, 3)]
    ).astype(np.float64)
    median = np.median(pixels, axis=0)
    names = list(COLOURS)
    table = np.array([COLOURS[name] for name in names], dtype=np.float64)
    return names[int(np.argmin(((table - median) ** 2).sum(axis=1)))]


def grid_agreement(
    grid: str | os.PathLike | Image.Image, prompts: Sequence[str], height: int, width: int
) -> ColourAgreement | None:
    """Score a sample grid (a column per prompt, a row per seed, cells height x width, as SampleImages writes it);
    None when a prompt names no vocabulary background."""
    named = [named_background(p) for p in prompts]
    if not prompts or any(n is None for n in named):
        return None
    image = np.asarray((grid if isinstance(grid, Image.Image) else Image.open(grid)).convert("RGB"))
    rows, columns = image.shape[0] // height, len(prompts)
    if image.shape[1] != columns * width or rows == 0:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} grid is not {columns} columns of {width}x{height}")
    shown = [
        background_colour(image[r * height : (r + 1) * height, c * width : (c + 1) * width])
        for r in range(rows)
        for c in range(columns)
    ]
    return ColourAgreement([n for _ in range(rows) for n in named], shown)  # type: ignore[misc]
