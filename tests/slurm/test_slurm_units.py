"""The SLURM pieces that need no cluster (part of the default suite): the preemption callback's step
boundary and rank agreement, a real preempt-then-resume in-process, the requeue command, the plugins
chosen under SLURM, the stage submitter's arguments, the sbatch template, and a local Hydra multirun."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from slurm_utils import REPO
from training_utils import compose_train, fast_overrides, make_shards, train_cli

from sgm.training.preemption import Preempted, RequeueOnSignal, requeue_slurm_job, slurm_callbacks, slurm_plugins
from sgm.training.run import run
from sgm.training.stages import STAGES, final_weights, stage_overrides


class StubTrainer:
    """What RequeueOnSignal touches of a Trainer; `any_rank_signalled` stands for the other ranks' flags."""

    def __init__(self, global_zero: bool = True, any_rank_signalled: bool = False) -> None:
        self.global_step = 0
        self.is_global_zero = global_zero
        self.saved: list[str] = []
        self.strategy = SimpleNamespace(reduce_boolean_decision=lambda flag, all: flag or any_rank_signalled)

    def save_checkpoint(self, path, weights_only: bool = False) -> None:
        self.saved.append(str(path))


def test_acts_only_at_an_optimizer_step_boundary_once_signalled(tmp_path):
    requeued = []
    callback = RequeueOnSignal(tmp_path / "requeue.ckpt", requeue=lambda: requeued.append(1) or "requeued")
    trainer = StubTrainer()
    callback.on_train_start(trainer, None)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, None)  # a step, no signal
    callback.signalled = True
    callback.on_train_batch_end(trainer, None)  # same global_step: mid gradient accumulation
    assert trainer.saved == [] and requeued == []
    trainer.global_step = 2
    with pytest.raises(Preempted, match="step 2"):
        callback.on_train_batch_end(trainer, None)
    assert trainer.saved == [str(tmp_path / "requeue.ckpt")] and requeued == [1]


def test_every_rank_saves_when_any_rank_got_the_signal_and_only_rank_zero_requeues(tmp_path):
    requeued = []
    callback = RequeueOnSignal(tmp_path / "requeue.ckpt", requeue=lambda: requeued.append(1) or "requeued")
    trainer = StubTrainer(global_zero=False, any_rank_signalled=True)  # this rank saw no signal itself
    callback.on_train_start(trainer, None)
    trainer.global_step = 1
    with pytest.raises(Preempted):
        callback.on_train_batch_end(trainer, None)
    assert trainer.saved and requeued == []


