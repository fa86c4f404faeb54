"""LoRA / LoCon adapters for the SDXL UNet and text towers, applied without touching the base model.

The base model keeps every module and parameter name (its state_dict, checkpoints and official layout
do not change): each adapted Linear / Conv2d gets a forward hook that adds `lora_up(lora_down(x))`, and
each adapted `nn.MultiheadAttention` (the open_clip text towers, whose q/k/v live packed in
`in_proj_weight` and whose `out_proj` is read by the functional kernel, never called) gets its forward
wrapped to run with `W + delta` weights. The adapters live in a separate `LoRANetwork` whose
state_dict keys are the kohya file keys (`<kohya name>.lora_down.weight`, `.lora_up.weight`, `.alpha`),
so it can sit inside a LightningModule (DDP / DeepSpeed see its parameters) and save as-is.

Several networks may be applied to one model (each with its own scale); `remove()` detaches one.
Apply adapters before `unet.compile()` (applying later to a UNet compiled in place clears dynamo's
caches, forcing a recompile). Adapters default to fp32; the branch runs in the autocast dtype under
autocast, else in the adapter dtype, and is added in the base output's dtype.
Names and targets come from sgm/checkpoint/kohya.py, the single place that knows kohya's key names.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sgm.checkpoint.kohya import LoRATarget
    from sgm.models.sdxl import SDXL

UNET = "unet"
_ATTN = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_MLP = (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$", r"\.proj_(in|out)$")
_CONV = r"\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv)$"
_TE_ATTN = r"\.attn\.(q_proj|k_proj|v_proj|out_proj)$"
_TE_MLP = r"\.mlp\.(c_fc|c_proj)$"
# Preset name -> regex patterns over module paths within the part (text towers: `attn.q_proj` etc. name
# the packed in_proj slices).
UNET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_ATTN,),
    "attn_mlp": (_ATTN, *_MLP),
    "locon": (_ATTN, *_MLP, _CONV),
}
TEXT_PRESETS: dict[str, tuple[str, ...]] = {"attn": (_TE_ATTN,), "attn_mlp": (_TE_ATTN, _TE_MLP)}


@dataclass(frozen=True)
class LoRAConfig:
    """One part's adapter: rank / alpha (scale = alpha / rank), input dropout, targets, LoCon conv rank."""

    rank: int = 16
    alpha: float | None = None  # None: = rank (scale 1)
    dropout: float = 0.0
    targets: str | Sequence[str] = "attn"  # preset name(s) and/or regex patterns over module paths
    conv_rank: int | None = None  # LoCon: rank of 3x3 / strided convs (None: = rank)
    conv_alpha: float | None = None  # None: = conv_rank's default alpha (alpha, or conv_rank if alpha is None)

    def __post_init__(self) -> None:
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise ValueError(f"LoRA rank must be >= 1, got rank={self.rank} conv_rank={self.conv_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def patterns(self, part: str) -> tuple[str, ...]:
        """The regex patterns of this config for `part` (presets expanded)."""
        presets = UNET_PRESETS if part == UNET else TEXT_PRESETS
        items = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        out: list[str] = []
        for item in items:
            out.extend(presets.get(item, (item,)))
        return tuple(out)

    def rank_alpha(self, conv: bool) -> tuple[int, float]:
        """(rank, alpha) of a linear (or 1x1 conv) target, or of a k x k conv target with conv=True."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        if not conv or self.conv_rank is None:
            return self.rank, alpha
        return self.conv_rank, float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)


class LoRAModule(nn.Module):
    """delta(x) = up(down(dropout(x))) * alpha / rank * multiplier; down Linear / Conv2d, up Linear / 1x1 Conv2d.

    Init as the LoRA paper: down kaiming-uniform(a=sqrt(5)), up zero, so a fresh adapter changes nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        conv: tuple[int, int, int] | None = None,
    ) -> None:
        """conv: (kernel, stride, padding) of the adapted Conv2d (LoCon); None for a Linear target."""
        super().__init__()
        self.rank, self.conv = int(rank), conv
        if conv is None:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        else:
            kernel, stride, padding = conv
            self.lora_down = nn.Conv2d(in_features, rank, kernel, stride, padding, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.multiplier = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def scale(self) -> Tensor:
        """alpha / rank * multiplier as a 0-dim tensor (no host sync, compile-friendly)."""
        return self.alpha / self.rank * self.multiplier

    def forward(self, x: Tensor) -> Tensor:
        # The submodules are called (not their weights read) so ZeRO-3 gathers them. Under autocast they run
        # in the autocast dtype; otherwise in the adapter's dtype (fp32 adapters on a bf16 model compute
        # the small branch in fp32), and the result is cast back to the input's dtype.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_down.weight.dtype)
        out = self.lora_up(self.lora_down(self.dropout(h)))
        return (out * self.scale().to(out.dtype)).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """The weight delta alpha / rank * up @ down in the target's weight shape, fp32, without the multiplier."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        delta = up.flatten(1) @ down.flatten(1)
        if self.conv is not None:
            delta = delta.reshape(up.shape[0], *down.shape[1:])
        return delta * (self.alpha.float() / self.rank)


def _hook(lora: LoRAModule):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + lora(args[0]).to(output.dtype)

    return hook


_SLOTS = ("q", "k", "v")


class _MHAPatch:
    """Wraps one nn.MultiheadAttention's forward to add the deltas of every attached adapter.

    Without active adapter dropout (none configured, or the network in eval mode) the module's own forward runs with `in_proj_weight + dq/dk/dv` and
    `out_proj.weight + dout` (torch.func.functional_call), which is exact: a zero delta gives the base
    output bit for bit. With adapter dropout in training the attention is computed explicitly.
    """

    ATTR = "_sgm_lora_patch"

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        self.mha = mha
        self.adapters: list[tuple[str, LoRAModule]] = []
        self.inside = False
        mha.forward = self.forward  # instance attribute: no parameter or module is renamed

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> _MHAPatch:
        patch = getattr(mha, cls.ATTR, None)
        if patch is None:
            patch = cls(mha)
            setattr(mha, cls.ATTR, patch)
        return patch

    def detach(self, lora: LoRAModule, mha: nn.MultiheadAttention) -> None:
        self.adapters = [(slot, m) for slot, m in self.adapters if m is not lora]
        if not self.adapters:
            mha.__dict__.pop("forward", None)
            mha.__dict__.pop(self.ATTR, None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mha = self.mha
        base = type(mha).forward
        if self.inside or not self.adapters:
            return base(mha, *args, **kwargs)
        if any(m.training and not isinstance(m.dropout, nn.Identity) for _, m in self.adapters):
            return self._explicit(*args, **kwargs)
        embed = mha.embed_dim
        in_delta, out_delta = None, None
        weight = mha.in_proj_weight
        identity = torch.eye(embed, device=weight.device, dtype=weight.dtype)
        for slot, lora in self.adapters:
            # delta^T = lora(I): the adapter's modules are called (as ZeRO-3 needs to gather them), with
            # its scale and multiplier; a zero lora_up gives an exact zero, so W + delta == W bit for bit.
            delta = lora(identity).T
            if slot == "out":
                out_delta = delta if out_delta is None else out_delta + delta
                continue
            index = _SLOTS.index(slot)
            padded = F.pad(delta, (0, 0, index * embed, (2 - index) * embed))
            in_delta = padded if in_delta is None else in_delta + padded
        params = {}
        if in_delta is not None:
            params["in_proj_weight"] = mha.in_proj_weight + in_delta.to(mha.in_proj_weight.dtype)
        if out_delta is not None:
            params["out_proj.weight"] = mha.out_proj.weight + out_delta.to(mha.out_proj.weight.dtype)
        self.inside = True
        try:
            return torch.func.functional_call(mha, params, args, kwargs, strict=False)
        finally:
            self.inside = False

    def _explicit(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Batch-first attention with per-slot adapter outputs added (used when adapter dropout is active)."""
        mha = self.mha
        if not mha.batch_first or key_padding_mask is not None or mha.bias_k is not None or query.dim() != 3:
            raise NotImplementedError(
                "LoRA dropout on nn.MultiheadAttention supports batch-first self-attention without "
                "key_padding_mask only; set dropout=0 for the text encoders"
            )
        weights = mha.in_proj_weight.chunk(3)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        projected = []
        for slot, source, weight, bias in zip(_SLOTS, (query, key, value), weights, biases):
            out = F.linear(source, weight, bias)
            for adapter_slot, lora in self.adapters:
                if adapter_slot == slot:
                    out = out + lora(source).to(out.dtype)
            projected.append(out.unflatten(-1, (mha.num_heads, -1)).transpose(1, 2))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked; SDPA: True = attend
        if attn_mask is not None:
            attn_mask = attn_mask.to(projected[0].dtype) if attn_mask.is_floating_point() else attn_mask
        dropout = mha.dropout if mha.training else 0.0
        attended = F.scaled_dot_product_attention(
            *projected, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal and attn_mask is None
        )
        attended = attended.transpose(1, 2).flatten(2)
        out = F.linear(attended, mha.out_proj.weight, mha.out_proj.bias)
        for slot, lora in self.adapters:
            if slot == "out":
                out = out + lora(attended).to(out.dtype)
        return out, None


class _MHAHandle:
    def __init__(self, mha: nn.MultiheadAttention, lora: LoRAModule) -> None:
        self.mha, self.lora = weakref.ref(mha), lora

    def remove(self) -> None:
        mha = self.mha()
        patch = getattr(mha, _MHAPatch.ATTR, None) if mha is not None else None
        if patch is not None:
            patch.detach(self.lora, mha)


@dataclass
class _Spec:
    """How one adapter is built: its target plus rank / alpha / dropout."""

    target: LoRATarget
    rank: int
    alpha: float
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)


