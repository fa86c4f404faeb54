"""python -m sgm.inference.merge_lora: adapters merged at their scales into a full official-layout file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import randomize_, tiny_batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sgm.checkpoint.io import read_metadata, save_checkpoint
from sgm.checkpoint.kohya import apply_lora_file, save_lora_file
from sgm.checkpoint.model_source import load_model
from sgm.checkpoint.official_layout import to_official
from sgm.inference.merge_lora import main
from sgm.models.build import build_model
from sgm.models.lora import LoRAConfig, apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {
    "a": {"unet": LoRAConfig(rank=2, alpha=1, targets="locon"), "text_encoder_0": LoRAConfig(rank=2)},
    "b": {"unet": LoRAConfig(rank=3, targets="attn"), "text_encoder_1": LoRAConfig(rank=2, alpha=4)},
}
SCALES = {"a": 0.7, "b": -1.5}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    base = save_checkpoint(
        randomize_(build_model("tiny"), seed=1),
        folder / "base.safetensors",
        metadata={"modelspec.title": "tiny base"},
        extra_tensors={"denoiser.sigmas": torch.linspace(0.1, 10.0, 8)},
    )
    model = load_model(base, model_config="tiny").model
    out = {"base": base}
    for seed, (name, parts) in enumerate(ADAPTERS.items()):
        network = apply_lora(model, parts)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in network.values():
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.2)
        out[name] = save_lora_file(network, folder / f"{name}.safetensors", dtype=torch.float32)
        network.remove()
    return out


def outputs(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([17, 941])
    with torch.no_grad():
        cond = model.condition(tiny_batch())
        return {**cond, "unet": model(x, t, cond)}


def adapted_keys(model, networks) -> set[str]:
    """The official keys holding a weight some adapter targets: fill each target weight (or q/k/v slice of a
    packed in_proj) with NaN, then see which official tensors hold NaN."""
    with torch.no_grad():
        for network in networks:
            for target in network.targets.values():
                module = target.resolve(model)
                if target.slot is None:
                    module.weight.fill_(float("nan"))
                elif target.slot == "out":
                    module.out_proj.weight.fill_(float("nan"))
                else:
                    rows, index = module.embed_dim, "qkv".index(target.slot)
                    module.in_proj_weight[index * rows : (index + 1) * rows].fill_(float("nan"))
    return {k for k, v in to_official(model).items() if v.is_floating_point() and v.isnan().any()}


def merged_args(files, out):
    return [str(files["base"]), str(out), "--model", "tiny"] + [
        arg for name in ADAPTERS for arg in ("--lora", f"{files[name]}:{SCALES[name]}")
    ]


def test_merged_file_equals_the_applied_adapters_and_keeps_the_rest_bit_identical(tmp_path, files, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(merged_args(files, out)) == 0
    printed = capsys.readouterr().out
    assert f"merged {files['a']} at scale 0.7" in printed and f"merged {files['b']} at scale -1.5" in printed

    # Outputs: the merged file == the base with both adapters applied at their scales.
    merged = load_model(out, model_config="tiny").model
    applied = load_model(files["base"], model_config="tiny").model
    networks = [apply_lora_file(applied, files[name], SCALES[name]) for name in ADAPTERS]
    got, want = outputs(merged), outputs(applied)
    plain = outputs(load_model(files["base"], model_config="tiny").model)
    for key in want:
        assert not torch.equal(want[key], plain[key]), key  # the adapters reach every output
        assert ((got[key] - want[key]).abs().max() / want[key].abs().max()).item() <= 1e-5, key

    # Tensors: the adapted weights changed, every other tensor (and BASE's extras) is bit-identical.
    adapted = adapted_keys(load_model(files["base"], model_config="tiny").model, networks)
    base, result = load_file(str(files["base"])), load_file(str(out))
    assert result.keys() == base.keys() and "denoiser.sigmas" in result
    assert any(k.startswith("conditioner.embedders.0.") for k in adapted)
    assert any(k.startswith("conditioner.embedders.1.") for k in adapted)
    for key, value in result.items():
        assert value.dtype == base[key].dtype, key
        assert torch.equal(value, base[key]) != (key in adapted), key
    meta = read_metadata(out)
    assert meta["modelspec.title"] == "tiny base" and json.loads(meta["sgm.parts"]) == ["unet", "text_encoders", "vae"]
    assert [(m["path"], m["scale"]) for m in json.loads(meta["sgm.merged_loras"])] == [
        (str(files["a"]), 0.7),
        (str(files["b"]), -1.5),
    ]


def test_fp16_output_and_user_errors(tmp_path, files, capsys):
    out = tmp_path / "half.safetensors"
    assert main([*merged_args(files, out)[:4], "--lora", str(files["a"]), "--fp16"]) == 0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4)}, foreign)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(files["base"]), str(tmp_path / "x.safetensors"), "--model", "tiny", "--lora", str(foreign)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and "does not fit this model" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main([str(files["base"]), str(files["base"]), "--lora", str(files["a"])]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and re.search("OUT .* is BASE", err)
