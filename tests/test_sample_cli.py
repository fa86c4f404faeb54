"""python -m sgm.sample: PNGs with their settings, seeds, the refiner handoff, training checkpoints, bad input.

The models are the tiny configs with randomised weights (a fresh UNet outputs zeros), and a real
2-step training run whose UNet starts from the randomised base file while its text encoders and VAE
come from the seeded model config (as in `python train.py`); its checkpoint holds UNet + EMA.
Only the first test infers the model config from the file (it builds every shipped config on meta,
seconds on a busy machine); the others name it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image
from training_utils import compose_train, fast_overrides, make_shards

from sgm.checkpoint.io import load_checkpoint, save_checkpoint
from sgm.checkpoint.model_source import load_model
from sgm.diffusion.samplers import DPMPP2MSampler
from sgm.inference import generate_latents
from sgm.inference.cli import main
from sgm.inference.metadata import read_settings
from sgm.models.build import build_model
from sgm.training.run import run

PROMPT = "a red heart"
FAST = ["--steps", "3", "--height", "32", "--width", "32", "--guidance", "5.0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = save_checkpoint(randomize_(build_model("tiny"), seed=1), folder / "base.safetensors")
    refiner = save_checkpoint(randomize_(build_model("tiny_refiner"), seed=2), folder / "refiner.safetensors")
    return {"base": base, "refiner": refiner}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files):
    """A real 2-step run (EMA on) from the base file's UNet, with one validation sample at the end."""
    folder = tmp_path_factory.mktemp("run")
    shards = make_shards(folder / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    overrides = fast_overrides(folder / "run", shards, max_steps=2, every=2) + [
        f"pretrained={files['base']}",
        "pretrained_parts=[unet]",
        "module.ema_decay=0.9",
        "module.lr=1e-2",
        "data.square_size=32",
        f"samples.prompts=[{PROMPT}]",
        "samples.seeds=[0]",
        "samples.height=32",
        "samples.width=32",
    ]
    outputs = run(compose_train(overrides))
    return {
        "ckpt": folder / "run" / "checkpoints" / "last.ckpt",
        "export": outputs["export"].split(" (")[0],
        "validation": outputs["samples"],
    }


def sample(tmp_path, checkpoint, *extra: str, name: str = "out") -> list[np.ndarray]:
    out = tmp_path / name
    model = ["--model", "tiny"] if str(checkpoint).endswith(".safetensors") else []  # a later --model wins
    assert main([str(checkpoint), "--prompt", PROMPT, *FAST, *model, "--out", str(out), *extra]) == 0
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]


