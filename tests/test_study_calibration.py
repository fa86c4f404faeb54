"""The conditioning study's calibration: the data reference's bookkeeping on drawn shapes with known
cuts and blur, and the conditioning-use measure on a real tiny model whose network is made blind to
one input (so the measure must read exactly zero there and clearly more than zero elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from sgm.checkpoint.model_source import LoadedModel
from sgm.diffusion.denoiser import DiscreteDenoiser, VScaling
from sgm.eval.shapes_dataset import ShapeSpec, render_shape
from sgm.eval.study_calibration import conditioning_use, data_reference, size_bins, summarise_measures, training_crops
from sgm.models.build import build_model


def _crop_batch() -> dict:
    """Four 64 px crops: at crop (0,0) one whole and one cut object, elsewhere two cut ones; the first two
    from large originals (drawn sharp), the last two from 16 px originals (upscaled, so blurry)."""
    whole = render_shape(ShapeSpec("square", "red", 0.5), 64, 64)
    cut = render_shape(ShapeSpec("square", "blue", 0.5, centre_x=0.05), 64, 64)
    small = render_shape(ShapeSpec("circle", "green", 0.5, centre_y=0.02), 16, 16)
    blurry = np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC))
    images = np.stack([whole, cut, blurry, blurry])
    return {
        "jpg": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "txt": ["a red square", "a blue square", "a green circle", "a green circle"],
        "original_size_as_tuple": torch.tensor([[128, 128], [128, 256], [16, 16], [16, 32]], dtype=torch.float32),
        "crop_coords_top_left": torch.tensor([[0, 0], [0, 0], [0, 12], [8, 0]], dtype=torch.float32),
        "target_size_as_tuple": torch.full((4, 2), 64.0),
    }


def test_size_bins_cut_at_the_study_sizes():
    assert size_bins([24, 32, 64]) == [(0, 24), (24, 32), (32, None)]


def test_data_reference_splits_cuts_by_crop_and_sharpness_by_original_size():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    reference = data_reference(model, [_crop_batch()], sizes=[32, 256])
    crops = reference["crops"]
    assert reference["images"] == 4
    assert crops["cut_at_origin"] == {"count": 2, "cut": 1, "fraction": 0.5}
    assert crops["cut_elsewhere"] == {"count": 2, "cut": 2, "fraction": 1.0}
    assert crops["cut_square_original"] == {"count": 2, "cut": 1, "fraction": 0.5}  # 128x128 whole, 16x16 cut
    small, large = crops["sharpness_by_short_side"]
    assert (small["short_side"], small["count"], large["short_side"], large["count"]) == ("0-31", 2, ">= 32", 2)
    assert small["mean"] < 0.5 * large["mean"]  # upscaled 4x: edges about 4x wider
    # the (untrained) VAE's round trip is measured the same way, image for image
    assert reference["through_vae"]["cut_all"]["count"] == 4


def test_summarise_measures_skips_samples_without_an_object():
    measures = [
        {"cut_sides": [], "object_found": False, "sharpness": float("nan")},
        {"cut_sides": ["top"], "object_found": True, "sharpness": 0.5},
    ]
    summary = summarise_measures(measures, short_sides=[10, 10], at_origin=[True, False], sizes=[64])
    assert summary["sharpness_by_short_side"] == [{"short_side": ">= 0", "count": 1, "mean": 0.5, "se": None}]
    assert summary["cut_all"]["cut"] == 1


def test_conditioning_use_is_zero_for_an_input_the_network_ignores():
    model = randomize_(build_model("tiny"), seed=1, std=0.2).eval()
    # the UNet's vector input: 64 pooled text, then size, crop and target (2 x 256 Fourier channels each)
    with torch.no_grad():
        model.unet.label_emb[0][0].weight[:, 64 + 512 : 64 + 1024] = 0.0  # blind to the crop
    sampler = LoadedModel(model, DiscreteDenoiser(VScaling()))
    batch = _crop_batch()
    batch["original_size_as_tuple"] = torch.tensor([[16, 16], [512, 512], [16, 16], [512, 512]], dtype=torch.float32)
    use = conditioning_use(sampler, [batch], sigmas=[1.0, 10.0])
    assert set(use) == {"original_size_as_tuple", "crop_coords_top_left", "txt"}
    for sigma in ("1.0", "10.0"):
        assert use["crop_coords_top_left"][sigma] == {"rise": 0.0, "se": 0.0}
        assert abs(use["original_size_as_tuple"][sigma]["rise"]) > 1e-4
        assert abs(use["txt"][sigma]["rise"]) > 1e-4


def test_training_crops_draws_across_epochs_and_refuses_an_empty_loader():
    batch = _crop_batch()
    assert len(training_crops([batch], 10)) == 3  # 4 images an epoch: three epochs for 10
    with pytest.raises(ValueError, match="data.shards"):
        training_crops([], 1)
