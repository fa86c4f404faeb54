"""Exponential moving average of the trained parameters: fp32, whole on every rank, whatever the strategy.

The EMA holds one fp32 tensor per trained parameter, under the parameter's module key
(`model.unet.input_blocks.0.0.weight`), so a checkpoint stores it as `ema.<module key>` beside the
trained weights, plus `ema.num_updates`. It is no module of the model: a strategy that casts or
shards the model's parameters leaves it alone (the training module carries it through state_dict,
load_state_dict and moves). Reading sharded weights goes through a `gather` function (the parallel
plan's `whole_parameters`): with sharded weights an update is a collective, call it on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

NamedTensors = list[tuple[str, Tensor]]
Gather = Callable[[NamedTensors], Iterator[NamedTensors]]
Params = nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]
NUM_UPDATES = "num_updates"


def whole(named: NamedTensors) -> Iterator[NamedTensors]:
    """The default gather: the weights are whole already, one chunk."""
    yield named


class EMA:
    """shadow <- d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)).

    The warmup (n = updates so far) is the official LitEma's: early averages follow the weights
    closely instead of being dominated by the random init. Only parameters are averaged; buffers stay
    the model's. `weights()` gives the average by key; `applied_to(model)` puts it in place for sampling.
    """

    def __init__(self, params: Params, decay: float = 0.9999) -> None:
        """`params`: the trained parameters by key (a mapping, (key, tensor) pairs, or a module's own names)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay} (module.ema_decay; null turns EMA off)")
        self.decay = float(decay)
        self.shadow: dict[str, Tensor] = {k: p.detach().to(torch.float32, copy=True) for k, p in _named(params)}
        self.num_updates = torch.tensor(0, dtype=torch.long)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params: Params, gather: Gather = whole) -> None:
        """Average the parameters into the shadow (once per optimizer step, on every rank)."""
        self._blend(params, 1.0 - self.current_decay(), gather)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, params: Params, gather: Gather = whole) -> None:
        """Restart the average at the current weights (EMA switched on for a run that had none)."""
        self._blend(params, 1.0, gather)
        self.num_updates.zero_()

    def _blend(self, params: Params, weight: float, gather: Gather) -> None:
        named = list(_named(params))
        keys = {k for k, _ in named}
        if keys != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - keys), sorted(keys - set(self.shadow))
            raise KeyError(f"the EMA averages other parameters: {missing[:3]} not given, {unexpected[:3]} not averaged")
        for chunk in gather(named):
            for key, param in chunk:
                target = self.shadow[key]
                target.lerp_(param.detach().to(device=target.device, dtype=target.dtype), weight)

    def weights(self) -> dict[str, Tensor]:
        """The averaged weights by module key (the EMA's own tensors: copy before changing them)."""
        return dict(self.shadow)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the averaged weights in place of `model`'s parameters (keys relative to `model`), restore on exit.

        The parameters take the EMA's tensors themselves (fp32, no copy): use the model for inference only."""
        originals = {}
        try:
            for key, average in self.shadow.items():
                param = model.get_parameter(key)
                originals[key] = param.data
                param.data = average.to(param.device)
            yield model
        finally:
            for key, data in originals.items():
                model.get_parameter(key).data = data

    # -- checkpoints and moves ------------------------------------------------------------------
    def state_dict(self, prefix: str = "", keep_vars: bool = False) -> dict[str, Tensor]:
        """`{prefix}<module key>` per averaged parameter, and `{prefix}num_updates`."""
        state = {f"{prefix}{key}": value for key, value in self.shadow.items()}
        state[f"{prefix}{NUM_UPDATES}"] = self.num_updates
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> None:
        """Restore from `state_dict()` (without prefix); strict: exactly the averaged parameters, no others."""
        state = dict(state)
        count = state.pop(NUM_UPDATES, None)
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if strict and (missing or unexpected or count is None):
            raise RuntimeError(
                f"the checkpoint's EMA does not fit the trained parameters: {len(missing)} missing {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}; resume with the run's module.trainable, or set "
                "module.ema_decay=null"
            )
        for key, value in state.items():
            if key in self.shadow:
                self.shadow[key].copy_(value)
        if count is not None:
            self.num_updates.copy_(count)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> EMA:
        """What nn.Module._apply does to buffers (.to, .cuda, .double), for the module to forward moves to."""
        self.shadow = {key: fn(value) for key, value in self.shadow.items()}
        self.num_updates = fn(self.num_updates)
        return self


def _named(params: Params) -> Iterator[tuple[str, Tensor]]:
    if isinstance(params, nn.Module):
        return iter(params.named_parameters())
    if isinstance(params, Mapping):
        return iter(params.items())
    return iter(params)
