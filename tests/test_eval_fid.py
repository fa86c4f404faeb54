"""FID/KID with the standard Inception network from a local file: zero on itself, rising with damage,
equal to torchmetrics on the same weights and features; the reference set's reading and cache.

The weights file is random-valued but in the real file's format (`write_random_weights`), so every
code path is the one the published file takes; nothing is downloaded. torchmetrics is the
test-only reference: its NoTrainInceptionV3 loads the same file (TF1 resize, antialias off, as
torch-fidelity), its FID/KID run on its own features. An Inception pass costs ~0.1-0.8 s per
image on this CPU (one thread: two contend on the shared 2-core machine), so the sets are tiny:
10 images, 6 for the damage series, 4 through torchmetrics' network.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from sgm.eval.fid import FeatureStats, frechet_distance, kernel_inception_distance
from sgm.eval.inception import (
    INCEPTION_WEIGHTS_URL,
    InceptionFeatures,
    MissingWeightsError,
    write_random_weights,
)
from sgm.eval.reference import reference_features, reference_images

SET_SIZE, SERIES_SIZE, SIDE = 10, 6, 64
pytestmark = pytest.mark.usefixtures("one_thread")


def scene(seed: int, rectangles: int = 3) -> Image.Image:
    """A smooth random colour field with hard-edged rectangles: structure at several scales."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    pixels = np.asarray(field).copy()
    for _ in range(rectangles):
        top, left = rng.integers(0, SIDE - 16, size=2)
        h, w = rng.integers(6, 24, size=2)
        pixels[top : top + h, left : left + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


@pytest.fixture(scope="module")
def inception(weights) -> InceptionFeatures:
    return InceptionFeatures(weights, batch_size=16)


@pytest.fixture(scope="module")
def sets(inception) -> dict[str, torch.Tensor]:
    """Two scene sets of different kinds (3 or 8 rectangles), their images and our features."""
    a = to_batch([scene(seed) for seed in range(SET_SIZE)])
    b = to_batch([scene(1000 + seed, rectangles=8) for seed in range(SET_SIZE)])
    return {"a": a, "b": b, "features_a": inception(a), "features_b": inception(b)}


def test_features_are_float64_pool3_and_fid_of_a_set_with_itself_is_zero(sets) -> None:
    features = sets["features_a"]
    assert features.dtype == torch.float64 and features.shape == (SET_SIZE, 2048)
    assert features.std(dim=0).mean() > 0.01  # the random network still separates images
    stats = FeatureStats.from_features(features)
    assert frechet_distance(stats, stats) <= 1e-6
    assert frechet_distance(stats, FeatureStats.from_features(features.clone())) <= 1e-6
    reordered = FeatureStats.from_features(features.flip(0))  # equal up to rounding: not short-cut as identical
    assert not np.array_equal(reordered.cov, stats.cov)
    assert frechet_distance(stats, reordered) <= 1e-6
    assert frechet_distance(stats, FeatureStats.from_features(sets["features_b"])) > 1e-3


def test_fid_rises_monotonically_with_blur_and_with_noise(inception, sets) -> None:
    clean = [scene(seed) for seed in range(SERIES_SIZE)]  # the first images of set a
    reference = FeatureStats.from_features(sets["features_a"][:SERIES_SIZE])
    rng = np.random.default_rng(0)
    base_noise = rng.standard_normal((SERIES_SIZE, SIDE, SIDE, 3))

    def noised(sigma: float) -> torch.Tensor:
        pixels = np.stack([np.asarray(image, dtype=np.float64) for image in clean]) + sigma * base_noise
        return torch.from_numpy(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).permute(0, 3, 1, 2)

    series = {
        "blur": [to_batch([image.filter(ImageFilter.GaussianBlur(r)) for image in clean]) for r in (0.7, 1.5, 3.0)],
        "noise": [noised(sigma) for sigma in (8.0, 24.0, 64.0)],
    }
    for name, levels in series.items():
        fids = [frechet_distance(reference, FeatureStats.from_features(inception(images))) for images in levels]
        assert 0.0 < fids[0] < fids[1] < fids[2], (name, fids)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_network_fid_and_kid_equal_torchmetrics_on_the_same_weights_file(weights, sets) -> None:
    reference_net = NoTrainInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights), antialias=False
    )
    expected = reference_net(torch.cat([sets["a"][:2], sets["b"][:2]])).to(torch.float64)
    ours = torch.cat([sets["features_a"][:2], sets["features_b"][:2]])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)

    identity = torch.nn.Identity()
    identity.num_features = 2048  # torchmetrics' own FID/KID maths on the same features
    ref_a, ref_b = sets["features_a"], sets["features_b"]
    tm_fid = FrechetInceptionDistance(feature=identity)
    tm_kid = KernelInceptionDistance(feature=identity, subsets=1, subset_size=SET_SIZE)
    for metric in (tm_fid, tm_kid):
        metric.update(ref_a, real=True)
        metric.update(ref_b, real=False)
    expected_fid = float(tm_fid.compute())
    expected_kid = float(tm_kid.compute()[0])

    fid = frechet_distance(
        FeatureStats.from_features(sets["features_a"]), FeatureStats.from_features(sets["features_b"])
    )
    kid_mean, kid_std = kernel_inception_distance(sets["features_a"], sets["features_b"], subsets=3)
    assert fid == pytest.approx(expected_fid, rel=1e-4)
    assert kid_mean == pytest.approx(expected_kid, rel=1e-4)  # subset = whole sets: every subset is the same
    assert kid_std == pytest.approx(0.0, abs=1e-9 * abs(expected_kid))
    assert abs(kid_mean) > 1e-3  # a value, not rounding noise: the relative check means something


