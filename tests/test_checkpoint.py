"""Official single-file layout: exact key lists, save/load round trips, partial loads, clear errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_batch
from safetensors.torch import load_file, save_file

from sgm.checkpoint.io import (
    CheckpointMismatchError,
    atomic_write,
    load_checkpoint,
    read_layout,
    save_checkpoint,
)
from sgm.checkpoint.official_layout import to_official
from sgm.models.build import build_model

PREFIX_TOTALS = {
    "sdxl_base": {
        "model.diffusion_model.": (1680, 2_567_463_684),
        "conditioner.embedders.0.": (197, 123_060_557),
        "conditioner.embedders.1.": (390, 694_659_841),
        "first_stage_model.": (248, 83_653_863),
    },
    "sdxl_refiner": {
        "model.diffusion_model.": (1220, 2_259_526_660),
        "conditioner.embedders.0.": (390, 694_659_841),
        "first_stage_model.": (248, 83_653_863),
    },
}


def _diff(ours: dict, reference: dict) -> str:
    missing = sorted(set(reference) - set(ours))[:5]
    extra = sorted(set(ours) - set(reference))[:5]
    shapes = [k for k in reference if k in ours and tuple(ours[k]) != reference[k]][:5]
    return f"missing {missing}, unexpected {extra}, shape mismatches {shapes}"


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_full_model_layout_equals_released_checkpoint(name, request):
    reference = request.getfixturevalue("base_reference" if name == "sdxl_base" else "refiner_reference")
    model = build_model(name, device="meta")
    ours = {k: tuple(v.shape) for k, v in to_official(model).items()}
    assert ours == reference, _diff(ours, reference)
    assert len(ours) == {"sdxl_base": 2515, "sdxl_refiner": 1858}[name]
    for prefix, (keys, numel) in PREFIX_TOTALS[name].items():
        rows = {k: s for k, s in ours.items() if k.startswith(prefix)}
        assert len(rows) == keys, prefix
        assert sum(torch.Size(s).numel() for s in rows.values()) == numel, prefix


def _fresh(name: str, seed: int):
    torch.manual_seed(seed)
    model = build_model(name)
    randomize_(model, seed=seed)
    return model.eval()


def _outputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = tiny_batch(2)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = model.conditioner(batch)
        return {
            "crossattn": cond["crossattn"],
            "vector": cond["vector"],
            "unet": model(x, torch.tensor([10, 900]), cond),
            "decoded": model.decode_first_stage(x),
        }


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path):
    source, target = _fresh("tiny", 1), _fresh("tiny", 2)
    path = save_checkpoint(source, tmp_path / "tiny.safetensors")
    before = _outputs(target)
    assert not torch.allclose(before["unet"], _outputs(source)["unet"])
    report = load_checkpoint(target, path)
    assert report.loaded_keys == len(read_layout(path))
    for key, value in _outputs(source).items():
        assert torch.equal(value, _outputs(target)[key]), key


def test_fp16_storage_keeps_integer_buffers(tmp_path: Path):
    source, target = _fresh("tiny", 1), _fresh("tiny", 2)
    path = save_checkpoint(source, tmp_path / "half.safetensors", dtype=torch.float16)
    dtypes = {k: d for k, (_, d) in read_layout(path).items()}
    assert dtypes.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids") == "I64"
    assert set(dtypes.values()) == {"F16"}
    load_checkpoint(target, path)
    ref, got = _outputs(source), _outputs(target)
    torch.testing.assert_close(got["unet"], ref["unet"], atol=5e-3, rtol=5e-3)


def test_partial_save_and_load_touch_only_their_part(tmp_path: Path):
    source, target = _fresh("tiny", 1), _fresh("tiny", 2)
    unet_only = save_checkpoint(source, tmp_path / "unet.safetensors", parts=["unet"])
    assert all(k.startswith("model.diffusion_model.") for k in read_layout(unet_only))
    vae_before = {k: v.clone() for k, v in target.vae.state_dict().items()}
    load_checkpoint(target, unet_only, parts=["unet"])
    assert all(torch.equal(v, target.vae.state_dict()[k]) for k, v in vae_before.items())
    assert all(torch.equal(v, source.unet.state_dict()[k]) for k, v in target.unet.state_dict().items())
    # A full file loads by part too: only the VAE changes.
    full = save_checkpoint(source, tmp_path / "full.safetensors")
    other = _fresh("tiny", 3)
    unet_before = {k: v.clone() for k, v in other.unet.state_dict().items()}
    load_checkpoint(other, full, parts=["vae"])
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, source.vae.state_dict()[k]) for k, v in other.vae.state_dict().items())


def test_loading_a_part_file_as_the_whole_model_names_the_missing_keys(tmp_path: Path):
    source = _fresh("tiny", 1)
    unet_only = save_checkpoint(source, tmp_path / "unet.safetensors", parts=["unet"])
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(_fresh("tiny", 2), unet_only)
    message = str(info.value)
    assert "missing keys (" in message and "vae: " in message and "text_encoders: " in message and "parts=" in message


def test_mismatched_model_lists_missing_unexpected_and_shapes(tmp_path: Path):
    path = save_checkpoint(_fresh("tiny", 1), tmp_path / "tiny.safetensors")
    target = _fresh("tiny_refiner", 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(target, path)
    message = str(info.value)
    for title in ("missing keys (", "unexpected keys (", "shape mismatches (", "... and"):
        assert title in message, message
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items()), "a failed load changes nothing"


def test_denoiser_sigmas_are_accepted_not_required(tmp_path: Path):
    source = _fresh("tiny", 1)
    sigmas = torch.linspace(0.03, 14.6, 1000)
    path = save_checkpoint(source, tmp_path / "with_sigmas.safetensors", extra_tensors={"denoiser.sigmas": sigmas})
    report = load_checkpoint(_fresh("tiny", 2), path)
    assert torch.equal(report.extras["denoiser.sigmas"], sigmas)


def test_missing_clip_position_ids_are_tolerated(tmp_path: Path):
    source = _fresh("tiny", 1)
    path = save_checkpoint(source, tmp_path / "full.safetensors")
    tensors = load_file(str(path))
    del tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    save_file(tensors, str(tmp_path / "no_ids.safetensors"))
    target = _fresh("tiny", 2)
    load_checkpoint(target, tmp_path / "no_ids.safetensors")
    assert torch.equal(_outputs(target)["crossattn"], _outputs(source)["crossattn"])


def test_unknown_keys_outside_the_model_are_rejected(tmp_path: Path):
    path = save_checkpoint(
        _fresh("tiny", 1), tmp_path / "x.safetensors", extra_tensors={"optimizer.step": torch.zeros(1)}
    )
    with pytest.raises(CheckpointMismatchError, match="optimizer.step"):
        load_checkpoint(_fresh("tiny", 2), path)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(_fresh("tiny", 1), tmp_path / "nope.safetensors")


def test_crash_mid_save_keeps_the_last_good_file(tmp_path: Path):
    path = save_checkpoint(_fresh("tiny", 1), tmp_path / "model.safetensors")
    good = path.read_bytes()

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        atomic_write(path, crash)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_write_gives_the_file_the_usual_permissions(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "weights.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's owner-only 0600
