"""What upstream's Lightning-1.x training loops assumed, kept under Lightning 2 / torch 2 (both wrappers use these).

- ``step_without_counting``: Lightning 2 advances ``global_step`` at every ``optimizer.step()``; Lightning 1.x
  advanced it once per batch, which upstream's ``disc_start``, schedules, ``max_steps`` and checkpoint intervals assume.
- ``step_lr_schedulers``: under manual optimisation the module steps its step-interval schedulers itself.
- ``AccumulatedUpdate``: one training batch of the two-optimizer loop, with Lightning 1.x's gradient accumulation
  (Lightning 2 refuses ``accumulate_grad_batches`` under manual optimisation) and a check that stops a diverged
  run (``NonFiniteLossError``) before a NaN or infinite loss reaches the weights.
- ``allow_numpy_scalars_in_checkpoints``: resuming from checkpoints that hold numpy scalars (registers
  ``adapters.runtime.safe_load``'s allowlist).

Upstream's lr schedules (latent-diffusion's ``ldm.lr_scheduler``, enhancing's ``enhancing.utils.scheduler``) return
numpy floats, which end up in a checkpoint's optimizer and scheduler states. Lightning 2 resumes with
``torch.load(weights_only=True)``, which refuses numpy scalars, so ``-r``/``--resume`` of any run with a scheduler
would fail. Registering the numpy scalar types as safe globals (they carry numbers, not code) lets those
checkpoints load while everything else stays under ``weights_only``.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from adapters.runtime.errors import NonFiniteLossError
from adapters.runtime.safe_load import register_safe_globals


def step_without_counting(module: pl.LightningModule, optimizer: Any) -> None:
    """Step a (Lightning-wrapped) optimizer through the strategy: same precision and clipping handling as
    ``optimizer.step()``, but ``global_step`` does not advance (the second optimizer of a batch)."""
    module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=module)


def step_lr_schedulers(module: pl.LightningModule) -> None:
    """Step every lr scheduler the module configured (none, one or a list), once."""
    schedulers = module.lr_schedulers()
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
        scheduler.step()


class AccumulatedUpdate:
    """One training batch of a two-optimizer manual-optimisation module, as Lightning 1.x ran it.

    Lightning 1.x back-propagated each optimizer's loss / N and stepped that optimizer (then zeroed its gradients)
    at every N-th batch of an epoch and at the epoch's last batch only; step-interval lr schedulers stepped once
    per update and ``global_step`` counted updates. Lightning 2 refuses ``accumulate_grad_batches`` under manual
    optimisation, so N comes from ``module.update_every`` (set by the patched ``main.py`` files; 1 if unset).

    Use, in ``training_step``: ``update = AccumulatedUpdate(self, batch_idx, lr_option, resume_option)``; for each
    optimizer, with it toggled, ``update.backward(optimizer, loss, log_key, counted=...)``; then ``update.finish()``.
    ``step`` is the global step that every loss of the batch sees. ``lr_option`` and ``resume_option`` say, in the
    codebase's own terms, where the learning rate is set and how a run resumes (for ``NonFiniteLossError``).
    """

    def __init__(self, module: pl.LightningModule, batch_idx: int, lr_option: str, resume_option: str) -> None:
        self.module = module
        self.batch_idx = batch_idx
        self.lr_option, self.resume_option = lr_option, resume_option
        self.every = max(1, int(getattr(module, "update_every", 1)))
        self.step_now = (batch_idx + 1) % self.every == 0 or bool(module.trainer.is_last_batch)
        self.step = module.global_step

    def backward(self, optimizer: Any, loss: Tensor, key: str, counted: bool) -> None:
        """Check ``loss`` (scalar, logged as ``key``), back-propagate loss / N, and on an update batch step
        ``optimizer`` (advancing ``global_step`` if ``counted``: Lightning 1.x counted one step per update, however
        many optimizers stepped) and zero its gradients."""
        self.check_finite(key, loss)
        self.module.manual_backward(loss / self.every)  # Lightning 1.x's scaling: the update sees the mean
        if self.step_now:
            if counted:
                optimizer.step()
            else:
                step_without_counting(self.module, optimizer)
            optimizer.zero_grad()

    def check_finite(self, key: str, loss: Tensor) -> None:
        """Raise ``NonFiniteLossError`` if ``loss`` (scalar, logged as ``key``) is NaN or infinite on any process.

        Cost: one host sync (``bool`` of a one-element tensor). Under DDP a one-element all-reduce comes first, so
        that every process stops at the same check instead of the others waiting for the stopped one in the next
        gradient all-reduce.
        """
        bad = ~torch.isfinite(loss.detach()).all()
        if not bool(self.module.trainer.strategy.reduce(bad.float(), reduce_op="sum")):  # no-op on one process
            return
        where = f"at step {self.step} (epoch {self.module.current_epoch}, batch {self.batch_idx})"
        what = (f"{key} is {loss.detach().float().item()} {where}" if bool(bad)
                else f"{key} is not finite on another process {where}")
        raise NonFiniteLossError(
            f"{what}; training stopped before this loss was back-propagated. Try a lower learning rate "
            f"({self.lr_option}), check the training data for NaN or infinite values, and resume from the last "
            f"checkpoint saved while the losses were finite ({self.resume_option}).")

    def finish(self) -> None:
        """After the batch's last ``backward``: step the lr schedulers if this batch made an update."""
        if self.step_now:
            step_lr_schedulers(self.module)


def allow_numpy_scalars_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read numpy scalars and the rest of what Lightning checkpoints hold
    (idempotent). The one allowlist is ``adapters.runtime.safe_load``'s."""
    register_safe_globals()
