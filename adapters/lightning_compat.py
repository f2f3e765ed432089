"""What upstream's Lightning-1.x training loops assumed, kept under Lightning 2 / torch 2 (both wrappers use these).

- ``step_without_counting``: Lightning 2 advances ``global_step`` at every ``optimizer.step()``; Lightning 1.x
  advanced it once per batch, which upstream's ``disc_start``, schedules, ``max_steps`` and checkpoint intervals assume.
- ``step_lr_schedulers``: under manual optimisation the module steps its step-interval schedulers itself.
- ``allow_numpy_scalars_in_checkpoints``: resuming from checkpoints that hold numpy scalars.

Upstream's lr schedules (latent-diffusion's ``ldm.lr_scheduler``, enhancing's ``enhancing.utils.scheduler``) return
numpy floats, which end up in a checkpoint's optimizer and scheduler states. Lightning 2 resumes with
``torch.load(weights_only=True)``, which refuses numpy scalars, so ``-r``/``--resume`` of any run with a scheduler
would fail. Registering the numpy scalar types as safe globals (they carry numbers, not code) lets those
checkpoints load while everything else stays under ``weights_only``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def step_without_counting(module: pl.LightningModule, optimizer: Any) -> None:
    """Step a (Lightning-wrapped) optimizer through the strategy: same precision and clipping handling as
    ``optimizer.step()``, but ``global_step`` does not advance (the second optimizer of a batch)."""
    module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=module)


def step_lr_schedulers(module: pl.LightningModule) -> None:
    """Step every lr scheduler the module configured (none, one or a list), once."""
    schedulers = module.lr_schedulers()
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
        scheduler.step()


def allow_numpy_scalars_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read numpy scalars (idempotent)."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it to np._core
    safe = [multiarray.multiarray.scalar, np.dtype]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    torch.serialization.add_safe_globals(safe)
