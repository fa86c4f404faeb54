"""The standard FID/KID Inception-V3 network, loaded only from a local weights file.

FID and KID are comparable across papers only with one network: TensorFlow's 2015-12-05 Inception
graph, its 2048-d pool3 features, and its own bilinear resize to 299 x 299. torch-fidelity ships a
faithful port ("inception-v3-compat"); `InceptionFeatures` wraps it and never lets it download:
the weights file must be given, and a missing one is one `MissingWeightsError` naming the file,
the option it came from and where to get it. torch-fidelity's release file and pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` are the same weights in the same key layout (same sha256
prefix); either works.

`write_random_weights` writes a file in exactly that format with random values, for tests and the
benchmark (the network's cost and every code path are the same; the numbers are not comparable).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from sgm.checkpoint.fingerprints import file_sha256
from sgm.checkpoint.io import atomic_write

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3  # torch-fidelity's GitHub release of the file above
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's naming convention: the file's sha256 starts so
FEATURE_DIM = 2048
_NAME = "inception-v3-compat"  # torch-fidelity's registry name of this network


class MissingWeightsError(FileNotFoundError):
    """A feature extractor's weights file is not there; the message says which and where to get it."""


def require_weights_file(path: str | os.PathLike | None, what: str, how_to_get: str) -> Path:
    """`path` as a Path when it is a readable file, else MissingWeightsError: "<what> <path> ...: <how_to_get>".

    `what` names the weights and the key or option that gave the path (e.g. "Inception-V3 weights
    (--inception)"); `how_to_get` says where to download them. Nothing is ever fetched here.
    """
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what}: no file given. {how_to_get}")
    file = Path(path).expanduser()
    if not file.is_file():
        state = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise MissingWeightsError(f"{what} file {file} {state}. {how_to_get}")
    if not os.access(file, os.R_OK):
        raise MissingWeightsError(f"{what} file {file} is not readable. Give this user read access or copy it.")
    return file


def inception_how_to_get() -> str:
    """Where the standard Inception-V3 file comes from, for error messages and the README."""
    return (
        f"Download {INCEPTION_WEIGHTS_URL} (the TF 2015-12-05 FID Inception, about 96 MB; pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth is the same file) on a machine with internet and pass its local path"
    )


class InceptionFeatures(torch.nn.Module):
    """uint8 images [B, 3, H, W] -> float64 pool3 features [B, 2048] of the standard FID Inception.

    Any H, W: the network resizes to 299 x 299 itself, with TF1's bilinear resize as the reference
    implementation does. Large inputs run in chunks of `batch_size` on the module's device. The
    network is frozen and always in eval mode; `.to(device)` moves it.
    """

    def __init__(self, weights: str | os.PathLike, *, option: str = "--inception", batch_size: int = 32) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights_path = require_weights_file(weights, f"Inception-V3 weights ({option})", inception_how_to_get())
        self.batch_size = batch_size
        try:
            self.network = FeatureExtractorInceptionV3(
                _NAME, [str(FEATURE_DIM)], feature_extractor_weights_path=str(self.weights_path)
            )
        except Exception as error:  # a file of another network, a truncated download, not a torch file
            raise ValueError(
                f"Inception-V3 weights ({option}) file {self.weights_path} is not the FID Inception state dict "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). {inception_how_to_get()}"
            ) from None
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode: batch-norm statistics are part of the standard network."""
        return super().train(False)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file (computed once): names the network in caches and reports."""
        if self._fingerprint is None:
            self._fingerprint = file_sha256(self.weights_path)
        return self._fingerprint

    @property
    def is_standard(self) -> bool:
        """Whether the weights file is the published one (by its sha256 prefix): else FIDs are not comparable."""
        return self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of `images` (uint8 [B, 3, H, W], any device) as float64 [B, 2048] on the module's device."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        device = self.network.fc.weight.device
        chunks = [
            self.network(images[start : start + self.batch_size].to(device))[0].to(torch.float64)
            for start in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, FEATURE_DIM, dtype=torch.float64, device=device)


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's network keeping its fresh initialisation (its constructor always loads a file)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-valued Inception weights file in the standard format (the real file's keys and shapes).

    For tests and benchmarks only: convolutions He-initialised, batch-norm statistics and affine
    terms drawn near identity, so activations neither vanish nor explode through the 94 layers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch) / "empty.pth"
        torch.save({}, empty)
        state = _Unloaded(_NAME, [str(FEATURE_DIM)], feature_extractor_weights_path=str(empty)).state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
        elif value.dim() == 1:  # batch-norm scale
            value.copy_(torch.rand(value.shape, generator=generator) * 0.4 + 0.8)
        else:
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
