"""Rotation-trick adapters. ``adapters.swap_quantizers(model, gradient=...)`` swaps the quantizers of any VQ model.

The export is lazy (PEP 562): ``import adapters.runtime.errors`` and the other light modules do not pull in
torch and taming.
"""
from __future__ import annotations

from typing import Any

__all__ = ["swap_quantizers"]


def __getattr__(name: str) -> Any:
    if name == "swap_quantizers":
        from adapters.integrations.swap import swap_quantizers

        return swap_quantizers
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
