"""CLIP score of images against their captions, with an open_clip model read from a LOCAL weights file.

score = 100 x max(cos(image embedding, text embedding), 0) per pair: torchmetrics' CLIPScore definition
(Hessel et al. 2021 without their 2.5 weight). Images go through the model's own preprocessing (shorter side
resized to the model's image size, bicubic with antialias, centre crop, normalised with the model's mean/std).

The model comes from open_clip's bundled configs (`ViT-L-14`, `ViT-bigG-14`, ...: no download) or from an
open_clip config (a dict, or a `.json` file as open_clip writes it), built directly, so a test's tiny CLIP never
enters open_clip's global model registry. Weights are a local file only (open_clip's .bin / .pt / .safetensors
state dict); nothing is fetched at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn

from sgm.eval.inception import require_weights_file

CLIP_WEIGHTS_HOW_TO_GET = (
    "download the open_clip checkpoint of that model to a local file, e.g. open_clip_pytorch_model.bin from "
    "https://huggingface.co/laion/CLIP-ViT-L-14-laion2B-s32B-b82K (clip model ViT-L-14) or "
    "https://huggingface.co/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (clip model ViT-bigG-14)"
)


class CLIPModelError(ValueError):
    """A CLIP model name/config or weights file that cannot be used; the message names the fix."""


def clip_config(model: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config: a bundled model name, a `.json` config file, or a config dict (copied)."""
    if isinstance(model, Mapping):
        config = deepcopy(dict(model))
    elif str(model).endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise CLIPModelError(f"CLIP model config not found: {path} (an open_clip model config .json)")
        config = json.loads(path.read_text(encoding="utf-8"))
    else:
        name = str(model)
        if ":" in name:  # hf-hub:..., local-dir:... would go to the network or another layout
            raise CLIPModelError(f"CLIP model {name!r}: give an open_clip model name (e.g. ViT-L-14) or a .json config")
        config = open_clip.get_model_config(name)
        if config is None:
            known = [m for m in open_clip.list_models() if m.startswith(("ViT-L-14", "ViT-bigG-14", "ViT-H-14"))]
            raise CLIPModelError(
                f"unknown open_clip model {name!r}; use one of open_clip.list_models(), e.g. {', '.join(known[:6])}"
            )
    config = config.get("model_cfg", config)  # open_clip_config.json nests the model under model_cfg
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise CLIPModelError(f"not an open_clip CLIP config (needs embed_dim, vision_cfg, text_cfg): {sorted(config)}")
    if config["text_cfg"].get("hf_model_name") or config["vision_cfg"].get("timm_model_name"):
        raise CLIPModelError("CLIP models with Hugging Face / timm towers are not supported (they load from the hub)")
    return config


def tiny_clip_config(image_size: int = 32, context_length: int = 8, width: int = 32) -> dict[str, Any]:
    """A CLIP of a few hundred thousand trainable weights (plus CLIP's 49408-token embedding) for CPU tests."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }


def build_clip(config: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The open_clip CLIP of `config` with fresh weights on `device` ("meta": shapes only, no memory)."""
    kwargs = {k: v for k, v in config.items() if k not in ("custom_text", "preprocess_cfg")}
    cls = open_clip.CustomTextCLIP if config.get("custom_text") else open_clip.CLIP
    with torch.device(device):
        return cls(**kwargs)


def preprocess_settings(config: Mapping[str, Any]) -> PreprocessCfg:
    """The model's image preprocessing: its image size, and open_clip's mean/std unless its config says others."""
    size = config["vision_cfg"].get("image_size", 224)
    extra = {k: v for k, v in config.get("preprocess_cfg", {}).items() if k in ("mean", "std", "interpolation")}
    return PreprocessCfg(size=size, **extra)


class CLIPScorer(nn.Module):
    """CLIP score (torchmetrics' definition) with an open_clip model and a local weights file."""

    def __init__(
        self,
        model: str | os.PathLike | Mapping[str, Any],
        weights: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        what: str = "CLIP weights",
    ) -> None:
        """model: a bundled open_clip name (ViT-L-14, ViT-bigG-14), a .json config or a config dict; weights: the
        local state-dict file; `what` names where the path came from (a CLI option or config key) in errors."""
        super().__init__()
        config = clip_config(model)
        path = require_weights_file(weights, what, CLIP_WEIGHTS_HOW_TO_GET)
        self.name = str(model) if not isinstance(model, Mapping) else "custom"
        self.model = build_clip(config).eval().requires_grad_(False)
        try:
            open_clip.load_checkpoint(self.model, str(path))
        except Exception as error:  # shapes of another model, not a torch file, a truncated download
            first = " ".join(str(error).strip().splitlines()[:3])[:300]
            raise CLIPModelError(
                f"{what} file {path} do not fit the open_clip model {self.name} ({type(error).__name__}: {first}); "
                "give the model the file belongs to, or the file of this model"
            ) from None
        self.model.to(device)
        self.preprocess = preprocess_settings(config)
        self.tokenizer = SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> the model's normalised input [B, 3, S, S] (resize shorter side, centre crop)."""
        size = self.preprocess.size if isinstance(self.preprocess.size, int) else self.preprocess.size[0]
        x = images.to(self.device, torch.float32)
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
        x = F.interpolate(x, size=new, mode=self.preprocess.interpolation, antialias=True, align_corners=False)
        x = x.round().clamp(0, 255) / 255.0  # as an 8-bit resized image, which open_clip's PIL transform gives
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[..., top : top + size, left : left + size]
        mean = torch.tensor(self.preprocess.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> unit image embeddings [B, D] (float32)."""
        parts = [
            self.model.encode_image(self.pixels(images[i : i + self.batch_size]), normalize=True).float()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> Tensor:
        """captions -> unit text embeddings [B, D] (float32); longer captions are cut at the context length."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        parts = [
            self.model.encode_text(tokens[i : i + self.batch_size], normalize=True).float()
            for i in range(0, len(tokens), self.batch_size)
        ]
        return torch.cat(parts)

    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per pair 100 x max(cos(image_i, caption_i), 0): [B] float32 on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if len(images) == 0:
            return torch.zeros(0)
        cosine = (self.embed_images(images) * self.embed_texts(captions)).sum(dim=1)
        return (100.0 * cosine.clamp(min=0)).cpu()