class LoRANetwork(nn.ModuleDict):
    """The adapters of one LoRA, keyed by kohya module name (state_dict keys = kohya file keys).

    Holds no reference to the base model's modules as submodules: only hook handles, so its parameters
    are the adapters' alone and the base model's state_dict stays untouched.
    """

    def __init__(self, specs: Mapping[str, _Spec], config: Mapping[str, LoRAConfig]) -> None:
        super().__init__()
        self._targets: dict[str, LoRATarget] = {}
        for name, spec in specs.items():
            target = spec.target
            self[name] = LoRAModule(
                target.in_features, target.out_features, spec.rank, spec.alpha, spec.dropout, target.conv
            )
            self._targets[name] = target
        self._config = dict(config)
        self._handles: list[Any] = []
        self._model: weakref.ref | None = None
        self.scale = 1.0

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts this network adapts (`unet`, `text_encoder_<i>`)."""
        return tuple(sorted({t.part for t in self._targets.values()}))

    @property
    def config(self) -> dict[str, LoRAConfig]:
        return dict(self._config)

    @property
    def targets(self) -> dict[str, LoRATarget]:
        """kohya name -> target (part, module path, slot) of each adapter."""
        return dict(self._targets)

    def extra_repr(self) -> str:
        return f"{len(self)} adapters on {', '.join(self.parts)}, scale={self.scale}"

    def set_scale(self, scale: float) -> LoRANetwork:
        """The multiplier of every adapter of this network (0 turns it off, 1 = as trained)."""
        self.scale = float(scale)
        for module in self.values():
            module.multiplier = self.scale
        return self

    def attach(self, model: SDXL) -> LoRANetwork:
        """Hook every adapter into `model` (apply_lora does this); a network is attached to one model."""
        if self._handles:
            raise RuntimeError("this LoRA network is already applied; call remove() before applying it again")
        for name, target in self._targets.items():
            module = target.resolve(model)
            lora = self[name]
            if target.slot is None:
                self._handles.append(module.register_forward_hook(_hook(lora)))
            else:
                _MHAPatch.of(module).adapters.append((target.slot, lora))
                self._handles.append(_MHAHandle(module, lora))
        self._model = weakref.ref(model)
        _drop_stale_compiled_code(model)
        return self

    def remove(self) -> None:
        """Detach the hooks: the model computes as without this network again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model() if self._model is not None else None
        self._model = None
        if model is not None:
            _drop_stale_compiled_code(model)

    @torch.no_grad()
    def merge_into(self, model: SDXL, scale: float = 1.0) -> None:
        """Add `scale * alpha / rank * up @ down` into the base weights of `model` (q/k/v into the packed
        in_proj slices, LoCon deltas into the conv kernels). If `model` is the one this network is applied
        to, the network is removed afterwards so the deltas do not count twice."""
        for name, target in self._targets.items():
            module = target.resolve(model)
            delta = self[name].delta_weight() * scale
            if target.slot is None:
                weight = module.weight
            elif target.slot == "out":
                weight = module.out_proj.weight
            else:
                rows = module.embed_dim
                index = _SLOTS.index(target.slot)
                weight = module.in_proj_weight[index * rows : (index + 1) * rows]
            if delta.shape != weight.shape:
                raise ValueError(f"LoRA {name}: delta {list(delta.shape)} does not fit weight {list(weight.shape)}")
            weight.add_(delta.to(weight.device, weight.dtype))
        if self._model is not None and self._model() is model:
            self.remove()