def test_writes_pngs_whose_metadata_round_trips(tmp_path, files, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue circle\n\n  a green tree  \n", encoding="utf-8")
    args = [
        str(files["base"]),
        "--prompt",
        PROMPT,
        "--prompts-file",
        str(prompts),
        *FAST,
        "--seed",
        "7",
        "--negative-prompt",
        "blurry",
        "--original-size",
        "64",
        "48",
        "--crop-top-left",
        "4",
        "8",
        "--grid",
        "--sampler",
        "euler",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000_seed7.png", "00001_seed8.png", "00002_seed9.png", "grid.png"]
    assert str(tmp_path / "out" / "00002_seed9.png") in capsys.readouterr().out
    png = Image.open(tmp_path / "out" / "00002_seed9.png")
    meta = read_settings(png.filename)
    assert png.size == (32, 32) and meta["prompt"] == "a green tree" and meta["seed"] == 9 and meta["index"] == 2
    assert meta["negative_prompt"] == "blurry" and (meta["sampler"], meta["steps"], meta["guidance_scale"]) == (
        "euler",
        3,
        5.0,
    )
    assert meta["original_size_as_tuple"] == [64, 48] and meta["crop_coords_top_left"] == [4, 8]
    assert meta["target_size_as_tuple"] == [32, 32] and meta["refiner"] is None
    assert meta["base"]["model"] == "tiny"  # inferred from the file's layout
    assert meta["base"]["sha256"] == hashlib.sha256(files["base"].read_bytes()).hexdigest()
    assert png.text["parameters"].startswith("a green tree\nNegative prompt: blurry\nSteps: 3, Sampler: Euler EDM")
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (2 * 32, 2 * 32) and len(read_settings(grid.filename)["images"]) == 3


def test_seeds_reproduce_and_differ_whatever_the_batch(tmp_path, files):
    batched = sample(tmp_path, files["base"], "--images-per-prompt", "2", "--batch-size", "2", name="a")
    alone = sample(tmp_path, files["base"], "--seed", "1", "--batch-size", "1", name="b")  # image 1 of the batch
    assert np.array_equal(batched[1], alone[0])
    assert not np.array_equal(batched[0], batched[1]) and batched[0].std() > 0


def test_base_then_refiner_differs_from_base_alone(tmp_path, files):
    size = ["--steps", "4", "--height", "64", "--width", "64"]  # the tiny refiner takes multiples of 64 px
    alone = sample(tmp_path, files["base"], *size, name="base")
    refiner = ["--refiner", str(files["refiner"]), "--refiner-model", "tiny_refiner"]
    refined = sample(
        tmp_path,
        files["base"],
        *size,
        *refiner,
        "--refiner-strength",
        "0.5",
        "--aesthetic-score",
        "7.5",
        name="refined",
    )
    assert refined[0].shape == alone[0].shape == (64, 64, 3) and not np.array_equal(alone[0], refined[0])
    meta = read_settings(next((tmp_path / "refined").glob("*.png")))
    assert meta["refiner"]["model"] == "tiny_refiner" and meta["refiner"]["strength"] == 0.5
    assert meta["aesthetic_score"] == 7.5 and meta["negative_aesthetic_score"] == 2.5
    with pytest.raises(SystemExit, match="leaves the refiner no step"):
        sample(tmp_path, files["base"], *size, *refiner, "--refiner-strength", "0.1")


def test_training_checkpoint_matches_its_export_and_the_runs_own_samples(tmp_path, trained):
    ema = sample(tmp_path, trained["ckpt"], "--sampler", "dpmpp2m", name="ckpt")
    exported = sample(tmp_path, trained["export"], name="export")
    raw = sample(tmp_path, trained["ckpt"], "--raw", name="raw")
    assert np.array_equal(ema[0], exported[0]) and not np.array_equal(ema[0], raw[0])
    assert np.array_equal(ema[0], np.asarray(Image.open(trained["validation"])))  # the run's end-of-training sample
    meta = read_settings(next((tmp_path / "ckpt").glob("*.png")))["base"]
    assert meta["weights"] == "ema" and meta["global_step"] == 2 and meta["model"] == "tiny"
    assert meta["pretrained"] is None and meta["seed"] == 0  # text encoders and VAE: the seeded model config


def test_meta_fast_path_loads_every_tensor_and_a_negative_prompt_counts(files):
    """A full file is loaded into a model built on meta: every tensor must come from the file.
    The base model zeroes its unconditional text only when no negative prompt is given."""
    loaded = load_model(files["base"], model_config="tiny").model
    reference = build_model("tiny")
    load_checkpoint(reference, files["base"])
    mine, theirs = loaded.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    kwargs = {"sampler": DPMPP2MSampler(num_steps=2), "guidance_scale": 5.0, "seed": 0}
    zeroed = generate_latents(loaded, [PROMPT], 32, 32, **kwargs)
    assert torch.equal(zeroed, generate_latents(loaded, [PROMPT], 32, 32, negative_prompts=[""], **kwargs))
    assert not torch.allclose(zeroed, generate_latents(loaded, [PROMPT], 32, 32, negative_prompts=["blurry"], **kwargs))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "60"], "takes multiples of 32 pixels"),
        (["--model", "tiny_refiner"], "does not fit the model"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_options_exit_with_one_message(tmp_path, files, extra, message):
    with pytest.raises(SystemExit, match=message):
        sample(tmp_path, files["base"], *extra)


def test_bad_files_exit_with_one_message(tmp_path, files, trained):
    with pytest.raises(SystemExit, match="no such model source"):
        sample(tmp_path, tmp_path / "missing.ckpt")
    with pytest.raises(SystemExit, match="--model tiny_refiner is not the model the run"):
        sample(tmp_path, trained["ckpt"], "--model", "tiny_refiner")
    lone = tmp_path / "elsewhere" / "last.ckpt"  # no run config.yaml beside it
    lone.parent.mkdir()
    lone.write_bytes(trained["ckpt"].read_bytes())
    with pytest.raises(SystemExit, match="pass --model NAME"):
        sample(tmp_path, lone)


# --- LoRA adapters (--lora FILE[:SCALE]) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory, files):
    """Two kohya files for the tiny base with non-zero lora_up (a fresh adapter changes nothing); the
    first one's name holds a ':' (the scale is parsed from the last ':' only when it is a number)."""
    from sgm.checkpoint.kohya import save_lora_file
    from sgm.models.lora import LoRAConfig, apply_lora

    folder = tmp_path_factory.mktemp("loras")
    model = load_model(files["base"], model_config="tiny").model
    out = {}
    for seed, (name, parts) in enumerate(
        {
            "style:a.safetensors": {"unet": LoRAConfig(rank=2, targets="locon"), "text_encoder_0": LoRAConfig(rank=2)},
            "b.safetensors": {"unet": LoRAConfig(rank=2, targets="attn"), "text_encoder_1": LoRAConfig(rank=2)},
        }.items()
    ):
        network = apply_lora(model, parts)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in network.values():
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.5)
        out[name.split(".")[0].split(":")[-1]] = save_lora_file(network, folder / name, dtype=torch.float32)
        network.remove()
    foreign = folder / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4), "some.other.key": torch.zeros(1)}, foreign)
    out["foreign"] = foreign
    return out


