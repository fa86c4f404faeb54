"""Resuming a DeepSpeed ZeRO-2/3 checkpoint on another number of processes (data-parallel world size).

ZeRO partitions the optimizer state (ZeRO-3: the weights too) per rank, so a `.ckpt` directory loads
only on the world size that wrote it; DDP's `.ckpt` files load on any. `prepare_resharded` converts a
directory once into DeepSpeed's universal checkpoint (per-parameter fp32 master weights, Adam moments
and step; `deepspeed.checkpoint.ds_to_universal`) in the sibling folder `<name>.universal`, which
`newest_checkpoint` ignores; `use_universal_checkpoint(strategy)` makes the engine load it on any
world size, bit-exact, and restores what the engine leaves out there (the module's buffers and EMA).
Lightning's own entries (loops, callbacks, lr schedulers, the data module, `sgm_*`) pass through
unchanged: the data module's per-rank loader state still holds the saved world size's ranks.

Every rank may call `prepare_resharded` at once: one converts (into a temporary folder renamed into
place, under a lock directory kept alive by a heartbeat), the others wait for it; a finished folder
is reused while its source is unchanged. A lock whose heartbeat stopped (its process died) is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sgm.parallel.checkpoints import COMPLETE_MARKER, LATEST_UNIVERSAL, is_sharded_checkpoint, module_state_file

UNIVERSAL_SUFFIX = ".universal"
HEARTBEAT_S = 5.0  # how often a converting process touches its lock
STALE_S = 120.0  # a lock untouched this long (seen by the waiter's own clock) belongs to a dead process
_OPTIM_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(path: str | os.PathLike) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint directory was saved with (its optimizer shards);
    None for a `.ckpt` file, a universal folder or a directory holding no optimizer shards (weights only)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return None
    ranks = {int(m.group(1)) for f in _tag_dir(path).iterdir() if (m := _OPTIM_SHARD.search(f.name))}
    return len(ranks) or None


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `prepare_resharded` made (DeepSpeed's `latest_universal` tag file in it)."""
    return (Path(path) / LATEST_UNIVERSAL).is_file()


def universal_path(path: str | os.PathLike) -> Path:
    """Where `prepare_resharded` puts the universal form of checkpoint directory `path` (`last.ckpt` -> `last.universal`)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".ckpt") + UNIVERSAL_SUFFIX)


def prepare_resharded(
    path: str | os.PathLike, new_world_size: int, timeout_s: float = 4 * 3600.0, workers: int = 1
) -> Path:
    """What to resume from on `new_world_size` processes (pass it to `trainer.fit(ckpt_path=...)`).

    `path` itself when it loads there as it is (a `.ckpt` file, or a directory saved by as many ranks);
    else its universal form (`universal_path`), converted now unless an up-to-date one exists: then the
    strategy must load it with `use_universal_checkpoint` (or `DeepSpeedPlan.reshard_for_resume`, which
    does both). Safe to call on every rank at once; waits up to `timeout_s` for another rank converting.
    `workers` > 1 extracts that many ranks' shards in parallel processes (each holds one shard in memory).
    """
    path = Path(path)
    saved = saved_world_size(path)
    if saved is None or saved == new_world_size:
        return path
    target = universal_path(path)
    signature = _signature(path)
    deadline = time.monotonic() + timeout_s
    lock = target.with_name(target.name + ".lock")
    seen: tuple[int, float] | None = None  # (lock mtime, when this process first saw it)
    while True:
        if _complete(target, signature):
            return target
        if _try_lock(lock):
            try:
                with _heartbeat(lock):
                    if not _complete(target, signature):
                        _convert(path, target, signature, saved, workers)
                return target
            finally:
                shutil.rmtree(lock, ignore_errors=True)
        try:
            mtime = lock.stat().st_mtime_ns
        except FileNotFoundError:
            continue  # released just now: look again
        now = time.monotonic()
        if seen is None or seen[0] != mtime:
            seen = (mtime, now)
        elif now - seen[1] > STALE_S:  # no heartbeat: its owner died mid-conversion
            _break_lock(lock)
            seen = None
            continue
        if now > deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for another process converting {path} into {target} (lock {lock}); "
                "if no such process runs, delete the lock directory"
            )
        time.sleep(1.0)


def use_universal_checkpoint(strategy: Any) -> None:
    """Make a Lightning DeepSpeedStrategy (before `trainer.fit`) resume from a `prepare_resharded` folder.

    Sets DeepSpeed's `checkpoint.load_universal` (the engine then takes the optimizer partitions and
    master weights of its own world size from the per-parameter files, and the tag from
    `latest_universal`) and wraps `strategy.load_checkpoint` so that the module's non-parameter state
    (buffers, the EMA) is loaded too: the engine skips the module's state dict for a universal checkpoint.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        raise TypeError(f"use_universal_checkpoint needs a DeepSpeedStrategy, not {type(strategy).__name__}")
    strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    if getattr(strategy.load_checkpoint, "loads_universal", False):
        return
    stock = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not is_universal_checkpoint(checkpoint_path):
            raise ValueError(
                f"{checkpoint_path} is not a universal checkpoint (no {LATEST_UNIVERSAL} in it), but the strategy "
                "was set up to load one: pass what prepare_resharded returned"
            )
        client_state = stock(checkpoint_path, *args, **kwargs)
        load_module_extras(strategy.deepspeed_engine.module, checkpoint_path)
        return client_state

    load_checkpoint.loads_universal = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


