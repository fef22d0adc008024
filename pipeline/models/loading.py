"""Strict state-dict loading with a one-line error: what every family's load_state ends in."""
from __future__ import annotations

import torch


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    """Load `state` into `model`, every key on both sides; ValueError naming `what` (a file, a key) otherwise."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what}: weights do not match model {name}: missing {result.missing_keys[:3]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:3]} ({len(result.unexpected_keys)})"
        )
