"""The conditioner: routes batch keys to embedders and assembles SDXL's two conditioning tensors.

Each embedder reads one batch key. Its outputs are grouped by rank, in embedder order:
rank-3 outputs ([B, T, C]) are concatenated on the channel axis into the cross-attention
context (`crossattn`), rank-2 outputs ([B, D]) into the vector `y` (`vector`). For SDXL base this
gives crossattn [B, 77, 768 + 1280] and vector [pooled 1280 | original | crop | target] = 2816.

Precomputed embeddings (cached latents, see sgm/data/latent_cache.py): a batch may carry
`cached_embeddings` = {embedder index: tuple of that embedder's outputs, batched}, exactly what
`embedder_outputs(index, value)` returns (e.g. CLIP-L: ([B, 77, 768],), bigG: ([B, 77, 1280],
[B, 1280])). Those embedders are not run and their input key may be absent; everything after
them (ucg zeroing, zero_keys, grouping) is the same, so cached == computed. Caption dropout
replaces a dropped sample's cached outputs by the empty caption's, which the conditioner embeds
once per embedder at first use (the text encoders' weights must be loaded then) or takes from
`set_empty_caption_outputs` (the cache tool stores them), so it equals dropping to "" live.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

CROSSATTN = "crossattn"
VECTOR = "vector"
CACHED_EMBEDDINGS = "cached_embeddings"
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
        self.grad_through: set[int] = set()  # frozen embedders that gradients pass through (LoRA adapters in them)
        self.input_keys = keys
        self.ucg_rates = rates
        self.caption_dropout_rate = float(caption_dropout_rate)
        self.caption_key = caption_key
        self._empty_caption: dict[int, tuple[Tensor, ...]] = {}  # embedder index -> outputs for ""

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
        cached = self._cached_outputs(batch.pop(CACHED_EMBEDDINGS, None))
        dropped = self._caption_drops(batch, cached, generator) if apply_dropout else None
        if dropped is not None and self.caption_key in batch:
            batch[self.caption_key] = ["" if drop else c for c, drop in zip(batch[self.caption_key], dropped)]
        grouped: dict[str, list[Tensor]] = {CROSSATTN: [], VECTOR: []}
        for index, (module, key, rate) in enumerate(zip(self.embedders, self.input_keys, self.ucg_rates)):
            if index in cached:
                outputs = cached[index]
                if dropped is not None and key == self.caption_key and any(dropped):
                    outputs = self._with_empty_caption(index, outputs, dropped)
            elif key not in batch:
                raise KeyError(
                    f"conditioner needs batch key '{key}' for {type(module).__name__}; the batch has {sorted(batch)}"
                )
            else:
                outputs = self._embed(module, batch[key], index in self.grad_through)
            for out in outputs:
                if key in zero_keys:
                    out = torch.zeros_like(out)
                elif apply_dropout and rate > 0:
                    out = out * self._keep_mask(out, rate, generator)
                if out.ndim not in _RANK_TO_KEY:
                    raise ValueError(f"{type(module).__name__} returned a rank-{out.ndim} tensor; expected 2 or 3")
                grouped[_RANK_TO_KEY[out.ndim]].append(out)
        return {name: torch.cat(parts, dim=-1) for name, parts in grouped.items() if parts}

    def _caption_drops(
        self, batch: Mapping[str, Any], cached: Mapping[int, tuple[Tensor, ...]], generator: torch.Generator | None
    ) -> list[bool] | None:
        """Which samples lose their caption (one draw per sample), or None without caption dropout."""
        caption_cached = any(self.input_keys[i] == self.caption_key for i in cached)
        if self.caption_dropout_rate <= 0 or not (self.caption_key in batch or caption_cached):
            return None
        size = len(batch[self.caption_key]) if self.caption_key in batch else next(iter(cached.values()))[0].shape[0]
        return [d < self.caption_dropout_rate for d in torch.rand(size, generator=generator).tolist()]

    # -- precomputed embeddings ----------------------------------------------------------------
    def text_embedder_indices(self) -> list[int]:
        """Indices of the embedders that read the caption: the ones worth caching."""
        return [i for i, key in enumerate(self.input_keys) if key == self.caption_key]

    def embedder_outputs(self, index: int, value: Any) -> tuple[Tensor, ...]:
        """What embedder `index` returns for one batch value, without dropout: what a cache stores."""
        return self._embed(self.embedders[index], value)

    def set_empty_caption_outputs(self, outputs: Mapping[int, Sequence[Tensor]]) -> None:
        """The outputs for "" per embedder index (unbatched, e.g. ([77, C], [D])), for caption dropout
        with cached embeddings when the text encoders are not loaded."""
        for index, parts in outputs.items():
            index = self._embedder_index(index)
            self._check_outputs(index, tuple(p.unsqueeze(0) for p in parts), 1)
            self._empty_caption[index] = tuple(p.detach() for p in parts)

    def _embedder_index(self, index: Any) -> int:
        if not str(index).isdigit() or int(index) >= len(self.embedders):
            raise KeyError(
                f"{CACHED_EMBEDDINGS} names embedder {index!r}, but this conditioner has embedders "
                f"0..{len(self.embedders) - 1}; the cache was made for another model config"
            )
        return int(index)

    def _cached_outputs(self, cached: Mapping[Any, Any] | None) -> dict[int, tuple[Tensor, ...]]:
        if not cached:
            return {}
        out = {}
        size = None
        for index, parts in cached.items():
            index = self._embedder_index(index)
            parts = tuple(parts) if isinstance(parts, (tuple, list)) else (parts,)
            size = parts[0].shape[0] if size is None else size
            self._check_outputs(index, parts, size)
            params = list(self.embedders[index].parameters())
            dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
            out[index] = tuple(p.to(dtype) for p in parts)
        return out

    def _check_outputs(self, index: int, parts: tuple[Tensor, ...], size: int) -> None:
        """Cached outputs must look like the embedder's: one tensor per output, same channels."""
        module = self.embedders[index]
        dims = dict(module.output_dims)
        found = [tuple(p.shape) for p in parts]
        ok = len(parts) == len(dims) and all(
            p.ndim in _RANK_TO_KEY and p.shape[0] == size and dims.get(_RANK_TO_KEY[p.ndim]) == p.shape[-1]
            for p in parts
        )
        if not ok:
            raise ValueError(
                f"{CACHED_EMBEDDINGS}[{index}] for {type(module).__name__} has shapes {found}; expected one "
                f"tensor per output {dims} (crossattn [B, T, C], vector [B, D]) for a batch of {size}. "
                "The cache was made with another model config: re-cache the text embeddings with this one."
            )

    def _with_empty_caption(self, index: int, outputs: tuple[Tensor, ...], dropped: list[bool]) -> tuple[Tensor, ...]:
        """Cached outputs with the dropped samples' rows replaced by the empty caption's."""
        if index not in self._empty_caption:
            module = self.embedders[index]
            if any(p.device.type == "meta" for p in module.parameters()):
                raise RuntimeError(
                    f"caption dropout with cached text embeddings needs embedder {index}'s outputs for the "
                    "empty caption, but its weights are not loaded (meta device). Load the text encoders, call "
                    "conditioner.set_empty_caption_outputs(...) with the cache's empty caption, or use "
                    "ucg_rate (zeroing) instead of caption_dropout_rate."
                )
            self._empty_caption[index] = tuple(o[0].detach() for o in self._embed(module, [""]))
        mask = torch.tensor(dropped, device=outputs[0].device)
        return tuple(
            torch.where(mask.view(-1, *[1] * (out.ndim - 1)), empty.to(out.device, out.dtype), out)
            for out, empty in zip(outputs, self._empty_caption[index])
        )

    @staticmethod
    def _embed(module: nn.Module, value: Any, grad_through: bool = False) -> tuple[Tensor, ...]:
        """Run an embedder; one whose weights are all frozen runs without autograd unless gradients must pass
        through it (`grad_through`: adapters hooked into it train)."""
        frozen = not grad_through and not any(p.requires_grad for p in module.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = module(value)
        return out if isinstance(out, tuple) else (out,)

    @staticmethod
    def _keep_mask(out: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
        draw = torch.rand(out.shape[0], generator=generator, device="cpu").to(out.device)
        keep = (draw >= rate).to(out.dtype)
        return keep.reshape(-1, *([1] * (out.ndim - 1)))
