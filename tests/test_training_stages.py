"""The four stages: the runner, each stage starting from its parent's final weights, lineage.json,
fine-tuning from an official file by part; the stages also show the default logger (wandb) running offline."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import fresh_tiny_model
from omegaconf import OmegaConf
from safetensors.torch import load_file
from training_utils import REPO, compose_train, make_shards

from sgm.checkpoint.fingerprints import part_fingerprints
from sgm.checkpoint.io import (
    CheckpointMismatchError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from sgm.checkpoint.lineage import LineageError, read_lineage, write_lineage
from sgm.checkpoint.pretrained import load_pretrained
from sgm.models.build import build_model
from sgm.training.run import build_module, run
from sgm.training.stages import STAGES, final_weights, main, parent_of, stage_overrides

VAE = "first_stage_model."


def run_stages_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "sgm.training.stages", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The four tiny stages run once by the runner: (root, extra overrides, the runner's output).
    Two steps each (a checkpoint at the end): enough for EMA weights that differ from the raw ones."""
    shards = make_shards(tmp_path_factory.mktemp("shards"), num_samples=48, num_emoji=4, samples_per_shard=12)
    root = tmp_path_factory.mktemp("stages")
    extra = [
        "threads=1",
        f"data.shards={shards}/*.tar",
        f"demo_data.out={shards}",
        "trainer.max_steps=2",
        "checkpoint.every_n_train_steps=2",
    ]
    result = run_stages_cli(["--root", str(root), "--tiny", *extra])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, ["experiment=tiny_stages", *extra], result.stdout


def loaded_model(path, config: str = "tiny"):
    """A model holding every part of an official file (built with an unrelated seed first)."""
    torch.manual_seed(123)
    model = build_model(config)
    load_checkpoint(model, path)
    return model


