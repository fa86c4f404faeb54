"""The LightningDataModule: one loader per rank (image or cached-latent shards), its state saved in every checkpoint.

Lightning's fit loop fetches one batch ahead of the step it trains, so the loader's own state at
save time is one batch past the last trained one. `TrackedLoader` records the loader state after
each batch it hands out, and the module says which batch was trained (`mark_trained`), so the
checkpoint holds the state right after the last trained batch: a resume trains the very next one.
The wrapper has no state_dict of its own, so Lightning leaves the loader's state to this module.

A resume on another number of readers (processes x loader workers) re-splits the saved position over
this run's readers when `reshard` (config `resume_reshard=true`; sgm/data/resplit.py states what is
guaranteed) and otherwise stops with a ConfigError naming that key. With `allow_changes`
(`resume_allow_changes=true`), a position saved under other data settings restarts its pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from sgm.data.loader import ReaderLayoutChanged, SlotLoader, merge_loader_states
from sgm.training.preflight import ConfigError
from sgm.training.progress import LOGGER


class TrackedLoader:
    """Iterates a SlotLoader, recording the state after each batch and the time spent waiting."""

    def __init__(self, loader: SlotLoader, history: int = 8) -> None:
        self.loader = loader
        self.history = history
        self.yielded = 0
        self.states: dict[int, dict[str, Any]] = {}
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - started
            self.yielded += 1
            self.states[self.yielded] = self.loader.state_dict()
            self.states.pop(self.yielded - self.history, None)
            yield batch

    def take_wait_seconds(self) -> float:
        """Seconds spent waiting for data since the last call (for the data-wait fraction)."""
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds


class SDXLDataModule(pl.LightningDataModule):
    """Builds the data partial (a SlotLoader config) with this rank's global_rank and world_size."""

    def __init__(self, loader: Callable[..., SlotLoader], reshard: bool = False, allow_changes: bool = False) -> None:
        super().__init__()
        self.make_loader = loader
        self.reshard, self.allow_changes = reshard, allow_changes
        self.tracked: TrackedLoader | None = None
        self.trained_batches = 0
        self._pending_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tracked is None:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            self.tracked = TrackedLoader(self.make_loader(rank=rank, world_size=world))
        self._apply_pending()

    def train_dataloader(self) -> TrackedLoader:
        if self.tracked is None:
            self.setup("fit")
        self._apply_pending()
        return self.tracked  # type: ignore[return-value]

    @property
    def loader(self) -> SlotLoader:
        if self.tracked is None:
            raise RuntimeError("the data module is not set up yet")
        return self.tracked.loader

    def mark_trained(self) -> None:
        """Called by the training module once per batch it trained (or skipped)."""
        self.trained_batches += 1

    def _local_state(self) -> dict[str, Any]:
        tracked = self.tracked
        if tracked is None:
            raise RuntimeError("the data module is not set up yet")
        if self.trained_batches == 0:  # nothing trained since the (re)start: the start state
            return tracked.loader.state_dict()
        if self.trained_batches not in tracked.states:
            raise RuntimeError(
                f"no loader state recorded for trained batch {self.trained_batches} "
                f"(handed out {tracked.yielded}); the fit loop ran further ahead than {tracked.history} batches"
            )
        return tracked.states[self.trained_batches]

    def state_dict(self) -> dict[str, Any]:
        """Every rank's loader state after its last trained batch, merged (a collective under DDP)."""
        local = self._local_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
            return {"loader": merge_loader_states(gathered)}
        return {"loader": merge_loader_states([local])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue each rank's stream right after the last batch trained before the checkpoint."""
        self._pending_state = state_dict["loader"]
        self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending_state is None or self.tracked is None:
            return
        loader, saved = self.tracked.loader, self._pending_state
        try:
            loader.load_state_dict(saved, on_mismatch="resplit" if self.reshard else "error")
        except ReaderLayoutChanged as error:
            raise ConfigError("resume_reshard", str(error)) from None
        except ValueError as error:
            if not self.allow_changes:
                raise ConfigError(
                    "resume", str(error).split(". ")[0], "resume_allow_changes=true restarts the data pass in progress"
                ) from None
            loader.load_state_dict(saved, on_mismatch="restart_epoch")  # data settings changed: restart the pass
            if self.trainer is None or self.trainer.global_rank == 0:
                LOGGER.warning("the data settings changed since the checkpoint: the data pass in progress restarts")
        report = loader.resplit_report
        if report and (self.trainer is None or self.trainer.global_rank == 0):
            LOGGER.info(
                f"data position re-split from {report['old_slots']} to {report['new_slots']} readers: "
                f"{report['leftover_samples']} sample(s) left in pass {report['epoch']} are trained once each; "
                f"{report['repeats']} sample(s) already trained from the next pass will be seen again"
            )
        self.tracked.yielded = 0
        self.tracked.states.clear()
        self.trained_batches = 0
        self._pending_state = None
