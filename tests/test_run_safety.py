"""Runs are safe to get wrong: settings and data are checked before a run writes anything (a failed run
leaves an existing run byte-identical), a real run cannot inherit the demo, a resume with other settings
says what differs; and training prints progress lines to the console and train.log (issue 13, items 5-6)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from training_utils import compose_train, fast_overrides, make_shards, train_cli

from sgm.training.preflight import ConfigError, check_config, check_resume
from sgm.training.progress import attach_log_file, detach_log_file, format_duration, progress_interval

STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=16, num_emoji=2, samples_per_shard=8)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A real tiny run, trained once through train.py: (run_dir, its overrides, the CompletedProcess)."""
    run_dir = tmp_path_factory.mktemp("existing") / "run"
    overrides = fast_overrides(run_dir, shards, max_steps=STEPS, every=STEPS) + ["samples.at_train_end=false"]
    result = train_cli(overrides)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir, overrides, result


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: relative path -> sha256 of its bytes ('dir' for folders)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def test_a_run_prints_progress_lines_to_the_console_and_train_log(trained):
    run_dir, _, result = trained
    lines = [line for line in result.stdout.splitlines() if line.startswith("[sgm] step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"[sgm] step {n}/{STEPS}" for n in range(1, STEPS + 1)]
    assert " | loss " in lines[0] and " | lr " in lines[0]
    assert all(key in lines[-1] for key in (" img/s", " | data-wait ", "% | ETA 0s"))
    log = (run_dir / "train.log").read_text()
    assert f"[sgm] step {STEPS}/{STEPS} | loss" in log and "Traceback" not in log
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "config.yaml").is_file()


FAILED_RUNS = {  # overrides on top of the trained run's -> the message's start, and what it must name
    "bad batch size": (["data.batch_size=-1"], "data.batch_size: must be an integer >= 1", "data.batch_size="),
    "shards matching nothing": (
        ["demo_data=null", "data.shards=/nonexistent/shards/*.tar"],
        "data.shards: ",
        "matches no file",
    ),
    "a real run on the demo": (["experiment=demo", "model=tiny"], "experiment: the demo experiment", "~experiment"),
    "own data on the demo": (
        ["experiment=demo", "demo_data.out=/elsewhere"],
        "experiment: the demo experiment",
        "~experiment",
    ),
    "a resume with other settings": (["module.lr=1e-3"], "resume: ", "module.lr: 0.0003 -> 0.001"),
}


@pytest.mark.parametrize("case", sorted(FAILED_RUNS))
def test_a_failed_run_leaves_the_existing_run_byte_identical(trained, case):
    run_dir, overrides, _ = trained
    extra, start, named = FAILED_RUNS[case]
    before = tree(run_dir)
    if any(o.startswith("experiment=") for o in extra):  # the demo's cases: the run's tiny_cpu replaced by the demo
        overrides = [o for o in overrides if not o.startswith("experiment=")]
    result = train_cli(overrides + extra)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"[sgm] error: {start}" in result.stderr and named in result.stderr and "Fix: " in result.stderr
    assert "Traceback" not in output
    assert tree(run_dir) == before  # nothing written: no config.yaml, lineage, .hydra/, wandb/, logs


def test_a_run_without_the_demo_needs_its_own_name(trained):
    run_dir, overrides, _ = trained
    before = tree(run_dir)
    own = [o for o in overrides if not o.startswith(("run_dir=", "name=", "demo_data."))]  # no demo_data without it
    result = train_cli([*own, "~experiment", "model=tiny", "data=demo"])
    assert result.returncode == 2 and "[sgm] error: name: not set. Fix: name=<run>" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr and tree(run_dir) == before


def test_rerunning_a_finished_run_trains_nothing_and_writes_nothing(trained):
    run_dir, overrides, _ = trained
    before = tree(run_dir)
    result = train_cli(overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"already trained to step {STEPS}" in result.stdout and "[sgm] step " not in result.stdout
    assert tree(run_dir) == before


def test_check_config_names_key_and_fix(tmp_path, shards):
    base = fast_overrides(tmp_path / "run", shards)
    for extra, key in (
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["module.lr=-1"], "module.lr"),
        (["module.optimizer=lion"], "module.optimizer"),
        (["module.ema_decay=1.5"], "module.ema_decay"),
        (["pretrained=/no/such.safetensors"], "pretrained"),
        (["resume=/no/such.ckpt"], "resume"),
        (["progress.every_n_steps=-1"], "progress.every_n_steps"),
    ):
        with pytest.raises(ConfigError) as raised:
            check_config(compose_train(base + extra))
        assert raised.value.key == key and raised.value.fix
    with pytest.raises(ConfigError, match="data.shards: not set"):
        check_config(compose_train(["experiment=finetune_24gb", "model=tiny"]))
    check_config(compose_train(base))
    check_config(compose_train(base + ["model=tiny"]))  # composed in code: the demo rule is the command line's
    with pytest.raises(ConfigError, match="~experiment"):
        check_config(compose_train(base + ["model=tiny"]), ["model=tiny"], {"experiment": "demo"})
    own = [o for o in base if not o.startswith("demo_data.")] + ["~experiment", "model=tiny"]
    check_config(compose_train(own), own, {})


def test_resume_check_lists_what_changed_and_allows_what_may_change(tmp_path, shards):
    base = fast_overrides(tmp_path / "run", shards)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(base), resolve=True))
    free = [
        "trainer.max_steps=99",
        "threads=2",
        "logger=csv",
        "samples.num_steps=9",
        "checkpoint.every_n_train_steps=3",
        "data.num_workers=1",
        "progress.every_n_steps=5",
        "trainer.devices=2",
    ]
    check_resume(compose_train(base + free), str(checkpoint))
    with pytest.raises(ConfigError) as raised:
        check_resume(
            compose_train(base + ["seed=3", "data.batch_size=2", "model.unet.model_channels=16"]), str(checkpoint)
        )
    message = str(raised.value)
    assert "seed: 0 -> 3" in message and "data.batch_size: 4 -> 2" in message and "model.unet.model_channels" in message
    assert "name=<new run>" in message and "resume_allow_changes=true" in message
    check_resume(compose_train(base + ["seed=3", "resume_allow_changes=true"]), str(checkpoint))
    check_resume(compose_train(base + ["seed=3"]), None)  # a fresh start compares nothing


def test_progress_interval_and_durations():
    assert [progress_interval("auto", n) for n in (1, 4, 200, 1000, 10**6)] == [1, 1, 20, 50, 50]
    assert progress_interval(0, 100) == 0 and progress_interval(7, 100) == 7
    assert [format_duration(s) for s in (0.4, 42, 187, 3900)] == ["0s", "42s", "3m07s", "1h05m"]


def test_train_log_is_not_written_twice_when_stdout_already_goes_there(tmp_path, monkeypatch):
    log = tmp_path / "train.log"
    with open(log, "a") as stream:  # as the conditioning study runs train.py: stdout into <run_dir>/train.log
        monkeypatch.setattr("sys.stdout", stream)
        assert attach_log_file(log) is None
    monkeypatch.undo()
    handler = attach_log_file(tmp_path / "other.log")
    try:
        assert handler is not None
    finally:
        detach_log_file(handler)
