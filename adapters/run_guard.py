"""Keep a long run's progress: step-interval checkpoints, a save and a clean exit on preemption, no save from a run
that never started, and never a checkpoint with non-finite weights.

``RunGuard`` is a Lightning callback; both patched upstream ``main.py`` files add it to every run
(latent-diffusion: ``lightning.callbacks.run_guard.params``; enhancing-transformers: the config's ``run_guard:``
section), so plain upstream configs get it too.

| event                               | what RunGuard does                                                            |
|-------------------------------------|-------------------------------------------------------------------------------|
| every ``every_n_train_steps`` steps | saves ``<dirpath>/last.ckpt`` (independent of validation and of monitors)      |
| SIGTERM (also SLURM's kill)         | at the end of the running batch: saves ``last.ckpt``, exits 0                  |
| SIGUSR1 outside SLURM auto-requeue  | the same as SIGTERM (under SLURM, Lightning's handler saves and requeues)     |
| Ctrl-C                              | saves ``last.ckpt``, then Lightning exits 1                                   |
| any other exception                 | one process: saves ``crash.ckpt`` (never ``last.ckpt``); else nothing         |
| an exception before training began  | nothing: a failed resume leaves every checkpoint byte-identical               |

Every save in the run (ModelCheckpoint's too) goes through :class:`AtomicCheckpointIO`: written to a temporary file
in the same folder, flushed, then renamed over the old one, so a kill during a save leaves the previous file whole;
a checkpoint whose weights are not all finite is not written at all (the previous file stays).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only, rank_zero_warn

LAST = "last.ckpt"
CRASH = "crash.ckpt"


def nonfinite_keys(state_dict: dict[str, Any], limit: int = 3) -> list[str]:
    """Names of up to ``limit`` floating-point tensors in ``state_dict`` holding NaN or inf."""
    bad = []
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(key)
            if len(bad) == limit:
                break
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``<path>.tmp-<pid>``, fsync, ``os.replace`` onto ``path``; refuses non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        bad = nonfinite_keys(checkpoint.get("state_dict", {}))
        if bad:
            rank_zero_warn(f"not writing {path}: the weights are not finite ({', '.join(bad)}, ...); the previous "
                           "file, if any, is kept")
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        # the rename itself survives a power loss only once the folder's entry is on disk
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class RunGuard(pl.Callback):
    """See the module docstring. ``dirpath``: where ``last.ckpt`` goes (default: the ModelCheckpoint's folder);
    ``every_n_train_steps``: 0 turns interval saves off."""

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: int = 0) -> None:
        if int(every_n_train_steps) < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: off), got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = int(every_n_train_steps)
        self._started = False  # set once the checkpoint (if any) was restored and training began
        self._saved_step = -1
        self._usr1 = False

    # --- set-up ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.dirpath is None:
            ckpt_cb = trainer.checkpoint_callback
            if ckpt_cb is None or ckpt_cb.dirpath is None:
                raise ValueError("RunGuard needs dirpath: no ModelCheckpoint with a dirpath to take it from")
            self.dirpath = ckpt_cb.dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning calls this after restoring a resumed checkpoint (weights, optimizers, loops): from here on the
        # model in memory is at least as far as any file on disk.
        self._started = True
        self._saved_step = trainer.global_step
        every = f", every {self.every_n_train_steps} steps" if self.every_n_train_steps else ""
        _say(f"RunGuard: training from step {trainer.global_step}; last.ckpt in {self.dirpath}{every}")
        # Lightning registered its own handlers already; under SLURM auto-requeue it owns SIGUSR1 (save + requeue).
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) and \
                threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._usr1 = True

    # --- during training ----------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._saved_step:
            self.save(trainer, LAST)
        if trainer.world_size > 1:
            # Lightning broadcasts rank 0's SIGTERM flag every batch and raises on every rank together.
            if self._usr1:
                trainer._signal_connector.received_sigterm = True
        elif self._usr1 or trainer.received_sigterm:
            raise SIGTERMException()  # in one process Lightning checks only at the epoch's end: stop now

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self._started:
            _say(f"RunGuard: training had not started ({type(exception).__name__}); no checkpoint "
                           "written, the existing ones are untouched")
            return
        if trainer.global_step == self._saved_step:
            return  # nothing new since the last save (or the restored checkpoint)
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self.save(trainer, LAST)
            _say(f"RunGuard: stopped at step {trainer.global_step} ({type(exception).__name__}); "
                           f"resume from {os.path.join(self.dirpath, LAST)}")
        elif getattr(exception, "one_line", False):
            return  # the project's own errors (a diverged loss, bad input): the model is not worth keeping
        elif trainer.world_size == 1:  # under several processes the others may be stuck in a collective
            self.save(trainer, CRASH)
            _say(f"RunGuard: {type(exception).__name__} at step {trainer.global_step}; state saved to "
                           f"{os.path.join(self.dirpath, CRASH)} (last.ckpt left as it was)")

    # --- saving -------------------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, filename: str) -> None:
        """Save the whole training state (collective under DDP: every rank calls it) through the atomic IO."""
        trainer.save_checkpoint(os.path.join(self.dirpath, filename))
        self._saved_step = trainer.global_step


@rank_zero_only
def _say(message: str) -> None:
    """One line on stdout from rank 0 (printed, not logged: it must show however quiet Lightning's logging is)."""
    print(message, flush=True)
