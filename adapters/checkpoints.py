"""Resuming upstream training loops from their own checkpoints under Lightning 2 / torch 2.

Upstream's lr schedules (latent-diffusion's ``ldm.lr_scheduler``, enhancing's ``enhancing.utils.scheduler``) return
numpy floats, which end up in a checkpoint's optimizer and scheduler states. Lightning 2 resumes with
``torch.load(weights_only=True)``, which refuses numpy scalars, so ``-r``/``--resume`` of any run with a scheduler
would fail. Registering the numpy scalar types as safe globals (they carry numbers, not code) lets those
checkpoints load while everything else stays under ``weights_only``.
"""
from __future__ import annotations

import numpy as np
import torch


def allow_numpy_scalars_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read numpy scalars (idempotent)."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it to np._core
    safe = [multiarray.multiarray.scalar, np.dtype]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    torch.serialization.add_safe_globals(safe)
