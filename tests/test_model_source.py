"""One owner for model state: every route from a run to a model gives the same tensors and the same image.

Real tiny runs (from scratch, from a pretrained file, v-prediction) through the training entry point;
the export CLI, the run's own export, load_model on the run directory and on last.ckpt, and sampling
are compared tensor by tensor (every tensor) and pixel by pixel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_utils import compose_train, fast_overrides, make_shards

from sgm.checkpoint.fingerprints import part_fingerprints
from sgm.checkpoint.io import load_checkpoint, read_layout, read_metadata, save_checkpoint
from sgm.checkpoint.lineage import FROZEN_FILE, read_lineage
from sgm.checkpoint.model_source import ModelSourceError, load_model
from sgm.checkpoint.official_layout import V_PRED_KEY, to_official
from sgm.inference.cli import main as sample_main
from sgm.models.build import build_model
from sgm.training.export import main as export_main
from sgm.training.run import run

PROMPT = "a red heart"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def train(folder: Path, name: str, *extra: str) -> Path:
    """A real 4-step tiny run (EMA on) in folder/name; returns its run directory."""
    shards = make_shards(folder / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    run_dir = folder / name
    overrides = fast_overrides(run_dir, shards, max_steps=4, every=2) + [
        f"name={name}",
        "module.ema_decay=0.9",
        "module.lr=1e-2",
        "data.square_size=32",
        "samples.at_train_end=false",
        "logger=csv",
        *extra,
    ]
    run(compose_train(overrides))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    torch.manual_seed(11)
    parent = save_checkpoint(build_model("tiny"), folder / "parent.safetensors")
    return {
        "scratch": train(folder, "scratch"),
        "pretrained": train(folder, "pretrained", f"pretrained={parent}"),
        "vpred": train(
            folder,
            "vpred",
            "module.denoiser.scaling._target_=sgm.diffusion.denoiser.VScaling",
            "module.loss.weighting._target_=sgm.diffusion.weighting.VWeighting",
        ),
        "scaled": train(  # the demo's: a VAE of its own latent scale, a model that learned the empty caption
            folder, "scaled", "model.scale_factor=0.0777", "model.conditioner.caption_dropout_rate=0.2"
        ),
        "parent": parent,
    }


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def sample(checkpoint: Path, out: Path) -> np.ndarray:
    args = [
        str(checkpoint),
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    assert sample_main(args) == 0
    (png,) = sorted(out.glob("0*.png"))
    return np.asarray(Image.open(png))


@pytest.mark.parametrize("kind", ["scratch", "pretrained", "scaled"])
def test_cli_export_run_export_load_model_and_sampling_agree(runs, kind, tmp_path):
    run_dir = runs[kind]
    own = run_dir / f"{kind}_full.safetensors"
    reference = load_file(own)
    assert len(reference) > 200  # every part: UNet, both text towers, VAE
    scale = 0.0777 if kind == "scaled" else 0.13025  # the file carries the latent scale its VAE was trained with
    assert float(read_metadata(own)["sgm.scale_factor"]) == scale and load_model(own).model.scale_factor == scale
    dropout = 0.2 if kind == "scaled" else 0.0  # sampling the file guides against "" as sampling the run does
    assert load_model(own).model.conditioner.caption_dropout_rate == dropout
    for source in (run_dir, run_dir / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"{Path(source).name}.safetensors"
        assert export_main([str(source), str(out)]) == 0
        assert_same_tensors(load_file(out), reference)
        assert read_metadata(out) == read_metadata(own)
        loaded = load_model(source)
        assert_same_tensors(dict(to_official(loaded.model).items()), reference)
    again = tmp_path / "again.safetensors"  # two exports of one run: the same tensors (safetensors orders the
    export_main([str(run_dir), str(again)])  # header's metadata at random, so the bytes may not be equal)
    assert_same_tensors(load_file(again), reference)
    from_checkpoint = sample(run_dir / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")
    from_file = sample(own, tmp_path / "from_file")
    assert np.array_equal(from_checkpoint, from_file)


def test_frozen_parts_are_the_ones_the_run_trained_with(runs):
    for kind in ("scratch", "pretrained"):
        record = read_lineage(runs[kind])
        loaded = part_fingerprints(load_model(runs[kind]).model)
        for group in record["frozen"]:
            assert loaded[group] == record["weights_at_start"][group]
        assert record["trained"] == ["unet"]
    scratch = read_lineage(runs["scratch"])
    assert {where["source"] for where in scratch["frozen"].values()} == {FROZEN_FILE}
    assert (runs["scratch"] / FROZEN_FILE).is_file() and not (runs["pretrained"] / FROZEN_FILE).exists()
    parent = build_model("tiny", device="meta").to_empty(device="cpu")
    load_checkpoint(parent, runs["parent"])
    pretrained = part_fingerprints(load_model(runs["pretrained"]).model)
    assert pretrained["vae"] == part_fingerprints(parent)["vae"]


def test_a_changed_or_missing_source_stops_the_load_and_the_export(runs, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(runs["pretrained"], copy)
    changed = tmp_path / "changed.safetensors"
    torch.manual_seed(99)
    save_checkpoint(build_model("tiny"), changed)
    with pytest.raises(ModelSourceError, match="sha256 differs"):
        load_model(copy, pretrained=changed)
    assert export_main([str(copy), str(tmp_path / "x.safetensors"), "--pretrained", str(changed)]) == 2
    assert "not the weights it trained with" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    scratch = tmp_path / "scratch"
    shutil.copytree(runs["scratch"], scratch)
    (scratch / FROZEN_FILE).unlink()
    with pytest.raises(ModelSourceError, match=f"{FROZEN_FILE} is missing"):
        load_model(scratch)


def test_a_checkpoint_outside_its_run_loads_only_what_it_holds(runs, tmp_path):
    bare = tmp_path / "bare.ckpt"
    shutil.copy(runs["scratch"] / "checkpoints" / "last.ckpt", bare)
    with pytest.raises(ModelSourceError, match="run directory"):
        load_model(bare, model_config="tiny")
    unet = load_model(bare, parts=["unet"], model_config="tiny").model
    reference = load_file(runs["scratch"] / "scratch_full.safetensors")
    assert_same_tensors(to_official(unet, ["unet"]), {k: v for k, v in reference.items() if k.startswith("model.")})
    with pytest.raises(ModelSourceError, match="not the model the run"):
        load_model(runs["scratch"], model_config="tiny_refiner")


def test_a_v_prediction_run_exports_the_marker_and_loads_back_as_v_prediction(runs, tmp_path):
    exported = runs["vpred"] / "vpred_full.safetensors"
    assert V_PRED_KEY in read_layout(exported)
    assert read_metadata(exported)["modelspec.prediction_type"] == "v"
    assert load_model(exported).prediction == "v" and load_model(runs["vpred"]).prediction == "v"
    load_checkpoint(build_model("tiny"), exported)  # the project's own loader accepts the marker
    eps = runs["scratch"] / "scratch_full.safetensors"
    assert V_PRED_KEY not in read_layout(eps)
    assert load_model(eps).prediction == "eps" and read_metadata(eps)["modelspec.prediction_type"] == "epsilon"


def test_a_unet_only_file_is_matched_by_the_config_it_records_when_its_unet_fits_two(runs, tmp_path):
    """tiny and tiny_demo share their UNet, so a UNet-only file's tensors fit both: our export names its model."""
    out = tmp_path / "unet.safetensors"
    assert export_main([str(runs["scratch"]), str(out), "--unet-only"]) == 0
    assert read_metadata(out)["sgm.model"] == "tiny" and load_model(out).info["model"] == "tiny"
    bare = save_checkpoint(build_model("tiny"), tmp_path / "bare.safetensors", parts=["unet"])  # no sgm.model
    with pytest.raises(ModelSourceError, match=r"matches several model configs \(tiny, tiny_demo\); pass --model"):
        load_model(bare)


def test_a_run_from_an_exported_file_takes_the_latent_scale_of_its_vae(runs, tmp_path):
    """The demo's export (a VAE of its own scale) as a fine-tune's base: the run uses that scale, not the config's."""
    exported = runs["scaled"] / "scaled_full.safetensors"
    child = train(tmp_path, "child", f"pretrained={exported}")
    assert load_model(child).model.scale_factor == 0.0777
    unet_only = train(tmp_path, "unet_only", f"pretrained={exported}", "pretrained_parts=[unet]")
    assert load_model(unet_only).model.scale_factor == 0.13025  # its VAE is the config's own: so is the scale
