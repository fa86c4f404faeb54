"""Find the one object of a plain-background sample: background colour, foreground mask, largest blob.

The background is estimated as the per-channel median of the image's outer ring of pixels, not
taken from the dataset. A generated sample's background drifts (a tiny model paints 236 grey
where the data had 240, or tints it), and a fixed colour would then call the whole canvas
foreground; the border median is the background as long as the object covers less than half
of the ring, true of every object inside the frame and of most cut ones. `background=` takes a
known colour where that is the better bet (e.g. an object filling most of the border).

A pixel is foreground when its RGB distance from the background exceeds half the object's
contrast (the 90th percentile of the distances above MIN_CONTRAST), so a blurred edge is cut
at its midpoint and the mask keeps the object's true extent whether the edge is sharp or not.
Specks (noise, stray blobs) are dropped by keeping only the largest 8-connected component;
morphological opening would also erase a triangle's thin apex, which matters for border tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDER_RING = 2  # px of the outer ring that estimate the background
MIN_CONTRAST = 40.0  # RGB distance (of 441 max) below which a pixel is background whatever the object
RELATIVE_THRESHOLD = 0.5  # foreground beyond this fraction of the object's contrast
CONTRAST_PERCENTILE = 90  # the object's contrast: this percentile of the distances above MIN_CONTRAST
MIN_AREA_FRACTION = 0.002  # a largest blob smaller than this share of the image is "no object"
MIN_AREA_PIXELS = 4


@dataclass(frozen=True)
class FoundObject:
    """What the mask step learned about one image, shared by every measure."""

    mask: np.ndarray  # bool H x W, all False when no object was found
    distance: np.ndarray  # float H x W: RGB distance of each pixel from `background`
    background: np.ndarray  # float RGB
    contrast: float  # the object's typical distance from the background (0.0 without an object)

    @property
    def found(self) -> bool:
        return bool(self.mask.any())


def as_image(image: np.ndarray) -> np.ndarray:
    """Check for a uint8 HxWx3 array (the samples' layout) and return it; one clear error otherwise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}; "
            "convert a [3, H, W] uint8 tensor with tensor.permute(1, 2, 0).numpy()"
        )
    if min(image.shape[:2]) < 2 * BORDER_RING + 1:
        raise ValueError(f"image {image.shape[:2]} is too small to analyse: need at least {2 * BORDER_RING + 1} px")
    return image


def background_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median (float RGB) of the outer BORDER_RING pixels."""
    image = as_image(image)
    ring = np.ones(image.shape[:2], dtype=bool)
    ring[BORDER_RING:-BORDER_RING, BORDER_RING:-BORDER_RING] = False
    return np.median(image[ring].astype(np.float32), axis=0)


def colour_distance(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Euclidean RGB distance of every pixel from `colour` (H x W float32)."""
    difference = image.astype(np.float32) - np.asarray(colour, dtype=np.float32)
    return np.sqrt(np.einsum("hwc,hwc->hw", difference, difference))


def find_object(image: np.ndarray, background: np.ndarray | None = None) -> FoundObject:
    """The object's mask (largest blob beyond half-contrast) and what it was found with."""
    image = as_image(image)
    background = background_colour(image) if background is None else np.asarray(background, dtype=np.float32)
    distance = colour_distance(image, background)
    candidates = distance[distance > MIN_CONTRAST]
    empty = FoundObject(np.zeros(image.shape[:2], dtype=bool), distance, background, 0.0)
    if candidates.size == 0:
        return empty
    threshold = max(MIN_CONTRAST, RELATIVE_THRESHOLD * float(np.percentile(candidates, CONTRAST_PERCENTILE)))
    mask = largest_component(distance > threshold)
    if mask.sum() < max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * mask.size):
        return empty
    return FoundObject(mask, distance, background, float(np.percentile(distance[mask], CONTRAST_PERCENTILE)))


def foreground_mask(image: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """The object's pixels (bool H x W); all False when no object stands out from the background."""
    return find_object(image, background).mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (ties: the one first in raster order).

    Labels start as each pixel's flat index; each round takes the minimum over the 3x3
    neighbourhood, then jumps pointers (label <- label of the label's pixel, which is in the same
    component), so it converges in few rounds without scipy.
    """
    height, width = mask.shape
    if not mask.any():
        return mask.copy()
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    inside = mask.ravel()
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        neighbours = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        flat = np.where(mask, np.minimum.reduce(neighbours), outside).ravel()
        while True:  # pointer jumping
            jumped = flat.copy()
            jumped[inside] = flat[flat[inside]]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(height, width)
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[mask])
    return labels == int(np.argmax(counts))
