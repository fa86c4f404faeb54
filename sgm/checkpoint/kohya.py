"""The single place that knows kohya's LoRA key names (the format ComfyUI, A1111 and diffusers read).

- UNet: `lora_unet_<official module path, "." -> "_">`, the path under `model.diffusion_model.`, e.g.
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.
- Text towers, named as transformers' CLIPTextModel names them: `lora_te1_` (SDXL base CLIP ViT-L,
  embedder 0), `lora_te2_` (OpenCLIP bigG, embedder 1), `lora_te_` when the model has one text tower
  (the refiner), then `text_model_encoder_layers_<n>_self_attn_{q,k,v,out}_proj` / `_mlp_fc1` / `_mlp_fc2`.
  Our open_clip blocks hold q/k/v packed in `attn.in_proj_weight`: each slice is its own module.

Each module carries `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` (scale = alpha /
rank); a 4-D down weight is a LoCon conv adapter with the target conv's kernel, stride and padding.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sgm.checkpoint.io import atomic_write, prepare_for_save

if TYPE_CHECKING:
    from sgm.models.lora import LoRANetwork
    from sgm.models.sdxl import SDXL

UNET_PREFIX = "lora_unet_"
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_TE_NAMES = {  # our module path inside a residual block -> transformers' CLIP name
    "attn.q_proj": "self_attn_q_proj",
    "attn.k_proj": "self_attn_k_proj",
    "attn.v_proj": "self_attn_v_proj",
    "attn.out_proj": "self_attn_out_proj",
    "mlp.c_fc": "mlp_fc1",
    "mlp.c_proj": "mlp_fc2",
}
_SHOW = 12


class LoRAFileError(ValueError):
    """A LoRA file's keys or shapes do not fit the model it is applied to."""


@dataclass(frozen=True)
class LoRATarget:
    """One adaptable weight: kohya name, part, path within the part, and the module that computes it.

    For a text tower's attention, `module_path` is the nn.MultiheadAttention and `slot` says which
    weight (`q`, `k`, `v`: rows of in_proj_weight; `out`: out_proj.weight); otherwise `slot` is None and
    `module_path` is the Linear / Conv2d itself. `conv` = (kernel, stride, padding) for a Conv2d.
    """

    name: str
    part: str
    path: str
    module_path: str
    slot: str | None
    in_features: int
    out_features: int
    conv: tuple[int, int, int] | None = None

    def resolve(self, model: SDXL) -> nn.Module:
        """The module in `model` that this target adapts."""
        return part_module(model, self.part).get_submodule(self.module_path)


def part_module(model: SDXL, part: str) -> nn.Module:
    """`unet` -> model.unet; `text_encoder_<i>` -> model.conditioner.embedders[i]."""
    if part == "unet":
        return model.unet
    index = part.removeprefix("text_encoder_")
    if not index.isdigit() or int(index) >= len(model.conditioner.embedders):
        raise ValueError(f"unknown model part '{part}'; use 'unet' or 'text_encoder_<embedder index>'")
    return model.conditioner.embedders[int(index)]


def text_encoder_prefixes(model: SDXL) -> dict[int, str]:
    """Embedder index -> kohya prefix: `lora_te1_`, `lora_te2_`, ... in order, or `lora_te_` for a single tower."""
    from sgm.models.text_encoders import _TextTower

    indices = [i for i, module in enumerate(model.conditioner.embedders) if isinstance(module, _TextTower)]
    if len(indices) == 1:
        return {indices[0]: "lora_te_"}
    return {index: f"lora_te{number}_" for number, index in enumerate(indices, start=1)}


def _conv_geometry(conv: nn.Conv2d) -> tuple[int, int, int]:
    kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
    if isinstance(padding, str) or len({*kernel}) != 1 or len({*stride}) != 1 or len({*padding}) != 1:
        raise ValueError(f"LoCon supports square convs with int padding only, got {conv}")
    return kernel[0], stride[0], padding[0]


def lora_targets(model: SDXL) -> dict[str, LoRATarget]:
    """Every LoRA-able weight of `model` by kohya name: each UNet Linear / Conv2d, and each text tower's
    attention q/k/v/out and MLP fc1/fc2 (works on the meta device)."""
    targets: dict[str, LoRATarget] = {}
    for path, module in model.unet.named_modules():
        if isinstance(module, nn.Linear):
            features = (module.in_features, module.out_features, None)
        elif isinstance(module, nn.Conv2d):
            features = (module.in_channels, module.out_channels, _conv_geometry(module))
        else:
            continue
        name = UNET_PREFIX + path.replace(".", "_")
        targets[name] = LoRATarget(name, "unet", path, path, None, *features)
    for index, prefix in text_encoder_prefixes(model).items():
        part = f"text_encoder_{index}"
        blocks = model.conditioner.embedders[index].model.transformer.resblocks
        for layer, block in enumerate(blocks):
            base = f"model.transformer.resblocks.{layer}"
            width = block.attn.embed_dim
            for slot in ("q", "k", "v", "out"):
                local = f"attn.{slot}_proj"
                name = f"{prefix}text_model_encoder_layers_{layer}_{_TE_NAMES[local]}"
                targets[name] = LoRATarget(name, part, f"{base}.{local}", f"{base}.attn", slot, width, width)
            for local in ("mlp.c_fc", "mlp.c_proj"):
                linear = block.get_submodule(local)
                name = f"{prefix}text_model_encoder_layers_{layer}_{_TE_NAMES[local]}"
                targets[name] = LoRATarget(
                    name, part, f"{base}.{local}", f"{base}.{local}", None, linear.in_features, linear.out_features
                )
    return targets


def lora_names(model: SDXL) -> list[str]:
    """Every kohya module name a LoRA for `model` may carry."""
    return list(lora_targets(model))


