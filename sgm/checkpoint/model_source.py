"""One entry point for a model in any form: `load_model(source, parts=..., weights="ema"|"raw")`.

A source is one of
- a run directory (its `config.yaml` and `lineage.json`; the newest complete checkpoint in `checkpoints/`);
- a training checkpoint (a Lightning `.ckpt` file or a sharded `.ckpt` directory) inside a run directory;
- an official-layout `.safetensors` file (released, or exported by a run), whole or by part.

For a run the trained groups come from the checkpoint (its EMA unless weights="raw"), every other group
from the source the run recorded (`sgm.checkpoint.lineage`), checked against the fingerprints taken when
the run started. The denoiser is the run's (`module.denoiser`), or for a file eps-prediction unless it
carries the `v_pred` marker. Sampling, export, evaluation and the stage runner all load through here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sgm.checkpoint.fingerprints import group_states, weight_group
from sgm.checkpoint.io import CAPTION_DROPOUT_KEY, SCALE_FACTOR_KEY, load_checkpoint, read_layout, read_metadata
from sgm.checkpoint.lineage import LINEAGE_FILE, LineageError, part_of_group, read_lineage, restore_frozen
from sgm.checkpoint.matching import match_file
from sgm.checkpoint.official_layout import PARTS, V_PRED_KEY, check_parts, part_of_key
from sgm.checkpoint.pretrained import load_pretrained
from sgm.checkpoint.training_ckpt import TrainingCheckpointError, read_checkpoint, trained_adapters, trained_weights
from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling, VScaling
from sgm.models.build import build_model, load_model_config, shipped_model_configs
from sgm.models.sdxl import SDXL
from sgm.parallel import is_sharded_checkpoint, newest_checkpoint

RUN_CONFIG = "config.yaml"


class ModelSourceError(ValueError):
    """A model source that cannot be loaded as asked; the message names the fix."""


@dataclass
class LoadedModel:
    """A model (CPU, fp32, eval, no grads), its denoiser, and what it was loaded from (paths, not hashes:
    hashing a multi-GB checkpoint is left to callers that record it, e.g. the sampling CLI's PNG metadata)."""

    model: SDXL
    denoiser: DiscreteDenoiser
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction(self) -> str:
        """ "v" for a v-prediction model, else "eps"."""
        return prediction_of(self.denoiser)


def prediction_of(denoiser: DiscreteDenoiser) -> str:
    """The parametrization a denoiser's network predicts: "v" or "eps"."""
    return "v" if isinstance(getattr(denoiser, "scaling", None), VScaling) else "eps"


def load_model(
    source: str | os.PathLike,
    parts: Iterable[str] | None = None,
    weights: str = "ema",
    model_config: str | os.PathLike | None = None,
    pretrained: str | os.PathLike | None = None,
) -> LoadedModel:
    """The model in `source` (see the module docstring).

    parts: the parts wanted (default all; the others stay on the meta device, e.g. a UNet-only export).
    model_config: for a file, the config to build (default: the shipped one it fits); for a run, it must
    be the run's own. pretrained: for a file, supplies the parts it lacks; for a run, the parent file's
    new path if it moved."""
    path = Path(source)
    if not path.exists():
        raise ModelSourceError(
            f"no such model source: {path} (give a run directory, a training checkpoint or a .safetensors file)"
        )
    wanted = check_parts(PARTS if parts is None else [parts] if isinstance(parts, str) else parts)
    if weights not in ("ema", "raw"):
        raise ModelSourceError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ModelSourceError(f"pretrained file not found: {pretrained} (an official-layout .safetensors)")
    if path.suffix == ".safetensors" and path.is_file():
        loaded = _from_official(path, wanted, weights, model_config, pretrained)
    else:
        checkpoint, run_dir = _resolve_run(path)
        loaded = _from_training(checkpoint, run_dir, wanted, weights, model_config, pretrained)
    loaded.model.eval().requires_grad_(False)
    return loaded


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (<run_dir>/checkpoints/<name>.ckpt), if it has one."""
    run_dir = checkpoint.absolute().parent.parent
    return run_dir if (run_dir / RUN_CONFIG).is_file() else None


def _resolve_run(path: Path) -> tuple[Path, Path | None]:
    """(training checkpoint, its run directory or None) for a run directory or a checkpoint path."""
    if path.is_dir() and not is_sharded_checkpoint(path) and (path / RUN_CONFIG).is_file():
        newest = newest_checkpoint(path / "checkpoints")
        if newest is None:
            raise ModelSourceError(f"the run in {path} has no complete checkpoint in {path / 'checkpoints'} yet")
        return Path(newest), path
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise ModelSourceError(
            f"{path} is neither a run directory (no {RUN_CONFIG}) nor a sharded checkpoint (no 'latest' file); "
            "give the run directory, one of its checkpoints/*.ckpt, or a .safetensors file"
        )
    if path.is_file() and path.suffix != ".ckpt":
        raise ModelSourceError(f"{path}: not a .ckpt training checkpoint or a .safetensors file")
    return path, run_dir_of(path)


# -- runs and their training checkpoints ----------------------------------------------------------
def _from_training(
    checkpoint_path: Path,
    run_dir: Path | None,
    wanted: tuple[str, ...],
    weights: str,
    model_config: str | os.PathLike | None,
    pretrained: str | os.PathLike | None,
) -> LoadedModel:
    run = OmegaConf.load(run_dir / RUN_CONFIG) if run_dir else OmegaConf.create({})
    config = _run_model_config(run, model_config, checkpoint_path, run_dir)
    try:
        checkpoint = read_checkpoint(checkpoint_path)
        trained, which = trained_weights(checkpoint, weights)
    except TrainingCheckpointError as error:
        raise ModelSourceError(str(error)) from None
    model = build_model(config, device="meta")
    for part in wanted:
        _part_module(model, part).to_empty(device="cpu")
    groups = [g for g in group_states(model) if part_of_group(g) in wanted]
    trained_here = {weight_group(k) for k in trained}
    frozen = [g for g in groups if g not in trained_here]
    restored: list[str] = []
    record = None
    if frozen:
        record = read_lineage(run_dir) if run_dir else None
        if record is None:
            raise ModelSourceError(
                f"{checkpoint_path} holds only the trained {', '.join(sorted(trained_here - {None}))}; the frozen "
                f"{', '.join(frozen)} are recorded in its run directory ({RUN_CONFIG} and {LINEAGE_FILE} beside "
                "checkpoints/), which is not there: load from inside the run directory, or ask for the trained "
                "parts only (e.g. --unet-only)"
            )
        try:
            restored = restore_frozen(
                model, run_dir, record, skip=set(group_states(model)) - set(frozen), pretrained=pretrained
            )
        except LineageError as error:
            raise ModelSourceError(str(error)) from None
        unknown = sorted(set(frozen) - set(restored))
        if unknown:
            raise ModelSourceError(
                f"{checkpoint_path} holds no {', '.join(unknown)} and the run's {LINEAGE_FILE} records no other "
                "source for them; is this checkpoint from that run?"
            )
    wanted_trained = {k: v for k, v in trained.items() if part_of_group(weight_group(k) or "?") in wanted}
    result = model.load_state_dict(wanted_trained, strict=False, assign=False)
    if result.unexpected_keys:
        raise ModelSourceError(
            f"the weights in {checkpoint_path} do not fit model config {_name(config, run_dir)}: unexpected "
            f"{result.unexpected_keys[:3]} ...; load it with the run's own config"
        )
    _check_shapes(model, wanted_trained, checkpoint_path)
    adapters = merge_trained_adapters(model, trained_adapters(checkpoint, weights), wanted, str(checkpoint_path))
    denoiser = instantiate(run.module.denoiser) if run.get("module") else DiscreteDenoiser(EpsScaling())
    from_parent = [g for g in restored if record["frozen"][g]["source"] == "pretrained"] if restored else []
    parent = (pretrained or run.get("pretrained")) if from_parent else None
    info = {
        "checkpoint": str(checkpoint_path.absolute()),
        "model": _name(config, run_dir),
        "weights": which,
        "global_step": checkpoint.get("global_step"),
        "seed": int(run.get("seed", 0)),
        "run_dir": str(run_dir) if run_dir else None,
        "pretrained": {"path": str(Path(parent).absolute()), "parts": from_parent} if parent else None,
        "prediction": prediction_of(denoiser),
    }
    if adapters:
        info["lora_merged"] = adapters
    if weights == "ema" and which == "raw":
        print(f"[sgm] note: {checkpoint_path} has no EMA weights; loading its raw weights", flush=True)
    return LoadedModel(model, denoiser, info)


def merge_trained_adapters(model: SDXL, adapters: dict[str, torch.Tensor], wanted: Iterable[str], source: str) -> int:
    """Bake a run's LoRA adapters (kohya-keyed) into the wanted parts of `model` at scale 1; how many merged."""
    from sgm.checkpoint.kohya import UNET_PREFIX, network_from_state, text_encoder_prefixes

    prefixes = ((UNET_PREFIX,) if "unet" in wanted else ()) + (
        tuple(text_encoder_prefixes(model).values()) if "text_encoders" in wanted else ()
    )
    chosen = {k: v for k, v in adapters.items() if k.startswith(prefixes)} if prefixes else {}
    if not chosen:
        return 0
    try:
        network = network_from_state(model, chosen, source)
    except ValueError as error:
        raise ModelSourceError(str(error)) from None
    network.merge_into(model)
    return len(network)


def _run_model_config(
    run: DictConfig, model_config: str | os.PathLike | None, checkpoint: Path, run_dir: Path | None
) -> DictConfig | str | os.PathLike:
    """The run's model config; one given by the caller must be the same."""
    recorded = run.get("model")
    if recorded is None and model_config is None:
        raise ModelSourceError(
            f"cannot tell which model {checkpoint} holds: it has no run directory; pass --model NAME"
        )
    if recorded is None:
        return model_config
    if model_config is not None and load_model_config(model_config) != recorded:
        raise ModelSourceError(
            f"--model {model_config} is not the model the run in {run_dir} trained ({_name(recorded, run_dir)}); "
            "leave --model out: a run's checkpoint is loaded with the run's own config"
        )
    return recorded


def _check_shapes(model: SDXL, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    wrong = [
        f"{k}: {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ModelSourceError(f"{source} does not fit its model config: shape mismatches {wrong[:3]}")


def _part_module(model: SDXL, part: str) -> torch.nn.Module:
    return {"unet": model.unet, "vae": model.vae, "text_encoders": model.conditioner}[part]


# -- official-layout files ------------------------------------------------------------------------
def _from_official(
    path: Path,
    wanted: tuple[str, ...],
    weights: str,
    model_config: str | os.PathLike | None,
    pretrained: str | os.PathLike | None,
) -> LoadedModel:
    layout = {k: shape for k, (shape, _) in read_layout(path).items()}
    present = [p for p in PARTS if p in {part_of_key(k) for k in layout} and p in wanted]
    if "unet" in wanted and "unet" not in present:
        raise ModelSourceError(f"{path} holds no UNet weights (model.diffusion_model.*); give a model checkpoint")
    metadata = read_metadata(path)
    stored = metadata.get("sgm.weights", "as stored")
    if weights == "raw" and stored == "ema":
        raise ModelSourceError(
            f"weights=raw: {path} was exported with EMA weights; load the run's checkpoint with raw weights"
        )
    config = model_config or _matching_config(layout, path, metadata.get("sgm.model"))
    missing = [p for p in wanted if p not in present]
    if missing and pretrained is None:
        print(
            f"[sgm] note: {path} holds no {', '.join(missing)}; they come from the model config's random "
            "initialisation (pass --pretrained FILE for trained ones)",
            flush=True,
        )
    if missing and pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(config)
    else:
        model = build_model(config, device="meta")
        for part in wanted:
            _part_module(model, part).to_empty(device="cpu")
    load_checkpoint(model, path, parts=present)
    if missing and pretrained is not None:
        load_pretrained(model, pretrained, missing)
    vae_metadata = (
        metadata if "vae" in present else read_metadata(pretrained) if "vae" in missing and pretrained else {}
    )
    if vae_metadata.get(SCALE_FACTOR_KEY):  # a VAE trained here carries its own latent scale (export, VAE trainer)
        model.scale_factor = float(vae_metadata[SCALE_FACTOR_KEY])
    if metadata.get(CAPTION_DROPOUT_KEY):  # a model that learned the empty caption: sampled as from its run
        model.conditioner.caption_dropout_rate = float(metadata[CAPTION_DROPOUT_KEY])
    denoiser = DiscreteDenoiser(VScaling() if V_PRED_KEY in layout else EpsScaling())
    info = {
        "checkpoint": str(path.absolute()),
        "model": str(config),
        "weights": stored,
        "global_step": metadata.get("sgm.global_step") or None,
        "pretrained": {"path": str(Path(pretrained).absolute())} if missing and pretrained else None,
        "prediction": prediction_of(denoiser),
    }
    return LoadedModel(model, denoiser, info)


def _matching_config(layout: dict[str, tuple[int, ...]], path: Path, recorded: str | None = None) -> str:
    """The one shipped model config whose official layout the file's tensors equal; where several do (a UNet-only
    file of two configs sharing a UNet), the one the file's `sgm.model` metadata names, if it is among them."""
    names = sorted({match.split(" (")[0] for match in match_file(layout)})
    if len(names) == 1:
        return names[0]
    if recorded in names:
        return str(recorded)
    found = f"matches several model configs ({', '.join(names)})" if names else "matches no shipped model config"
    raise ModelSourceError(f"{path} {found}; pass --model NAME or a .yaml path (`python -m sgm.inspect {path}`)")


def _name(config: str | os.PathLike | DictConfig, run_dir: Path | None = None) -> str:
    """A model config's name: as given, the shipped config the run's model equals, or the run config's path."""
    if not isinstance(config, DictConfig):
        return str(config)
    shipped = next((name for name in shipped_model_configs() if load_model_config(name) == config), None)
    return shipped or f"{run_dir / RUN_CONFIG if run_dir else 'run'}:model"