def load_module_extras(module: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the saved module state except its parameters (buffers, the EMA's `ema.*` entries) from the
    DeepSpeed (or universal) checkpoint folder `path` into `module`; returns the keys loaded."""
    saved = torch.load(module_state_file(Path(path)), map_location="cpu", weights_only=False, mmap=True)
    parameters = {name for name, _ in module.named_parameters()}
    extras = {k: v for k, v in saved["module"].items() if k not in parameters}
    module.load_state_dict(extras, strict=False)
    return sorted(extras)


# -- conversion ---------------------------------------------------------------------------------
def _convert(source: Path, target: Path, signature: str, saved: int, workers: int) -> None:
    """`source` in universal form at `target`: built in a temporary sibling, then renamed into place."""
    from deepspeed.checkpoint import ds_to_universal

    tag = _tag(source)
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        args = argparse.Namespace(
            input_folder=str(source / tag),
            output_folder=str(tmp / tag),  # and `latest_universal` (= tag) next to it
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # the version record Megatron writes; plain engines do not
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
            ds_to_universal.main(args)
        for folder in (tmp / tag / "zero").iterdir():  # module entries that are no optimizer parameter (the EMA,
            if folder.is_dir() and not (folder / "exp_avg.pt").is_file():  # buffers) were written as fp32.pt too:
                shutil.rmtree(folder)  # they come from the module state instead (load_module_extras)
        record = {"source": str(source), "signature": signature, "saved_world_size": saved}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record) + "\n")
        if target.exists():  # an outdated conversion (the source was saved again since)
            stale = target.with_name(f"{target.name}.stale-{uuid.uuid4().hex[:8]}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _signature(path: Path) -> str:
    """What identifies one save of `path` (its shards' names, sizes and times): a rewrite changes it."""
    digest = hashlib.sha256()
    for file in sorted(_tag_dir(path).iterdir()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _complete(target: Path, signature: str) -> bool:
    try:
        return json.loads((target / COMPLETE_MARKER).read_text())["signature"] == signature
    except (OSError, ValueError, KeyError):
        return False


def _try_lock(lock: Path) -> bool:
    try:
        lock.mkdir()  # atomic, also on network file systems
    except FileExistsError:
        return False
    (lock / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _break_lock(lock: Path) -> None:
    stale = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):  # another waiter broke it first
        lock.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _heartbeat(lock: Path) -> Iterator[None]:
    """Touch `lock` every HEARTBEAT_S seconds while the block runs, so waiters know its owner lives."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(lock)

    thread = threading.Thread(target=beat, name="sgm-reshard-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _tag(path: Path) -> str:
    return (path / "latest").read_text().strip()


def _tag_dir(path: Path) -> Path:
    return path / _tag(path)