def test_four_stages_run_in_sequence_each_from_its_parents_final_ema_weights(pipeline):
    root, _, stdout = pipeline
    starts = [stdout.index(f"stage {n}/4 {stage}: ") for n, stage in enumerate(STAGES, start=1)]
    assert starts == sorted(starts)
    for stage in STAGES:
        assert f"[sgm] {stage}: {root / stage}" in stdout  # the closing report says where each went
        (wandb_run,) = (root / stage / "wandb").glob("offline-run-*")  # the default logger, offline: no login here
        assert any(wandb_run.rglob("*.wandb"))
        assert f"wandb offline run in {wandb_run} (upload it: wandb sync {wandb_run})" in stdout
    for stage in STAGES[1:]:
        parent = parent_of(stage)
        lineage = read_lineage(root / stage)
        parent_file = final_weights(parent, root)
        assert lineage["parent"]["path"] == str(parent_file)
        assert lineage["parent"]["sha256"] == hashlib.sha256(parent_file.read_bytes()).hexdigest()
        assert lineage["parent"]["metadata"]["sgm.weights"] == "ema" == read_metadata(parent_file)["sgm.weights"]
        assert lineage["config"]["pretrained"] == str(parent_file)
        parent_model = loaded_model(parent_file)
        if stage != "refiner":  # the base stages start from the parent's exported (EMA) UNet
            assert lineage["weights_at_start"]["unet"] == part_fingerprints(parent_model)["unet"]
            raw = torch.load(root / parent / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            parent_model.unet.load_state_dict(
                {k[len("model.unet.") :]: v for k, v in raw.items() if k.startswith("model.unet.")}
            )
            assert lineage["weights_at_start"]["unet"] != part_fingerprints(parent_model)["unet"]  # EMA, not raw
    first = read_lineage(root / "pretrain_256")
    assert first["parent"] is None and first["resumes"] == []
    assert first["config"]["data"]["square_size"] == 32  # tiny_stages/pretrain_256: 1/8 of the paper's 256


def test_refiner_shares_the_base_latent_space_and_text_tower(pipeline):
    root, _, _ = pipeline
    base = read_lineage(root / "pretrain_256")["weights_at_start"]
    refiner = read_lineage(root / "refiner")
    assert refiner["parent"]["parts"] == ["text_encoders", "vae"]
    assert refiner["weights_at_start"]["vae"] == base["vae"]  # the VAE the first stage trained with
    assert refiner["weights_at_start"]["text_encoder_0"] == base["text_encoder_1"]  # bigG
    base_file = load_file(final_weights("multiaspect_1024", root))
    refiner_file = load_file(final_weights("refiner", root))
    vae_keys = [k for k in base_file if k.startswith(VAE)]
    assert vae_keys and all(torch.equal(refiner_file[k], base_file[k]) for k in vae_keys)
    loaded_model(final_weights("refiner", root), "tiny_refiner")  # an official-layout refiner file
    config = refiner["config"]
    assert config["module"]["loss"]["noise_level_sampler"]["t_max"] == 199
    assert config["model"]["unet"]["context_dim"] == 64 and config["data"]["default_aesthetic_score"] == 5.0
    multiaspect = read_lineage(root / "multiaspect_1024")["config"]
    assert multiaspect["module"]["loss"]["offset_noise_level"] == 0.05 and multiaspect["data"]["base_resolution"]


def test_rerun_skips_finished_stages_and_a_resumed_stage_keeps_its_lineage(pipeline, capsys, caplog):
    root, extra, _ = pipeline
    before = {stage: final_weights(stage, root).stat().st_mtime_ns for stage in STAGES}
    assert main(["--root", str(root), *extra]) == 0  # in-process: it must not start any training (sgm.train)
    rerun = capsys.readouterr().out
    assert rerun.count("finished, skipped") == 4 and "sgm.train" not in rerun
    assert before == {stage: final_weights(stage, root).stat().st_mtime_ns for stage in STAGES}

    original = read_lineage(root / "refiner")
    # train.py's run, in-process; CSV logs, so that no wandb run starts inside pytest
    run(compose_train(stage_overrides("refiner", root, [*extra, "trainer.max_steps=4", "logger=csv"])))
    assert "resuming from" in capsys.readouterr().out + caplog.text  # the "sgm" logger (pytest captures it)
    lineage = read_lineage(root / "refiner")
    assert {k: v for k, v in lineage.items() if k != "resumes"} == {k: v for k, v in original.items() if k != "resumes"}
    assert [r["checkpoint"] for r in lineage["resumes"]] == [str(root / "refiner" / "checkpoints" / "last.ckpt")]
    assert read_metadata(final_weights("refiner", root))["sgm.global_step"] == "4"


def test_stage_overrides_point_each_stage_at_its_parent(tmp_path):
    extra = ["experiment=tiny_stages", "pretrained=/released/base.safetensors", "pretrained_parts=[text_encoders,vae]"]
    first = stage_overrides("pretrain_256", tmp_path, extra)
    assert first == [
        "stage=pretrain_256",
        f"run_dir={tmp_path}/pretrain_256",
        "name=pretrain_256",
        "experiment=tiny_stages/pretrain_256",
        *extra[1:],
    ]
    refiner = stage_overrides("refiner", tmp_path, extra)
    assert refiner == [
        "stage=refiner",
        f"run_dir={tmp_path}/refiner",
        "name=refiner",
        f"pretrained={tmp_path}/multiaspect_1024/multiaspect_1024_full.safetensors",
        "experiment=tiny_stages/refiner",
    ]
    assert "~experiment" in stage_overrides("pretrain_512", tmp_path, ["data=webdataset"])  # not the demo preset
    assert stage_overrides("pretrain_512", tmp_path / "a b")[1] == f"run_dir='{tmp_path}/a b/pretrain_512'"
    for wrong in (["model=tiny"], ["name=x"], ["+run_dir=/x"]):
        with pytest.raises(ValueError, match="the stage runner sets"):
            stage_overrides("pretrain_512", tmp_path, wrong)
    with pytest.raises(ValueError, match="unknown stage 'base_256'; the stages are pretrain_256"):
        stage_overrides("base_256", tmp_path)


def test_print_overrides_prints_one_shell_quoted_line(tmp_path, capsys):
    extra = ["data.shards=/data/{00000..00009}.tar", "trainer.max_steps=10"]
    assert main(["--root", str(tmp_path), "--print-overrides", "pretrain_512", *extra]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and shlex.split(printed[0]) == stage_overrides("pretrain_512", tmp_path, extra)
    assert main(["--root", str(tmp_path), "--print-overrides", "refiner", "model=tiny"]) == 1
    assert "remove ['model=tiny']" in capsys.readouterr().err


@pytest.fixture
def official_files(tmp_path):
    """Official-layout tiny base and tiny refiner files with seeded (distinct) weights."""
    base = fresh_tiny_model(seed=1)
    torch.manual_seed(2)
    refiner = build_model("tiny_refiner")
    paths = (
        save_checkpoint(base, tmp_path / "base.safetensors"),
        save_checkpoint(refiner, tmp_path / "refiner.safetensors"),
    )
    return base, paths[0], paths[1]


def test_pretrained_parts_loads_only_the_unet_from_an_official_file(official_files, tmp_path):
    base, base_file, _ = official_files
    cfg = compose_train(
        [
            "experiment=tiny_cpu",
            "name=t",
            f"pretrained={base_file}",
            "pretrained_parts=[unet]",
            "seed=7",
            f"run_dir={tmp_path}",
        ]
    )
    module = build_module(cfg)
    same = [torch.equal(a, b) for a, b in zip(module.model.unet.state_dict().values(), base.unet.state_dict().values())]
    assert all(same)
    own = fresh_tiny_model(seed=7)  # the parts left out come from the config, built from cfg.seed
    assert part_fingerprints(module.model)["vae"] == part_fingerprints(own)["vae"] != part_fingerprints(base)["vae"]


def test_pretrained_file_that_does_not_fit_raises_one_clear_error(official_files, tmp_path):
    _, base_file, refiner_file = official_files
    with pytest.raises(
        CheckpointMismatchError,
        match=r"(?s)pretrained=.*refiner.safetensors with pretrained_parts=\['unet'\].*shape.*set pretrained_parts",
    ):
        load_pretrained(fresh_tiny_model(), refiner_file, ["unet"])
    with pytest.raises(CheckpointMismatchError, match="missing keys"):  # a refiner file has no CLIP-L tower
        load_pretrained(fresh_tiny_model(), refiner_file, ["text_encoders"])
    with pytest.raises(FileNotFoundError, match="pretrained=.*no such file"):
        load_pretrained(fresh_tiny_model(), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"pretrained_parts: unknown checkpoint part\(s\) \['unets'\]"):
        load_pretrained(fresh_tiny_model(), base_file, ["unets"])


def test_a_refiner_takes_the_vae_and_bigg_tower_of_a_base_file(official_files):
    base, base_file, _ = official_files
    torch.manual_seed(9)
    refiner = build_model("tiny_refiner")
    unet_before = part_fingerprints(refiner)["unet"]
    load_pretrained(refiner, base_file, ["text_encoders", "vae"])
    got, want = part_fingerprints(refiner), part_fingerprints(base)
    assert got["vae"] == want["vae"] and got["text_encoder_0"] == want["text_encoder_1"] and got["unet"] == unet_before


def test_resume_keeps_the_lineage_and_refuses_a_changed_parent(official_files, tmp_path):
    base, base_file, _ = official_files
    cfg = OmegaConf.create({"name": "child", "pretrained": str(base_file), "pretrained_parts": None, "seed": 0})
    run_dir = tmp_path / "child"
    write_lineage(cfg, run_dir, base, resumed_from=None)
    start = read_lineage(run_dir)
    assert start["weights_at_start"] == part_fingerprints(base)
    assert start["parent"]["parts"] == ["unet", "text_encoders", "vae"]  # pretrained_parts: null = all
    write_lineage(cfg, run_dir, base, resumed_from="step3.ckpt")
    again = read_lineage(run_dir)
    assert again["resumes"][0]["checkpoint"] == "step3.ckpt" and again["weights_at_start"] == start["weights_at_start"]
    save_checkpoint(fresh_tiny_model(seed=4), base_file)  # the parent's file is replaced
    with pytest.raises(LineageError, match="resumes with .*base.safetensors.*start this run afresh"):
        write_lineage(cfg, run_dir, base, resumed_from="step6.ckpt")
    assert json.loads((run_dir / "lineage.json").read_text()) == again  # left as it was