def test_low_rank_and_full_rank_fid_paths_equal_torch_fidelity_and_the_exact_value() -> None:
    """Below D samples FID goes through the centred features, above through torch-fidelity's eigvals
    (D = 64 keeps the general solver cheap). Both equal torch-fidelity's function on the same statistics;
    for two singular covariances, S2 = 0.81 S1 (a set and 0.9 x itself), the exact value is known:
    |0.1 mu|^2 + (1 + 0.81 - 2 x 0.9) tr S1, which the low-rank path meets and torch-fidelity misses by ~3e-6."""
    generator = torch.Generator().manual_seed(0)
    few = torch.randn(20, 64, generator=generator, dtype=torch.float64)
    many = torch.randn(300, 64, generator=generator, dtype=torch.float64) * 1.3 + 0.2
    for a, b in ((few, many), (many, few), (many, many * 1.1)):
        stats_a, stats_b = FeatureStats.from_features(a), FeatureStats.from_features(b)
        assert (stats_a.centred is None) == (a.shape[0] > 64)
        expected = fid_statistics_to_metric(
            {"mu": stats_a.mean, "sigma": stats_a.cov}, {"mu": stats_b.mean, "sigma": stats_b.cov}, verbose=False
        )["frechet_inception_distance"]
        assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-6)
    stats = FeatureStats.from_features(few)
    exact = 0.01 * stats.mean.dot(stats.mean) + 0.01 * np.trace(stats.cov)
    assert frechet_distance(stats, FeatureStats.from_features(few.flip(0) * 0.9)) == pytest.approx(exact, rel=1e-10)
    assert frechet_distance(stats, FeatureStats.from_features(few.flip(0))) < 1e-12


def test_feature_stats_round_trip(tmp_path, sets) -> None:
    stats = FeatureStats.from_features(sets["features_a"])
    loaded = FeatureStats.load(stats.save(tmp_path / "stats" / "a.npz"))
    assert loaded.count == SET_SIZE and loaded.mean.dtype == np.float64
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    np.testing.assert_array_equal(loaded.centred, stats.centred)
    assert not list((tmp_path / "stats").glob(".*tmp"))


def test_missing_or_wrong_weights_file_is_one_message(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(MissingWeightsError) as raised:
        InceptionFeatures(missing, option="eval_metrics.inception")
    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert str(missing) in message and "eval_metrics.inception" in message and INCEPTION_WEIGHTS_URL in message
    assert "\n" not in message
    wrong = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="other.pth is not the FID Inception state dict"):
        InceptionFeatures(wrong)


