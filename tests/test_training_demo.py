"""The demo shows that training works (issue 16, item 5): its held-out set, its VAE trained once and reused (keyed
by what it depends on, written atomically), and a shortened `python train.py` whose CSV metrics hold a falling
val/loss, whose lineage names the trained VAE, and whose resume keeps that VAE."""

from __future__ import annotations

import csv
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from training_utils import compose_train, train_cli

from sgm.checkpoint.io import read_metadata
from sgm.checkpoint.lineage import read_lineage
from sgm.checkpoint.model_source import load_model
from sgm.checkpoint.pretrained import load_pretrained
from sgm.data.demo_dataset import VAL_FOLDER, build_demo_dataset
from sgm.models.build import build_model
from sgm.training.demo_vae import demo_vae_key, ensure_vae, training_config, vae_settings
from sgm.training.preflight import ConfigError
from sgm.training.run import ensure_demo_data, ensure_demo_vae

TINY_VAE = {"steps": 1, "patch_size": 16, "batch_size": 2, "scale_batches": 1}


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    build_demo_dataset(out, num_samples=8, num_emoji=2, samples_per_shard=8)  # as built before a held-out set
    return out


def test_the_held_out_set_is_added_beside_existing_shards_with_other_images(demo_data, tmp_path):
    data = shutil.copytree(demo_data, tmp_path / "data")
    before = {p.name: p.read_bytes() for p in data.glob("*.tar")}
    spec = {"out": str(data), "num_samples": 8, "num_emoji": 2, "samples_per_shard": 8, "val_samples": 4}
    ensure_demo_data(OmegaConf.create({"demo_data": spec}))
    assert {p.name: p.read_bytes() for p in data.glob("*.tar")} == before  # the training shards untouched
    val = sorted((data / VAL_FOLDER).glob("*.tar"))
    assert [p.name for p in val] == ["00000.tar"] and not set(data.glob("*.tar")) & set(val)  # outside <out>/*.tar
    train, held = tar_members(data / "00000.tar"), tar_members(val[0])
    names = {json.loads(v)["emoji_name"] for k, v in train.items() if k.endswith(".json")}
    held_names = [json.loads(v)["emoji_name"] for k, v in held.items() if k.endswith(".json")]
    assert len(held_names) == 4 and set(held_names) == names  # the same vocabulary ...
    images = {v for k, v in train.items() if k.endswith((".png", ".jpg"))}
    assert not images & {v for k, v in held.items() if k.endswith((".png", ".jpg"))}  # ... in other images
    ensure_demo_data(OmegaConf.create({"demo_data": {**spec, "val_samples": 6}}))  # another size: built anew
    assert json.loads((data / VAL_FOLDER / "_build_summary.json").read_text())["written"] == 6


def vae_run_config_overrides(data: Path) -> list[str]:
    """The demo experiment on `data` at 32 px squares: what the demo VAE trains on, shrunk."""
    return [
        f"demo_data.out={data}",
        f"data.shards={data}/*.tar",
        "data.base_resolution=null",
        "data.square_size=32",
        "data.num_workers=0",
        "threads=1",
    ]


def vae_run_config(data: Path):
    return compose_train(vae_run_config_overrides(data))


def test_the_demo_vae_is_trained_once_reused_and_retrained_when_its_key_changes(demo_data, tmp_path):
    cfg = vae_run_config(demo_data)
    spec = {"out": str(tmp_path / "vae"), **TINY_VAE}
    first = ensure_vae(cfg, spec)
    assert first.trained_now and first.path.parent == tmp_path / "vae" and first.scale_factor > 0
    assert float(read_metadata(first.path)["sgm.scale_factor"]) == first.scale_factor
    written = first.path.stat().st_mtime_ns
    again = ensure_vae(cfg, spec)
    assert not again.trained_now and (again.path, again.scale_factor) == (first.path, first.scale_factor)
    assert first.path.stat().st_mtime_ns == written  # reused, not rewritten
    # what the key depends on: the settings, the data config, the model's VAE config, the shards' bytes
    settings = vae_settings(spec)
    key = demo_vae_key(training_config(cfg, spec), settings)
    assert demo_vae_key(training_config(cfg, {**spec, "lr": 1e-3}), vae_settings({**spec, "lr": 1e-3})) != key
    assert demo_vae_key(training_config(cfg, {**spec, "batch_size": 3}), settings) != key
    other_model = compose_train([*vae_run_config_overrides(demo_data), "model.vae.ch=8"])
    assert demo_vae_key(training_config(other_model, spec), settings) != key
    changed = shutil.copytree(demo_data, tmp_path / "changed")
    with open(changed / "00000.tar", "ab") as shard:
        shard.write(b"\0" * 512)
    assert demo_vae_key(training_config(vae_run_config(changed), spec), settings)["shards"] != key["shards"]
    # a changed key trains a new file beside the old one (a run recorded with the old one still loads)
    retrained = ensure_vae(cfg, {**spec, "steps": 2})
    assert retrained.trained_now and retrained.path != first.path and first.path.is_file()
    # a save killed half-way leaves only a temporary file, which never counts as the VAE
    key3 = {**spec, "steps": 3}
    name = f"vae-{_digest(cfg, key3)}.safetensors"
    (tmp_path / "vae" / f".{name}.x1y2.tmp").write_bytes(b"half a file")
    third = ensure_vae(cfg, key3)
    assert third.trained_now and third.path.name == name
    model = build_model(cfg.model)
    load_pretrained(model, third.path, ["vae"])  # a whole file
    with pytest.raises(ValueError, match="unknown demo_vae key"):
        vae_settings({**spec, "stpes": 3})


