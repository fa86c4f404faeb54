"""The UNet's optimizer, by name: the memory a full fine-tune needs is mostly optimizer state.

- `adamw`: torch AdamW, two fp32 moments (8 bytes per parameter); the fused kernel on CUDA.
- `adafactor`: torch.optim.Adafactor. No first moment; the second moment of a >=2-D tensor is
  kept as a row and a column factor over its LAST TWO dims (for a [out, in] Linear: out + in
  values instead of out x in; for a 3x3 conv [out, in, 3, 3] it factors the 3x3 kernel, so it
  still keeps 6 of every 9 values). Semantics differ from AdamW: `lr` is the cap of a
  *relative* step size, min(lr, 1/sqrt(t)), multiplied by each tensor's RMS (floor 1e-3), and
  updates are RMS-clipped to `d`; so per-element steps are about lr x RMS(weight), far smaller
  than AdamW's lr. Weight decay is decoupled: w <- w (1 - lr wd). `betas` and `eps` of the
  module do not apply; pass `beta2_decay`, `eps` (eps1, eps2) or `d` via `optimizer_kwargs`.
  The default for-loop implementation is kept (foreach would cost about one more copy of
  the parameters in temporaries).
- `adamw8bit`: bitsandbytes' AdamW8bit (optional extra): both moments in uint8 with one fp32
  scale per 256 values (about 2.03 bytes per parameter); tensors under 4,096 values stay fp32.
- strategy-bound optimizers (`sgm.parallel.optimizers`): `deepspeed_cpu_adam`, DeepSpeed's CPU
  AdamW for ZeRO optimizer offload (`strategy=deepspeed_zero2_offload`: the fp32 master weights and
  both moments live in host memory). The module asks its parallel plan whether they apply.

`state_bytes_per_tensor` gives each optimizer's state size for a parameter shape (what the
memory estimate uses); tests check it against the real optimizers' state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sgm.parallel.optimizers import STRATEGY_OPTIMIZERS

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", *STRATEGY_OPTIMIZERS)
BNB_BLOCK_SIZE = 256  # values per fp32 absmax scale in bitsandbytes' blockwise 8-bit state
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' state in fp32
STEP_BYTES = 4  # torch's per-parameter `step` counter is a float32 scalar tensor


def check_optimizer_name(name: str) -> None:
    """Fail at config time, not at the first training step, on an unknown optimizer name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}' (module.optimizer); choose one of: {', '.join(OPTIMIZERS)}")


def build_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    *,
    device_type: str = "cpu",
    extra: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (tensors, or parameter groups whose own `lr` / `weight_decay` override
    these); `extra` holds further constructor arguments (e.g. Adafactor's `d`)."""
    check_optimizer_name(name)
    kwargs = {key: _plain(value) for key, value in (extra or {}).items()}
    params = list(params)
    if name == "adafactor":
        factory: Any = torch.optim.Adafactor
        kwargs = {"lr": lr, "weight_decay": weight_decay, **kwargs}
    else:
        factory = _adam_factory(name)
        kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, **kwargs}
        if name == "adamw" and device_type == "cuda":
            kwargs.setdefault("fused", True)
        for key, value in (STRATEGY_OPTIMIZERS[name].defaults if name in STRATEGY_OPTIMIZERS else {}).items():
            kwargs.setdefault(key, value)
    try:
        return factory(params, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"optimizer '{name}' rejected its arguments ({error}); check module.optimizer_kwargs"
        ) from None


def _adam_factory(name: str) -> Any:
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError(
                "module.optimizer=adamw8bit needs bitsandbytes, an optional extra: pip install bitsandbytes "
                "(or pip install -e '.[bnb]'); or choose module.optimizer=adafactor or adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit
    return STRATEGY_OPTIMIZERS[name].load()


def _plain(value: Any) -> Any:
    """YAML lists (e.g. Adafactor's eps pair) arrive as list-likes; optimizers expect tuples."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def state_bytes_per_tensor(name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of optimizer state one parameter of `shape` and `dtype` gets (shared lookup tables excluded)."""
    check_optimizer_name(name)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if name == "adamw":
        return 2 * numel * itemsize + STEP_BYTES
    if name in STRATEGY_OPTIMIZERS:
        return STRATEGY_OPTIMIZERS[name].state_bytes_per_value * numel
    if name == "adafactor":
        # a >=2-D tensor: a row factor [..., n, 1] + a column factor [..., 1, m]; a vector: one value each
        values = numel // shape[-1] + numel // shape[-2] if len(shape) > 1 else numel
        return values * itemsize + STEP_BYTES
    if numel < BNB_MIN_8BIT_SIZE:  # adamw8bit, step kept as a Python int
        return 2 * numel * 4
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK_SIZE)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state tensors, each storage counted once (bitsandbytes shares its qmaps)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                seen[(value.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