def jpeg_bytes(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_folder_reading_exif_corrupt_order_and_crop(tmp_path) -> None:
    folder = tmp_path / "ref"
    (folder / "sub").mkdir(parents=True)
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; top half red, bottom half blue
    stored[:10, :, 0], stored[10:, :, 2] = 255, 255
    (folder / "sub" / "b_rotated.JPG").write_bytes(jpeg_bytes(Image.fromarray(stored), orientation=6))
    scene(1).save(folder / "a.png")
    (folder / "c_corrupt.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnot an image")
    (folder / "caption.txt").write_text("not an image")
    scene(2).save(folder / ".hidden.png")

    skipped: dict[str, int] = {}
    images = list(reference_images(str(folder), None, skipped=skipped))
    assert sum(skipped.values()) == 1
    assert [tuple(image.shape) for image in images] == [(3, SIDE, SIDE), (3, 40, 20)]  # a.png, then sub/...
    upright = images[1].to(torch.int32)  # orientation 6: turned 90 degrees clockwise, the red top is now right
    assert (upright[0, :, 12:] > 200).all() and (upright[2, :, :8] > 200).all()

    cropped = list(reference_images(str(folder), 16))
    assert [tuple(image.shape) for image in cropped] == [(3, 16, 16)] * 2
    assert (cropped[1][0].to(torch.int32) > 100).float().mean() == pytest.approx(0.5, abs=0.1)  # centre crop


def test_shards_read_in_member_order_like_the_folder(tmp_path) -> None:
    folder, shard = tmp_path / "folder", tmp_path / "ref-000.tar"
    folder.mkdir()
    with tarfile.open(shard, "w") as tar:
        for index in range(3):
            data = jpeg_bytes(scene(index))
            (folder / f"{index:03d}.jpg").write_bytes(data)
            for name, payload in ((f"{index:03d}.jpg", data), (f"{index:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    from_shards = list(reference_images(str(tmp_path / "ref-{000..000}.tar"), 32))
    from_folder = list(reference_images(str(folder), 32))
    assert len(from_shards) == 3
    for left, right in zip(from_shards, from_folder, strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=0)


def test_reference_features_are_cached_and_rebuilt_when_a_file_changes(tmp_path, inception) -> None:
    folder, cache = tmp_path / "ref", tmp_path / "cache"
    folder.mkdir()
    for index in range(3):
        scene(index).save(folder / f"{index}.png")
    calls: list[int] = []
    hook = inception.network.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        first = reference_features(str(folder), inception, size=32, max_images=None, cache_dir=cache)
        assert first.dtype == torch.float64 and first.shape == (3, 2048) and calls == [3]
        second = reference_features(str(folder), inception, size=32, max_images=None, cache_dir=cache)
        assert calls == [3]  # read from the cache: the network did not run
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        assert len(list(cache.glob("ref-*.npz"))) == 1

        scene(7).save(folder / "1.png")
        stat = (folder / "1.png").stat()
        os.utime(folder / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        third = reference_features(str(folder), inception, size=32, max_images=None, cache_dir=cache)
        assert calls == [3, 3] and len(list(cache.glob("ref-*.npz"))) == 2
        torch.testing.assert_close(third[[0, 2]], first[[0, 2]], rtol=0, atol=0)
        assert not torch.equal(third[1], first[1])

        fewer = reference_features(str(folder), inception, size=32, max_images=2, cache_dir=cache)
        torch.testing.assert_close(fewer, third[:2], rtol=1e-6, atol=1e-9)
    finally:
        hook.remove()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no usable image"):
        reference_features(str(empty), inception, size=32, max_images=None, cache_dir=cache)


def test_benchmark_refuses_bad_arguments_and_missing_weights_in_one_line(tmp_path, capsys) -> None:
    from sgm.benchmarks.eval_features import main

    assert main(["--images", "0"]) == 2
    assert main(["--weights", str(tmp_path / "missing.pth")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "missing.pth does not exist" in lines[1] and INCEPTION_WEIGHTS_URL in lines[1]
