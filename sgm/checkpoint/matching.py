"""Which shipped model config an official-layout file fits, from its tensors' keys and shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sgm.checkpoint.official_layout import PARTS, part_of_key, to_official
from sgm.models.build import build_model, shipped_model_configs


def official_layout_of(config: str) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of a model config, built on the meta device."""
    model = build_model(config, device="meta")
    return {k: tuple(v.shape) for k, v in to_official(model).items()}


def match_file(layout: Mapping[str, Sequence[int]]) -> list[str]:
    """Shipped configs (and parts) whose official layout the file's tensors equal exactly."""
    found = {k: tuple(v) for k, v in layout.items() if part_of_key(k) is not None}
    present_parts = {part_of_key(k) for k in found}
    matches = []
    for name in shipped_model_configs():
        expected = official_layout_of(name)
        expected = {k: v for k, v in expected.items() if part_of_key(k) in present_parts}
        optional = {k for k in expected if k.endswith(".position_ids")}
        if {k: v for k, v in expected.items() if k not in optional} == {
            k: v for k, v in found.items() if k not in optional
        }:
            parts = [p for p in PARTS if p in present_parts]
            label = "full model" if len(parts) == len(PARTS) else "parts: " + ", ".join(parts)
            matches.append(f"{name} ({label})")
    return matches


def matching_config(layout: Mapping[str, Sequence[int]]) -> str | None:
    """The one shipped model config the file fits, or None when none or several do."""
    names = sorted({match.split(" (")[0] for match in match_file(layout)})
    return names[0] if len(names) == 1 else None
