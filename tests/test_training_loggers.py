"""The wandb logger's mode: online only with credentials, offline otherwise; explicit settings win."""

from __future__ import annotations

import os

import pytest

from sgm.training.loggers import resolve_wandb_mode, wandb_logged_in


def write_netrc(path, host: str) -> str:
    path.write_text(f"machine {host}\n  login user\n  password 0123456789abcdef\n")
    os.chmod(path, 0o600)
    return str(path)


def test_logged_in_means_an_api_key_or_a_wandb_netrc_entry(tmp_path):
    assert wandb_logged_in({"WANDB_API_KEY": "k"}, netrc_path=str(tmp_path / "none"))
    assert not wandb_logged_in({}, netrc_path=str(tmp_path / "none"))
    assert wandb_logged_in({}, netrc_path=write_netrc(tmp_path / "wandb.netrc", "api.wandb.ai"))
    assert not wandb_logged_in({}, netrc_path=write_netrc(tmp_path / "other.netrc", "github.com"))
    (tmp_path / "broken.netrc").write_text("machine\n")
    assert not wandb_logged_in({}, netrc_path=str(tmp_path / "broken.netrc"))


def test_mode_auto_follows_wandb_mode_then_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc here
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "online"}) == "online"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    assert resolve_wandb_mode("online", {}) == "online"
    with pytest.raises(ValueError, match="logger.mode must be auto, online or offline"):
        resolve_wandb_mode("sometimes", {})


def test_csv_logger_of_a_resumed_run_keeps_the_earlier_rows(tmp_path):
    import csv

    from sgm.training.loggers import AppendingCSVLogger

    first = AppendingCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 1.0 - step / 10}, step=step)
    first.finalize("success")
    resumed = AppendingCSVLogger(save_dir=str(tmp_path), name="logs", version="")  # a new process, same run_dir
    resumed.log_metrics({"train/loss": 0.5}, step=3)
    resumed.log_metrics({"train/loss": 0.4, "train/lr": 1e-4}, step=4)  # a new column rewrites the header
    resumed.finalize("success")
    with open(tmp_path / "logs" / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["train/loss"] == "1.0" and rows[4]["train/lr"] == "0.0001"
