"""The conditioner: routes batch keys to embedders and assembles SDXL's two conditioning tensors.

Each embedder reads one batch key. Its outputs are grouped by rank, in embedder order:
rank-3 outputs ([B, T, C]) are concatenated on the channel axis into the cross-attention
context (`crossattn`), rank-2 outputs ([B, D]) into the vector `y` (`vector`). For SDXL base this
gives crossattn [B, 77, 768 + 1280] and vector [pooled 1280 | original | crop | target] = 2816.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

CROSSATTN = "crossattn"
VECTOR = "vector"
_RANK_TO_KEY = {3: CROSSATTN, 2: VECTOR}


class FourierEmbedder(nn.Module):
    """Embeds each scalar of a [B, num_values] tensor as `outdim` sinusoids: [cos(v f) | sin(v f)].

    Frequencies f_i = exp(-ln(max_period) * i / (outdim / 2)), applied to raw pixel values, as the
    reference ConcatTimestepEmbedderND does for sizes, crops and the aesthetic score.
    """

    def __init__(self, num_values: int = 2, outdim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        if outdim % 2:
            raise ValueError(f"FourierEmbedder outdim must be even, got {outdim}")
        self.num_values = num_values
        self.outdim = outdim
        self.max_period = max_period
        self.output_dims = {VECTOR: num_values * outdim}

    def forward(self, values: Tensor | Sequence[Sequence[float]]) -> Tensor:
        values = torch.as_tensor(values)
        batch = values.shape[0]
        flat = values.reshape(batch, -1).to(torch.float32)
        if flat.shape[1] != self.num_values:
            raise ValueError(
                f"FourierEmbedder expected {self.num_values} value(s) per sample, got shape "
                f"{tuple(values.shape)}; check the batch key this embedder reads"
            )
        half = self.outdim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=flat.device) / half
        args = flat[..., None] * torch.exp(exponent)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return emb.reshape(batch, self.num_values * self.outdim)


class Conditioner(nn.Module):
    """Routes batch keys to embedders, applies classifier-free-guidance dropout, concatenates outputs.

    `embedders` is a list of mappings {module, input_key, ucg_rate}. `ucg_rate` zeroes that
    embedder's outputs per sample (the reference behaviour, one independent draw per embedder);
    `caption_dropout_rate` instead replaces the caption with "" for every text embedder at once,
    which is what most fine-tuners expect. Frozen embedders run under no_grad.
    """

    def __init__(
        self,
        embedders: Sequence[Mapping[str, Any]],
        caption_dropout_rate: float = 0.0,
        caption_key: str = "txt",
    ) -> None:
        super().__init__()
        modules, keys, rates = [], [], []
        for index, entry in enumerate(embedders):
            missing = {"module", "input_key"} - set(entry)
            if missing:
                raise ValueError(
                    f"conditioner embedder {index} lacks {sorted(missing)}; each entry needs "
                    "`module`, `input_key` and optionally `ucg_rate`"
                )
            rate = float(entry.get("ucg_rate", 0.0))
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"conditioner embedder {index}: ucg_rate must lie in [0, 1], got {rate}")
            modules.append(entry["module"])
            keys.append(str(entry["input_key"]))
            rates.append(rate)
        if not 0.0 <= caption_dropout_rate <= 1.0:
            raise ValueError(f"caption_dropout_rate must lie in [0, 1], got {caption_dropout_rate}")
        self.embedders = nn.ModuleList(modules)
        self.input_keys = keys
        self.ucg_rates = rates
        self.caption_dropout_rate = float(caption_dropout_rate)
        self.caption_key = caption_key

    @property
    def output_dims(self) -> dict[str, int]:
        """Total channels of the cross-attention context and of the vector."""
        dims = {CROSSATTN: 0, VECTOR: 0}
        for module in self.embedders:
            for key, dim in module.output_dims.items():
                dims[key] += dim
        return dims

    def forward(
        self,
        batch: Mapping[str, Any],
        apply_dropout: bool = False,
        zero_keys: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Encode a batch into {"crossattn", "vector"}.

        apply_dropout: draw the training-time CFG dropout (per embedder and caption level).
        zero_keys: input keys whose embeddings are zeroed outright (the reference's unconditional
        branch for SDXL base zeroes "txt").
        """
        batch = dict(batch)
        if apply_dropout and self.caption_dropout_rate > 0 and self.caption_key in batch:
            batch[self.caption_key] = self._drop_captions(batch[self.caption_key], generator)
        grouped: dict[str, list[Tensor]] = {CROSSATTN: [], VECTOR: []}
        for module, key, rate in zip(self.embedders, self.input_keys, self.ucg_rates):
            if key not in batch:
                raise KeyError(
                    f"conditioner needs batch key '{key}' for {type(module).__name__}; "
                    f"the batch has {sorted(batch)}"
                )
            outputs = self._embed(module, batch[key])
            for out in outputs:
                if key in zero_keys:
                    out = torch.zeros_like(out)
                elif apply_dropout and rate > 0:
                    out = out * self._keep_mask(out, rate, generator)
                if out.ndim not in _RANK_TO_KEY:
                    raise ValueError(f"{type(module).__name__} returned a rank-{out.ndim} tensor; expected 2 or 3")
                grouped[_RANK_TO_KEY[out.ndim]].append(out)
        return {name: torch.cat(parts, dim=-1) for name, parts in grouped.items() if parts}

    @staticmethod
    def _embed(module: nn.Module, value: Any) -> tuple[Tensor, ...]:
        frozen = not any(p.requires_grad for p in module.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = module(value)
        return out if isinstance(out, tuple) else (out,)

    @staticmethod
    def _keep_mask(out: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
        draw = torch.rand(out.shape[0], generator=generator, device="cpu").to(out.device)
        keep = (draw >= rate).to(out.dtype)
        return keep.reshape(-1, *([1] * (out.ndim - 1)))

    def _drop_captions(self, captions: Sequence[str], generator: torch.Generator | None) -> list[str]:
        draw = torch.rand(len(captions), generator=generator)
        return ["" if d < self.caption_dropout_rate else c for c, d in zip(captions, draw.tolist())]
