"""What trains: which parts of the SDXL model, each with its own learning rate and weight decay (configuration).

`module.trainable` maps part names to settings (null: the module's own `lr` / `weight_decay`):

    trainable: {unet: {lr: null, weight_decay: null}}           # the default: the UNet alone
    trainable: {unet: {}, text_encoder_1: {lr: 1.0e-5}}         # + OpenCLIP ViT-bigG at its own lr

Parts: `unet`, and `text_encoder_<i>` for each conditioner embedder `i` with weights (SDXL base:
0 = CLIP ViT-L, 1 = OpenCLIP ViT-bigG; the refiner: 0 = bigG). The VAE does not train here
(`sgm.training.vae_training` does). Every other part is frozen: eval mode, no grads, not in the
optimizer, the EMA or the training checkpoint (on resume and every later load it comes from the source
the run recorded, sgm/checkpoint/lineage.py). The optimizer takes one parameter group per part; the EMA averages
`named_parameters`; the checkpoint keeps `state_prefixes`; each checkpoint records `names`.

A trained text encoder trains what its forward uses: weights kept only for the official layout (CLIP
ViT-L's last block and final LayerNorm, SDXL taking its penultimate states; bigG's `logit_scale`) stay
frozen, so no parameter goes without a gradient (DDP refuses that). Cached text embeddings cannot train
a text encoder (the module refuses them).

Adapters (LoRA) belong here too: a part's settings will name an adapter (rank, target layers); the set
then injects it into that part and hands out the adapter's parameters, not the part's own weights,
as that part's parameter group, EMA parameters and checkpoint keys, leaving the base weights frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from sgm.checkpoint.training_ckpt import MODEL_PREFIX
from sgm.models.sdxl import SDXL

UNET = "unet"
TEXT_ENCODER = re.compile(r"text_encoder_(\d+)")


@dataclass(frozen=True)
class PartSettings:
    """One part's optimizer settings; None takes the module's."""

    lr: float | None = None
    weight_decay: float | None = None


SETTING_NAMES = tuple(f.name for f in fields(PartSettings))


class TrainableSet:
    """The parts that train, with their settings; knows their modules, parameters and checkpoint keys."""

    def __init__(self, parts: Mapping[str, Any] | Iterable[str] | None = None) -> None:
        """`parts`: part name -> settings mapping (or None), as in `module.trainable`; a list of names; or
        None for the default (the UNet alone)."""
        if parts is None:
            parts = {UNET: None}
        elif not isinstance(parts, Mapping):
            parts = dict.fromkeys(parts)
        if not parts:
            raise ValueError("module.trainable is empty: name at least one part to train, e.g. {unet: {}}")
        self.parts = {str(name): _settings(str(name), value) for name, value in parts.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def __repr__(self) -> str:
        return f"TrainableSet({self.parts})"

    # -- the parts in a model ------------------------------------------------------------------
    @staticmethod
    def part_paths(model: SDXL) -> dict[str, str]:
        """Every part of `model` that can train -> its module path in the model."""
        paths = {UNET: UNET}
        for index, embedder in enumerate(model.conditioner.embedders):
            if any(True for _ in embedder.parameters()):
                paths[f"text_encoder_{index}"] = f"conditioner.embedders.{index}"
        return paths

    def check(self, model: SDXL) -> None:
        """One clear error for part names `model` does not have, listing the ones it has."""
        paths = self.part_paths(model)
        unknown = [name for name in self.parts if name not in paths]
        if unknown:
            valid = ", ".join(
                name if name == UNET else f"{name} ({type(model.get_submodule(path)).__name__})"
                for name, path in paths.items()
            )
            raise ValueError(f"unknown trainable part(s) {unknown} in module.trainable; this model's parts: {valid}")

    def modules(self, model: SDXL) -> dict[str, nn.Module]:
        """The trained parts' modules, by part name."""
        self.check(model)
        paths = self.part_paths(model)
        return {name: model.get_submodule(paths[name]) for name in self.parts}

    def frozen_modules(self, model: SDXL) -> list[nn.Module]:
        """The modules that do not train: the VAE, the UNet unless trained, each untrained embedder (or the
        whole conditioner when none trains)."""
        trained = set(self.modules(model).values())
        frozen: list[nn.Module] = [model.vae]
        if model.unet not in trained:
            frozen.append(model.unet)
        embedders = [e for e in model.conditioner.embedders if e not in trained]
        frozen += [model.conditioner] if len(embedders) == len(model.conditioner.embedders) else embedders
        return frozen

    def apply(self, model: SDXL) -> None:
        """Freeze everything outside the set (eval mode, no grads); the set's weights take grads.

        Parameters of a trained part that its forward never uses (`unused_parameter_names`) stay frozen."""
        for module in self.frozen_modules(model):
            module.eval()
            module.requires_grad_(False)
        for module in self.modules(model).values():
            unused = set(getattr(module, "unused_parameter_names", list)())
            for name, param in module.named_parameters():
                param.requires_grad_(name not in unused and param.dim() > 0 and param.is_floating_point())

    def keep_frozen_in_eval(self, model: SDXL) -> None:
        """After `train()` on the whole model: the frozen parts back in eval mode."""
        for module in self.frozen_modules(model):
            module.eval()

    def embedder_indices(self, model: SDXL) -> list[int]:
        """Indices of the trained conditioner embedders."""
        self.check(model)
        return [int(match.group(1)) for name in self.parts if (match := TEXT_ENCODER.fullmatch(name))]

    # -- what the optimizer, the EMA and the checkpoint take -----------------------------------
    def named_parameters(self, model: SDXL, prefix: str = MODEL_PREFIX) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) of every trained parameter; keys as in the module's state_dict (`model.unet.*`)."""
        paths = self.part_paths(model)
        named = []
        for name, module in self.modules(model).items():
            named += [(f"{prefix}{paths[name]}.{k}", p) for k, p in module.named_parameters() if p.requires_grad]
        return named

    def param_groups(self, model: SDXL, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer parameter group per part: its parameters, its lr and weight decay (else the module's)."""
        groups = []
        for name, module in self.modules(model).items():
            settings = self.parts[name]
            groups.append(
                {
                    "params": [p for p in module.parameters() if p.requires_grad],
                    "lr": lr if settings.lr is None else settings.lr,
                    "weight_decay": weight_decay if settings.weight_decay is None else settings.weight_decay,
                    "name": name,
                }
            )
        return groups

    def state_prefixes(self, model: SDXL, prefix: str = MODEL_PREFIX) -> tuple[str, ...]:
        """State-dict key prefixes of the trained parts (`model.unet.`, ...): what a training checkpoint keeps."""
        paths = self.part_paths(model)
        self.check(model)
        return tuple(f"{prefix}{paths[name]}." for name in self.parts)

    def in_checkpoint(self, key: str, model: SDXL, prefix: str = MODEL_PREFIX) -> bool:
        """Whether a module state_dict key goes into a training checkpoint: trained parts and anything
        outside the model (the denoiser's table); never the frozen parts."""
        return not key.startswith(prefix) or key.startswith(self.state_prefixes(model, prefix))


def _settings(name: str, value: Any) -> PartSettings:
    if isinstance(value, PartSettings):
        return value
    value = dict(value or {})
    unknown = sorted(set(value) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(
            f"module.trainable.{name}: unknown setting(s) {unknown}; a part takes {', '.join(SETTING_NAMES)}"
        )
    return PartSettings(**{k: None if v is None else float(v) for k, v in value.items()})