def select_targets(targets: Iterable[LoRATarget], part: str, config: LoRAConfig) -> list[LoRATarget]:
    """The targets of `part` whose module path matches one of the config's patterns (re.search)."""
    patterns = [re.compile(p) for p in config.patterns(part)]
    return [t for t in targets if t.part == part and any(p.search(t.path) for p in patterns)]


def apply_lora(model: SDXL, parts: Mapping[str, LoRAConfig], scale: float = 1.0) -> LoRANetwork:
    """Build fresh adapters for the given parts (`unet`, `text_encoder_<i>`) and hook them into `model`.

    The base weights are not changed or frozen here (the caller freezes them); the returned network holds
    the only new parameters. Its train / eval mode (adapter dropout) is its own, as for any module: a
    LightningModule holding it switches it; for inference call `network.eval()`.
    """
    from sgm.checkpoint.kohya import lora_targets  # the kohya naming lives with the file format

    all_targets = lora_targets(model)
    known = sorted({t.part for t in all_targets.values()})
    unknown = [p for p in parts if p not in known]
    if unknown or not parts:
        raise ValueError(f"LoRA parts {unknown or list(parts)} are not in this model; choose from {known}")
    specs: dict[str, _Spec] = {}
    for part, config in parts.items():
        chosen = select_targets(all_targets.values(), part, config)
        if not chosen:
            raise ValueError(
                f"LoRA targets {config.targets!r} match no module of part '{part}'; use a preset "
                f"({', '.join(UNET_PRESETS if part == UNET else TEXT_PRESETS)}) or a regex over module paths"
            )
        for target in chosen:
            rank, alpha = config.rank_alpha(conv=target.conv is not None and target.conv[0] > 1)
            specs[target.name] = _Spec(target, rank, alpha, config.dropout)
    device = _device_of(model)
    network = LoRANetwork(specs, parts).to(device)
    return network.set_scale(scale).attach(model)


def _drop_stale_compiled_code(model: nn.Module) -> None:
    """Dynamo does not guard on the hooks of modules inside a compiled graph (skip_nnmodule_hook_guards):
    a UNet compiled in place (`unet.compile()`) would keep running without adapters added later. Clear
    dynamo's caches so the next call recompiles with the current hooks. (Compile after applying adapters
    to avoid the recompile; a model wrapped by `torch.compile(model)` cannot be detected here.)"""
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        torch._dynamo.reset()


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.unet.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