def test_the_signal_handler_only_sets_the_flag_and_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    callback = RequeueOnSignal(tmp_path / "requeue.ckpt")
    callback.setup(None, None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.signalled
    finally:
        callback.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before


class SignalAtStep(pl.Callback):
    """Sends this process the requeue signal when the given step begins (as SLURM would, mid-step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_preempted_run_stops_after_a_checkpoint_and_resume_auto_continues_from_it(tmp_path, capsys, caplog):
    shards = make_shards(tmp_path / "shards", num_samples=16, num_emoji=2, samples_per_shard=8)
    run_dir = tmp_path / "run"
    cfg = compose_train(fast_overrides(run_dir, shards, max_steps=4, every=4) + ["samples.at_train_end=false"])
    requeued = []
    preemption = RequeueOnSignal(run_dir / "checkpoints" / "requeue.ckpt", requeue=lambda: requeued.append(1) or "ok")
    assert run(cfg, extra_callbacks=[preemption, SignalAtStep(1)]) == {}  # stopped: nothing exported
    assert requeued == [1] and not (run_dir / "outputs.json").exists()
    state = torch.load(run_dir / "checkpoints" / "requeue.ckpt", weights_only=False)
    assert state["global_step"] == 2  # the step in flight when the signal came was finished first
    assert state["SDXLDataModule"]["loader"]["ranks"]  # the data position travels with it

    outputs = run(compose_train(fast_overrides(run_dir, shards, max_steps=4, every=4) + ["samples.at_train_end=false"]))
    said = capsys.readouterr().out + caplog.text  # the "sgm" logger's lines (pytest captures them)
    assert f"resuming from {run_dir / 'checkpoints' / 'requeue.ckpt'}" in said
    assert outputs["global_step"] == "4"


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An `scontrol` that records its arguments (SLURM itself is absent here)."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls"\necho "refused" >&2\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_requeue_names_the_job_or_the_array_task(tmp_path, monkeypatch):
    bin_dir = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm_job() == "job 42 requeued"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert requeue_slurm_job() == "job 40_1 requeued"
    assert (bin_dir / "calls").read_text().splitlines() == ["requeue 42", "requeue 40_1"]
    fake_scontrol(bin_dir, exit_code=1)
    assert requeue_slurm_job() == "scontrol requeue 40_1 failed (refused): resubmit the job to resume"


def test_under_slurm_lightnings_mid_step_requeue_is_replaced(tmp_path, monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_plugins() == [] and slurm_callbacks(tmp_path) == []
    monkeypatch.setenv("SLURM_NTASKS", "2")  # what srun sets for 2 tasks on one node
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "sgm")
    (environment,) = slurm_plugins()
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    (callback,) = slurm_callbacks(tmp_path)
    assert isinstance(callback, RequeueOnSignal) and callback.checkpoint_path == tmp_path / "checkpoints/requeue.ckpt"


def load_submit_stages():
    """slurm/submit_stages.py as a module (it is a script, not part of the package)."""
    spec = spec_from_file_location("submit_stages", REPO / "slurm" / "submit_stages.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_stages_splits_its_options_sbatch_options_and_overrides():
    module = load_submit_stages()
    root, options, overrides, stages = module.parse_arguments(
        ["--root", "r", "--time=1:00:00", "-p", "gpu", "--", "a=1"]
    )
    assert (root, options, overrides, stages) == (Path("r"), ["--time=1:00:00", "-p", "gpu"], ["a=1"], STAGES)
    assert module.parse_arguments(["--root=r", "--time=1:00:00", "a=1", "~b", "--stages=refiner"])[1:] == (
        ["--time=1:00:00"],
        ["a=1", "~b"],
        ("refiner",),
    )
    with pytest.raises(ValueError, match="stage runner sets"):  # stage_overrides refuses keys it owns
        module.submit_chain(Path("r"), ["run_dir=x"])


def fake_sbatch(folder: Path) -> Path:
    """An `sbatch` that records its arguments (one line per call) and answers job ids 101, 102, ... (no cluster
    needed; tests/slurm/test_slurm_jobs.py runs a real chain)."""
    folder.mkdir(exist_ok=True)
    script = folder / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{folder}/calls"\nexpr 100 + $(wc -l < "{folder}/calls")\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_submit_stages_holds_each_stage_until_the_one_before_ends_well(tmp_path, monkeypatch, capsys):
    bin_dir = fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SGM_JOB_ROOT", str(tmp_path / "logs"))
    module, root, extra = load_submit_stages(), tmp_path / "stages", ["trainer.max_steps=2"]
    assert module.main(["--root", str(root), "--", *extra]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{stage} {101 + i}" for i, stage in enumerate(STAGES)]
    calls = (bin_dir / "calls").read_text().splitlines()
    for number, (stage, call) in enumerate(zip(STAGES, calls)):
        assert f"--job-name=sgm-{stage} " in call and call.endswith(" ".join(stage_overrides(stage, root, extra)))
        dependency = [argument for argument in call.split() if argument.startswith("--dependency")]
        assert dependency == ([f"--dependency=afterok:{100 + number}"] if number else [])  # the previous job's id

    later = ["--root", str(root), "--stages", "multiaspect_1024,refiner"]  # resubmitting from a failed stage
    parent = final_weights("pretrain_512", root)
    (bin_dir / "calls").unlink()
    assert module.main(later) == 1 and not (bin_dir / "calls").exists()  # refused before any submission
    assert f"{parent}, which does not exist yet; add pretrain_512 to --stages" in capsys.readouterr().err
    parent.parent.mkdir(parents=True)
    parent.write_bytes(b"")
    assert module.main(later) == 0
    assert capsys.readouterr().out.splitlines() == ["multiaspect_1024 101", "refiner 102"]
    first, second = (bin_dir / "calls").read_text().splitlines()
    assert "--dependency" not in first and "--dependency=afterok:101 " in second
    assert f"pretrained={parent}" in first.split()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("pretrain_256,multiaspect_1024", "give consecutive stages in the order pretrain_256 -> pretrain_512"),
        ("pretrain_512,pretrain_256", "give consecutive stages"),
        ("pretrain_256,base_1024", r"unknown stage\(s\) \['base_1024'\]; the stages are pretrain_256"),
        ("", "no stage given"),
    ],
)
def test_submit_stages_refuses_a_selection_the_chain_cannot_run(tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        load_submit_stages().submit_chain(tmp_path, [], stages=tuple(s for s in stages.split(",") if s))


def test_sbatch_template_requeues_appends_and_signals_before_the_limit():
    template = (REPO / "slurm" / "train.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", template, flags=re.MULTILINE)
    assert {"--requeue", "--open-mode=append"} <= set(directives)
    assert any(re.fullmatch(r"--signal=USR1@\d+", d) for d in directives)  # what RequeueOnSignal listens for
    assert not any(d.startswith("--ntasks=") for d in directives)  # Lightning refuses --ntasks
    assert 'srun --kill-on-bad-exit=1 "$PYTHON" "$SGM_REPO/train.py"' in template and '"$@"' in template


def test_local_multirun_gives_each_sweep_point_its_own_run_dir(tmp_path):
    shards = make_shards(tmp_path / "shards", num_samples=16, num_emoji=2, samples_per_shard=8)
    run_dir = tmp_path / "sweep"
    overrides = fast_overrides(run_dir, shards, max_steps=1, every=1) + ["samples.at_train_end=false"]
    result = train_cli(["-m", "module.lr=1e-4,3e-4", *overrides], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for number, lr in enumerate((1e-4, 3e-4)):
        job_dir = run_dir / "multirun" / str(number)
        assert json.loads((job_dir / "outputs.json").read_text())["run_dir"] == str(job_dir)
        assert f"lr: {lr}" in (job_dir / "config.yaml").read_text()
    assert not (run_dir / "checkpoints").exists()  # nothing trained in the shared run_dir