def test_parse_lora_takes_the_scale_from_the_last_colon_only_when_it_is_a_number():
    from sgm.inference.cli import parse_lora

    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora("dir:x/a.safetensors:-1e-1") == ("dir:x/a.safetensors", -0.1)
    assert parse_lora(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_lora(r"C:\loras\a.safetensors:2") == (r"C:\loras\a.safetensors", 2.0)
    assert parse_lora("a.safetensors:nan") == ("a.safetensors:nan", 1.0)


def test_lora_at_scale_zero_changes_nothing_and_adapters_are_recorded(tmp_path, files, loras):
    plain = sample(tmp_path, files["base"], name="plain")
    zero = sample(tmp_path, files["base"], "--lora", f"{loras['a']}:0", name="zero")
    assert np.array_equal(plain[0], zero[0])
    meta = read_settings(next((tmp_path / "zero").glob("*.png")))
    assert meta["loras"] == [
        {"path": str(loras["a"]), "scale": 0.0, "sha256": hashlib.sha256(loras["a"].read_bytes()).hexdigest()}
    ]
    assert read_settings(next((tmp_path / "plain").glob("*.png")))["loras"] == []
    assert "LoRA: style:a:0 (" in Image.open(next((tmp_path / "zero").glob("*.png"))).text["parameters"]


def test_loras_change_the_image_and_several_apply(tmp_path, files, loras):
    plain = sample(tmp_path, files["base"], name="plain")[0]
    a = sample(tmp_path, files["base"], "--lora", str(loras["a"]), name="a")[0]  # no scale: 1
    b = sample(tmp_path, files["base"], "--lora", f"{loras['b']}:1.5", name="b")[0]
    both = sample(tmp_path, files["base"], "--lora", str(loras["a"]), "--lora", f"{loras['b']}:1.5", name="ab")[0]
    images = [plain, a, b, both]
    assert all(not np.array_equal(x, y) for i, x in enumerate(images) for y in images[i + 1 :])
    meta = read_settings(next((tmp_path / "ab").glob("*.png")))
    assert [(m["path"], m["scale"]) for m in meta["loras"]] == [(str(loras["a"]), 1.0), (str(loras["b"]), 1.5)]


def test_a_foreign_lora_file_exits_2_with_one_message(tmp_path, files, loras, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample(tmp_path, files["base"], "--lora", str(loras["foreign"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {loras['foreign']} does not fit this model.") and err.count("error:") == 1
    assert "Traceback" not in err and "unknown keys" in err and "module names this model lacks" in err
    with pytest.raises(SystemExit, match="LoRA file not found"):
        sample(tmp_path, files["base"], "--lora", str(tmp_path / "missing.safetensors:0.5"))
