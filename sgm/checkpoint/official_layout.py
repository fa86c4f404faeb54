"""The single place that knows the official SDXL key names.

Our modules keep readable names (`unet`, `vae`, `conditioner.embedders`); the released files use
`model.diffusion_model.*`, `first_stage_model.*` and `conditioner.embedders.N.*`, with the CLIP-L
tower in Hugging Face naming. Embedders that store weights translate their own keys through
`to_official` / `from_official`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMBEDDER_PREFIX = "conditioner.embedders."
# The marker other loaders (ComfyUI, kohya's scripts) read to treat a file as v-prediction: an empty tensor.
V_PRED_KEY = "v_pred"
# Keys written beside the model (the official code's sigma table, the v-prediction marker): accepted on
# load, never required.
OPTIONAL_KEYS = ("denoiser.sigmas", V_PRED_KEY)
# Keys a file may lack without harm: newer transformers releases stop saving CLIP's position_ids.
OPTIONAL_MISSING_SUFFIXES = (".embeddings.position_ids",)
PARTS = ("unet", "text_encoders", "vae")


def check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    """Validate a selection of parts, e.g. ("unet",) or ("unet", "vae")."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown checkpoint part(s) {unknown or parts}; choose from {list(PARTS)}")
    return parts


def part_of_key(key: str) -> str | None:
    """Which part an official key belongs to (None for keys outside the model, e.g. denoiser.sigmas)."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(EMBEDDER_PREFIX):
        return "text_encoders"
    return None


def _embedder_modules(model: nn.Module) -> list[nn.Module]:
    return list(model.conditioner.embedders)


def _module_state(module: nn.Module) -> dict[str, Tensor]:
    return module.state_dict()


def to_official(model: nn.Module, parts: Iterable[str] = PARTS) -> dict[str, Tensor]:
    """The model's tensors under official keys, for the chosen parts."""
    parts = check_parts(parts)
    out: dict[str, Tensor] = {}
    if "unet" in parts:
        out.update({UNET_PREFIX + k: v for k, v in _module_state(model.unet).items()})
    if "text_encoders" in parts:
        for index, module in enumerate(_embedder_modules(model)):
            own = _module_state(module)
            if not own and not hasattr(module, "to_official"):
                continue
            mapped = module.to_official(own) if hasattr(module, "to_official") else own
            out.update({f"{EMBEDDER_PREFIX}{index}.{k}": v for k, v in mapped.items()})
    if "vae" in parts:
        out.update({VAE_PREFIX + k: v for k, v in _module_state(model.vae).items()})
    return out


def split_official(state_dict: Mapping[str, Tensor], parts: Iterable[str] = PARTS) -> dict[str, dict[str, Tensor]]:
    """Official keys -> {"unet": {...}, "vae": {...}, "text_encoders": {index: {...}}} for the chosen parts.

    Keys of unselected parts are dropped; unknown keys land under "unexpected".
    """
    parts = check_parts(parts)
    result: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoders": {}, "unexpected": {}, "optional": {}}
    for key, value in state_dict.items():
        part = part_of_key(key)
        if part is None:
            bucket = "optional" if key in OPTIONAL_KEYS else "unexpected"
            result[bucket][key] = value
        elif part not in parts:
            continue
        elif part == "unet":
            result["unet"][key[len(UNET_PREFIX) :]] = value
        elif part == "vae":
            result["vae"][key[len(VAE_PREFIX) :]] = value
        else:
            rest = key[len(EMBEDDER_PREFIX) :]
            index, _, sub = rest.partition(".")
            if not index.isdigit():
                result["unexpected"][key] = value
                continue
            result["text_encoders"].setdefault(int(index), {})[sub] = value
    return result
