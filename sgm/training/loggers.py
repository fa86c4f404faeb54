"""Loggers: wandb online when the user is logged in, offline otherwise, and saying which; a CSV
logger that keeps the metrics of a run's earlier attempts when it resumes."""

from __future__ import annotations

import csv
import netrc
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

WANDB_HOST = "api.wandb.ai"


def wandb_logged_in(environ: dict[str, str] | None = None, netrc_path: str | None = None) -> bool:
    """Whether wandb has credentials: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    path = netrc_path or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str = "auto", environ: dict[str, str] | None = None) -> str:
    """ "online" | "offline": an explicit mode wins, then WANDB_MODE, then whether the user is logged in."""
    environ = os.environ if environ is None else environ
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    if mode != "auto":
        return mode
    if environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return "offline"
    if environ.get("WANDB_MODE") == "online":
        return "online"
    return "online" if wandb_logged_in(environ) else "offline"


def wandb_logger(save_dir: str, project: str, name: str, mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A Lightning WandbLogger in the resolved mode (offline runs go to <save_dir>/wandb, `wandb sync` later)."""
    resolved = resolve_wandb_mode(mode)
    return WandbLogger(save_dir=save_dir, project=project, name=name, offline=resolved == "offline", **kwargs)


def describe_logger(logger: Any) -> str | None:
    """Where a logger's run went, in one line (None when it has no local trace)."""
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        where = getattr(run, "dir", None) or logger.save_dir
        if getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "mode", "") == "offline":
            return f"wandb offline run in {os.path.dirname(where)} (upload it: wandb sync {os.path.dirname(where)})"
        return f"wandb run {getattr(run, 'url', '') or ''} (local files in {where})"
    log_dir = getattr(logger, "log_dir", None)
    return str(log_dir) if log_dir else None


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it (same header logic)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger for `resume=auto` runs: a resumed run adds its rows to <save_dir>/<name>/metrics.csv
    instead of replacing the earlier attempts' rows (steps redone after a crash appear twice; the
    later row is the one that counts)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
