"""What trains: which parts of the SDXL model, each with its own learning rate and weight decay (configuration).

`module.trainable` maps part names to settings (null: the module's own `lr` / `weight_decay`; `mode`
full | lora | frozen, default full):

    trainable: {unet: {lr: null, weight_decay: null}}           # the default: the UNet alone
    trainable: {unet: {}, text_encoder_1: {lr: 1.0e-5}}         # + OpenCLIP ViT-bigG at its own lr
    trainable: {unet: {mode: lora, lora: {rank: 16, targets: attn_mlp}},
                text_encoder_0: {mode: lora, lr: 5.0e-5, lora: {rank: 8}}}   # LoRA adapters

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

A part in `mode: lora` keeps its base weights frozen (and out of the checkpoint: they come from the run's
recorded sources, bit-identical); `attach_adapters` hooks one LoRANetwork (sgm/models/lora.py; `lora:` are
LoRAConfig's fields: rank, alpha, dropout, targets, conv_rank, conv_alpha) into the model, which the
training module holds as `adapters` (checkpoint keys `adapters.<kohya name>.lora_down.weight` ...), and the
adapters of that part are its parameter group and its EMA parameters. `mode: frozen` is the same as
leaving the part out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from sgm.checkpoint.training_ckpt import ADAPTER_PREFIX, MODEL_PREFIX
from sgm.models.lora import LoRAConfig, LoRANetwork, apply_lora
from sgm.models.sdxl import SDXL

UNET = "unet"
TEXT_ENCODER = re.compile(r"text_encoder_(\d+)")
MODES = ("full", "lora", "frozen")


@dataclass(frozen=True)
class PartSettings:
    """One part's optimizer settings (None takes the module's), how it trains and, for LoRA, the adapter."""

    lr: float | None = None
    weight_decay: float | None = None
    mode: str = "full"
    lora: LoRAConfig | None = None


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
        settings = {str(name): _settings(str(name), value) for name, value in parts.items()}
        self.parts = {name: value for name, value in settings.items() if value.mode != "frozen"}
        if not self.parts:
            raise ValueError("module.trainable is empty: name at least one part to train, e.g. {unet: {}}")
        self.network: LoRANetwork | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parts)

    @property
    def modes(self) -> dict[str, str]:
        """Part name -> full | lora (recorded in each checkpoint)."""
        return {name: value.mode for name, value in self.parts.items()}

    def _full(self) -> list[str]:
        return [name for name, value in self.parts.items() if value.mode == "full"]

    def _lora(self) -> dict[str, LoRAConfig]:
        return {name: value.lora or LoRAConfig() for name, value in self.parts.items() if value.mode == "lora"}

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
        """The modules of the parts that train their own weights (mode full), by part name."""
        self.check(model)
        paths = self.part_paths(model)
        return {name: model.get_submodule(paths[name]) for name in self._full()}

    def attach_adapters(self, model: SDXL) -> LoRANetwork | None:
        """Hook fresh LoRA adapters into the lora parts (None when no part is in lora mode); the text towers
        that carry adapters then run with gradients inside the conditioner."""
        lora = self._lora()
        if not lora:
            return None
        self.check(model)
        self.network = apply_lora(model, lora)
        model.conditioner.grad_through = set(self.embedder_indices(model))
        return self.network

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
        """Indices of the trained conditioner embedders (fully or through adapters)."""
        self.check(model)
        return [int(match.group(1)) for name in self.parts if (match := TEXT_ENCODER.fullmatch(name))]

    # -- what the optimizer, the EMA and the checkpoint take -----------------------------------
    def named_parameters(self, model: SDXL, prefix: str = MODEL_PREFIX) -> list[tuple[str, nn.Parameter]]:
        """(key, parameter) of every trained parameter; keys as in the module's state_dict (`model.unet.*`)."""
        paths = self.part_paths(model)
        named = []
        for name, module in self.modules(model).items():
            named += [(f"{prefix}{paths[name]}.{k}", p) for k, p in module.named_parameters() if p.requires_grad]
        for key, param in self._adapter_parameters().items():
            named.append((f"{ADAPTER_PREFIX}{key}", param))
        return named

    def _adapter_parameters(self, part: str | None = None) -> dict[str, nn.Parameter]:
        """The adapters' parameters by network key (all parts, or one)."""
        if self.network is None:
            return {}
        targets = self.network.targets
        return {
            key: param
            for key, param in self.network.named_parameters()
            if part is None or targets[key.split(".", 1)[0]].part == part
        }

    def param_groups(self, model: SDXL, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer parameter group per part: its parameters, its lr and weight decay (else the module's)."""
        groups = []
        modules = self.modules(model)
        for name, settings in self.parts.items():
            if name in modules:
                params = [p for p in modules[name].parameters() if p.requires_grad]
            else:
                params = list(self._adapter_parameters(name).values())
            groups.append(
                {
                    "params": params,
                    "lr": lr if settings.lr is None else settings.lr,
                    "weight_decay": weight_decay if settings.weight_decay is None else settings.weight_decay,
                    "name": name,
                }
            )
        return groups

    def state_prefixes(self, model: SDXL, prefix: str = MODEL_PREFIX) -> tuple[str, ...]:
        """State-dict key prefixes of the parts trained in full (`model.unet.`, ...): what a training checkpoint
        keeps of the model (adapters are kept under `adapters.`)."""
        paths = self.part_paths(model)
        self.check(model)
        return tuple(f"{prefix}{paths[name]}." for name in self._full())

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
    mode = str(value.pop("mode", "full"))
    if mode not in MODES:
        raise ValueError(f"module.trainable.{name}.mode: {mode!r} is not one of {', '.join(MODES)}")
    lora = value.pop("lora", None)
    if lora is not None and mode != "lora":
        raise ValueError(f"module.trainable.{name}: `lora` settings need mode: lora (mode is {mode})")
    if mode == "lora" and not isinstance(lora, LoRAConfig):
        try:
            lora = LoRAConfig(
                **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(lora or {}).items()}
            )
        except TypeError as error:
            raise ValueError(
                f"module.trainable.{name}.lora: {error} (fields: rank, alpha, dropout, targets, conv_rank, conv_alpha)"
            ) from None
    numbers = {k: None if v is None else float(v) for k, v in value.items()}
    return PartSettings(**numbers, mode=mode, lora=lora)