# --- files -------------------------------------------------------------------------------------------


def save_lora_file(
    network: LoRANetwork,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float16,
    base_model_version: str = "sdxl_base_v1-0",
) -> Path:
    """Write the network as one kohya .safetensors file (atomically) with kohya and `sgm.*` metadata.

    dtype: torch.float16 (the usual release format), torch.float32, or None to keep the adapters' dtype.
    metadata: extra keys (e.g. `sgm.base_fingerprint`, `sgm.steps`, `sgm.training_config`); non-strings
    are stored as JSON.
    """
    tensors = prepare_for_save(network.state_dict(), dtype)
    ranks = Counter(int(m.rank) for m in network.values())
    alphas = Counter(float(m.alpha) for m in network.values())
    conv = [m for m in network.values() if m.conv is not None and m.conv[0] > 1]
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]) if ranks else "0",
        "ss_network_alpha": _number(alphas.most_common(1)[0][0]) if alphas else "0",
        "ss_base_model_version": base_model_version,
        "sgm.parts": json.dumps(list(network.parts)),
        "sgm.config": json.dumps({part: asdict(config) for part, config in network.config.items()}),
        "sgm.modules": str(len(network)),
    }
    if conv:
        meta["ss_network_args"] = json.dumps(
            {"conv_dim": str(conv[0].rank), "conv_alpha": _number(float(conv[0].alpha))}
        )
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, string metadata) of a LoRA .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path} (give the path to a .safetensors file)")
    state = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
            state[key] = handle.get_tensor(key)
    return state, metadata


def network_from_state(model: SDXL, state: Mapping[str, Tensor], source: str = "LoRA state") -> LoRANetwork:
    """A detached LoRANetwork shaped by kohya-keyed tensors (rank from shapes, alpha from the file), loaded.

    Raises one LoRAFileError listing every unknown key, module name the model lacks, and shape mismatch.
    """
    from sgm.models.lora import LoRAConfig, LoRANetwork, _Spec

    targets = lora_targets(model)
    groups: dict[str, dict[str, Tensor]] = {}
    unknown, unmatched, shapes = [], [], []
    for key, value in state.items():
        name, suffix = _split_key(key)
        if suffix is None:
            unknown.append(key)
        elif name not in targets:
            unmatched.append(key)
        else:
            groups.setdefault(name, {})[suffix] = value
    specs = {}
    for name, tensors in groups.items():
        target = targets[name]
        problem = _check_shapes(target, tensors)
        if problem:
            shapes.append(f"{name}: {problem}")
            continue
        rank = tensors["lora_down.weight"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        specs[name] = _Spec(target, rank, alpha)
    if unknown or unmatched or shapes:
        raise LoRAFileError(
            f"{source} does not fit this model."
            + _describe("unknown keys (not kohya LoRA: lora_down / lora_up / alpha)", unknown)
            + _describe("module names this model lacks", unmatched)
            + _describe("shape mismatches", shapes)
            + "\n  Fix: use a LoRA (networks.lora / LoCon) trained for this model (SDXL base: lora_unet_, "
            "lora_te1_, lora_te2_; refiner: lora_te_); LyCORIS LoHa / LoKr files are not supported."
        )
    config = {}
    for part in sorted({s.target.part for s in specs.values()}):
        own = [s for s in specs.values() if s.target.part == part]
        rank = Counter(s.rank for s in own).most_common(1)[0][0]
        alpha = Counter(s.alpha for s in own).most_common(1)[0][0]
        config[part] = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(f"^{s.target.path}$" for s in own))
    network = LoRANetwork(specs, config)
    wanted = network.state_dict()
    own_state = dict(wanted)  # a file without alpha keeps alpha = rank
    for name, tensors in groups.items():
        for suffix, value in tensors.items():
            key = f"{name}.{suffix}"
            own_state[key] = value.reshape(wanted[key].shape).to(wanted[key].dtype)
    network.load_state_dict(own_state, strict=True)
    return network


def apply_lora_file(model: SDXL, path: str | os.PathLike, scale: float = 1.0) -> LoRANetwork:
    """Read a kohya LoRA / LoCon file and apply it to `model` at `scale` (fp32 adapters on the UNet's device,
    in eval mode: this is the inference path)."""
    state, _ = load_lora_file(path)
    network = network_from_state(model, state, source=str(path))
    param = next(model.unet.parameters(), None)
    network.to(param.device if param is not None else "cpu", torch.float32)
    return network.eval().set_scale(scale).attach(model)


def _split_key(key: str) -> tuple[str, str | None]:
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def _check_shapes(target: LoRATarget, tensors: Mapping[str, Tensor]) -> str:
    """'' if the tensors fit the target, else what does not."""
    missing = [s for s in SUFFIXES[:2] if s not in tensors]
    if missing:
        return f"missing {', '.join(missing)}"
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = down.shape[0]
    if target.conv is None:
        want_down, want_up = (rank, target.in_features), (target.out_features, rank)
    else:
        kernel = target.conv[0]
        want_down = (rank, target.in_features, kernel, kernel)
        want_up = (target.out_features, rank, 1, 1)
        if kernel == 1 and down.ndim == 2:  # some tools store 1x1 conv adapters as 2-D
            want_down, want_up = (rank, target.in_features), (target.out_features, rank)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return (
            f"lora_down {list(down.shape)} / lora_up {list(up.shape)}, model wants {list(want_down)} / {list(want_up)}"
        )
    if "alpha" in tensors and tensors["alpha"].numel() != 1:
        return f"alpha has shape {list(tensors['alpha'].shape)}, expected a scalar"
    return ""


def _describe(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "\n".join(f"    {item}" for item in sorted(items)[:_SHOW])
    more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"\n  {title} ({len(items)}):\n{shown}{more}"