def _digest(cfg, spec) -> str:
    from sgm.training.demo_vae import key_digest

    return key_digest(demo_vae_key(training_config(cfg, spec), vae_settings(spec)))


def metric_rows(run_dir: Path, name: str) -> list[tuple[int, float]]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(name)]
    return [(int(r["step"]), float(r[name])) for r in rows]


def test_the_demo_run_logs_a_falling_val_loss_and_samples_with_its_trained_vae(demo_data, tmp_path):
    """`python train.py` with the demo experiment, shortened (tiny data, 32 px, 20 steps, a 2-step VAE)."""
    data = shutil.copytree(demo_data, tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        f"demo_data.out={data}",
        "demo_data.val_samples=4",
        f"data.shards={data}/*.tar",
        f"validation.shards={data}/val/*.tar",
        "validation.every_n_steps=10",
        "validation.timestep_buckets=4",
        f"demo_vae.out={tmp_path / 'vae'}",
        *[f"demo_vae.{k}={v}" for k, v in {**TINY_VAE, "steps": 2}.items()],
        "data.base_resolution=null",
        "data.square_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "trainer.max_steps=20",
        "checkpoint.every_n_train_steps=20",
        "samples.num_steps=2",
        "samples.height=32",
        "samples.width=32",
        "samples.seeds=[0]",
        "threads=1",
    ]
    result = train_cli(overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (vae_file,) = (tmp_path / "vae").glob("vae-*.safetensors")
    # the acceptance: val/loss in the CSV metrics, falling from the untrained UNet's (step 0) to the last
    losses = metric_rows(run_dir, "val/loss")
    assert [step for step, _ in losses] == [0, 10, 20] and losses[-1][1] < losses[0][1]
    assert metric_rows(run_dir, "val/ema_loss")
    # the closing lines: the loss first -> last, the grid, the VAE
    tail = result.stdout.splitlines()[-5:]
    assert re.match(r"\[sgm\] validation loss \(raw weights\): [\d.]+ at step 0 -> [\d.]+ at step 20 \(fell;", tail[0])
    assert re.match(r"\[sgm\] validation loss \(EMA weights\): [\d.]+ at step 0 -> [\d.]+ at step 20 ", tail[1])
    assert tail[2].startswith(f"[sgm] sample grid: {run_dir / 'samples'}")
    # the grid's check: the demo's prompts name red, black, white and yellow backgrounds (20 steps learn few)
    assert re.match(r"\[sgm\] background colour as prompted in the grid: \d/4 \(red \d/1, black \d/1, white", tail[3])
    assert tail[4].startswith(f"[sgm] VAE: {vae_file}, trained 2 steps by sgm.training.vae_training")
    # the run starts from the trained VAE as from any file, and records it as the VAE's source
    config = OmegaConf.load(run_dir / "config.yaml")
    scale = float(read_metadata(vae_file)["sgm.scale_factor"])
    assert config.pretrained == str(vae_file) and list(config.pretrained_parts) == ["vae"]
    assert config.model.scale_factor == pytest.approx(scale)
    lineage = read_lineage(run_dir)
    assert lineage["frozen"]["vae"] == {"source": "pretrained"} and lineage["parent"]["path"] == str(vae_file)
    # loading the run (sampling, export) gives that VAE and its scale factor
    loaded = load_model(run_dir)
    reference = build_model(config.model)
    load_pretrained(reference, vae_file, ["vae"])
    assert loaded.model.scale_factor == pytest.approx(scale)
    for key, value in reference.vae.state_dict().items():
        assert torch.equal(loaded.model.vae.state_dict()[key], value), key
    # a resume takes the VAE its run recorded: no training, no change for the resume check to see
    resumed = train_cli([*overrides, "trainer.max_steps=22"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "demo VAE" not in resumed.stdout and list((tmp_path / "vae").glob("vae-*.safetensors")) == [vae_file]
    again = OmegaConf.load(run_dir / "config.yaml")
    assert (again.pretrained, again.model.scale_factor) == (config.pretrained, config.model.scale_factor)
    assert len(read_lineage(run_dir)["resumes"]) == 1
    assert json.loads((run_dir / "outputs.json").read_text())["global_step"] == "22"


def test_demo_vae_mistakes_end_in_one_message_naming_the_key(demo_data, tmp_path):
    base = [*vae_run_config_overrides(demo_data), f"demo_vae.out={tmp_path / 'vae'}"]
    with pytest.raises(ConfigError, match=r"^demo_vae: .*pretrained=/my/model.safetensors.*Fix: demo_vae=null"):
        ensure_demo_vae(compose_train([*base, "pretrained=/my/model.safetensors"]), None)
    with pytest.raises(ConfigError, match=r"^demo_vae: unknown demo_vae key\(s\) stpes"):
        ensure_demo_vae(compose_train([*base, "+demo_vae.stpes=3"]), None)
    assert not (tmp_path / "vae").exists()  # nothing trained or written
