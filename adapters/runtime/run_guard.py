"""Keep a long run's progress: step-interval checkpoints, one save and a clean exit on preemption or Ctrl-C, taken
by all processes together, no save from a run that never started, and never a checkpoint with non-finite weights.

``RunGuard`` is a Lightning callback; both patched upstream ``main.py`` files add it to every run
(latent-diffusion: ``lightning.callbacks.run_guard.params``; enhancing-transformers: the config's ``run_guard:``
section), so plain upstream configs get it too.

| event                               | what RunGuard does                                                            |
|-------------------------------------|-------------------------------------------------------------------------------|
| every ``every_n_train_steps`` steps | saves ``<dirpath>/last.ckpt`` (independent of validation and of monitors)      |
| SIGTERM (also SLURM's kill)         | at the next step boundary: saves ``last.ckpt``, exits 0                       |
| SIGUSR1 outside SLURM auto-requeue  | the same as SIGTERM (under SLURM, Lightning's handler saves and requeues)     |
| Ctrl-C once a step of the run ended | at the next step boundary: saves ``last.ckpt``, exits 1; a second Ctrl-C stops |
|                                     | at once without saving                                                        |
| Ctrl-C before that                  | stops at once, writes nothing (a resume being restored leaves ``last.ckpt``  |
|                                     | byte-identical)                                                               |
| any other exception                 | one process: saves ``crash.ckpt`` (never ``last.ckpt``); else nothing         |
| an exception before training began  | nothing: a failed resume leaves every checkpoint byte-identical               |

A step boundary is the end of a training batch that advanced ``global_step`` (with gradient accumulation, the
batch that made the update). Under DDP a signal reaches the ranks at different moments (or one rank only), so no
rank acts on its own flag: at every step boundary the ranks all-reduce (max) their pending requests, and all of
them stop at the same step, save together (``Trainer.save_checkpoint`` ends in a barrier) and exit. RunGuard
replaces Lightning's SIGTERM handler during training for this: Lightning 2's handler broadcasts from inside the
signal handler and its loops check each rank's own flag, which can split the ranks between a save and the next
batch's collectives (a hang).

Every save in the run (ModelCheckpoint's too) goes through :class:`AtomicCheckpointIO`: written to a temporary file
in the same folder, flushed, then renamed over the old one, so a kill during a save leaves the previous file whole;
a checkpoint whose weights are not all finite is not written at all (the previous file stays), and the refusal is
reported with the step that the file on disk still holds.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only, rank_zero_warn

LAST = "last.ckpt"
CRASH = "crash.ckpt"

# Stop requests, as numbers so that the ranks can agree on one with an all-reduce (max): a preemption signal wins
# over a Ctrl-C (it exits 0, which schedulers read as "requeue me").
_CTRL_C, _SIGUSR1, _SIGTERM = 1, 2, 3
_LABELS = {_CTRL_C: "Ctrl-C", _SIGUSR1: "SIGUSR1", _SIGTERM: "SIGTERM"}


def nonfinite_keys(state_dict: dict[str, Any], limit: int = 3) -> list[str]:
    """Names of up to ``limit`` floating-point tensors in ``state_dict`` holding NaN or inf."""
    bad = []
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(key)
            if len(bad) == limit:
                break
    return bad


@dataclass
class Refusal:
    """A save that :class:`AtomicCheckpointIO` did not write: where, at which step, and which weights were bad."""

    path: str
    step: Optional[int]
    keys: list[str]


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``<path>.tmp-<pid>``, fsync, ``os.replace`` onto ``path``; refuses non-finite weights.

    It remembers the ``global_step`` of every file it wrote (``steps``; :class:`RunGuard` adds the file a run
    resumed from) and the last refusal (``refusal``), so that a refused save can say what the file on disk holds.
    Under DDP only rank 0 writes, so only rank 0 knows about a refusal."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, int] = {}
        self.refusal: Optional[Refusal] = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.path.abspath(os.fspath(path))
        step = checkpoint.get("global_step")
        bad = nonfinite_keys(checkpoint.get("state_dict", {}))
        if bad:
            # No exception: under DDP this runs on rank 0 only, inside a save that ends in a barrier.
            self.refusal = Refusal(path, step, bad)
            more = ", ..." if len(bad) == 3 else ""  # nonfinite_keys names at most 3
            rank_zero_warn(f"not writing {path} (step {step}): the weights are not finite ({', '.join(bad)}{more}); "
                           f"{self.describe(path)}")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
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
        if isinstance(step, int):
            self.steps[path] = step
        # the rename itself survives a power loss only once the folder's entry is on disk
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def describe(self, path: Any) -> str:
        """What the checkpoint at ``path`` holds, in words: ``"<name> holds step N"``, or that there is none."""
        path = os.path.abspath(os.fspath(path))
        name = os.path.basename(path)
        if not os.path.isfile(path):
            return f"there is no {name}"
        step = self.steps.get(path)
        if step is None:
            step = _stored_step(path)
        if step is None:
            return f"{name} is kept as it was (its step could not be read)"
        return f"{name} holds step {step}"


def _stored_step(path: str) -> Optional[int]:
    """``global_step`` of a checkpoint this process neither wrote nor resumed from (weights-only, memory-mapped: the
    tensors are not read); None when the file does not load that way."""
    from adapters.integrations.lightning_compat import allow_numpy_scalars_in_checkpoints

    allow_numpy_scalars_in_checkpoints()
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # a truncated or foreign file: the message says the step is unknown
        return None
    return int(step) if isinstance(step, int) else None


class RunGuard(pl.Callback):
    """See the module docstring. ``dirpath``: where ``last.ckpt`` goes (default: the ModelCheckpoint's folder);
    ``every_n_train_steps``: 0 turns interval saves off."""

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: int = 0) -> None:
        if int(every_n_train_steps) < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: off), got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = int(every_n_train_steps)
        self._started = False  # set once the checkpoint (if any) was restored and training began
        self._stepped = False  # set at the first step boundary of this run
        self._boundary_step = -1  # global_step at the last step boundary
        self._saved_step = -1  # the last step a save was made or attempted at (the same on every rank)
        self._request = 0  # the stop this process was asked for (_CTRL_C, ...), set by the signal handlers
        self._stopping = 0  # the stop all ranks agreed on, once RunGuard raised it
        self._rank = 0

    # --- set-up ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._started = self._stepped = False
        self._request = self._stopping = 0
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.dirpath is None:
            ckpt_cb = trainer.checkpoint_callback
            if ckpt_cb is None or ckpt_cb.dirpath is None:
                raise ValueError("RunGuard needs dirpath: no ModelCheckpoint with a dirpath to take it from")
            self.dirpath = ckpt_cb.dirpath

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers(trainer)  # Lightning registered its own just before the sanity check

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning calls this after restoring a resumed checkpoint (weights, optimizers, loops): from here on the
        # model in memory is at least as far as any file on disk.
        self._started = True
        self._stepped = False
        self._saved_step = self._boundary_step = trainer.global_step
        self._stopping = 0
        io = self._io(trainer)
        if io is not None and trainer.ckpt_path and os.path.isfile(trainer.ckpt_path):
            io.steps[os.path.abspath(trainer.ckpt_path)] = trainer.global_step
        self._install_handlers(trainer)
        every = f", every {self.every_n_train_steps} steps" if self.every_n_train_steps else ""
        _say(f"RunGuard: training from step {trainer.global_step}; last.ckpt in {self.dirpath}{every}")

    def _install_handlers(self, trainer: pl.Trainer) -> None:
        """Own SIGTERM, SIGUSR1 (unless Lightning's SLURM requeue has it) and SIGINT while training: the handlers
        only record the request; the stop happens at a step boundary (see the module docstring). Lightning's
        teardown puts back the handlers that were there before ``fit``."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread
        self._rank = trainer.global_rank
        if trainer.received_sigterm:  # caught by Lightning's handler before RunGuard's took over
            self._request = max(self._request, _SIGTERM)
            trainer._signal_connector.received_sigterm = False  # its per-rank checks must not act on it
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None, self._on_stop_signal):
            signal.signal(signal.SIGUSR1, self._on_stop_signal)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, self._on_interrupt):  # not if ignored
            signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._request = max(self._request, _SIGTERM if signum == signal.SIGTERM else _SIGUSR1)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if not self._stepped or self._request:
            # Nothing of this run to keep yet, or a second Ctrl-C: stop at once, as Python's own handler would.
            raise KeyboardInterrupt
        self._request = _CTRL_C
        if self._rank == 0:  # os.write: print() from a signal handler can hit a reentrant write on stdout
            os.write(2, b"\nRunGuard: Ctrl-C: stopping when the running training step ends (during a validation: "
                        b"the step after it), then saving last.ckpt; Ctrl-C again stops at once without saving\n")

    # --- during training ----------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._boundary_step:
            return  # no optimizer step in this batch (accumulating): not a step boundary
        self._boundary_step = step
        self._stepped = True
        stop = self._agreed_stop(trainer)
        if stop:
            self._stop(trainer, stop)
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._saved_step:
            self.save(trainer, LAST)

    def _agreed_stop(self, trainer: pl.Trainer) -> int:
        """The stop request of any rank (the strongest one), the same on every rank; 0: go on. Every rank calls it at
        every step boundary (one one-element all-reduce per step under DDP)."""
        if trainer.world_size == 1:
            return self._request
        flag = torch.tensor([float(self._request)], device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    def _stop(self, trainer: pl.Trainer, stop: int) -> None:
        """Every rank, at the same step boundary: save ``last.ckpt`` once, say so, and leave ``fit``."""
        self._stopping = stop
        step = trainer.global_step
        written = self.save(trainer, LAST)  # a new boundary: never saved at this step yet
        if trainer.is_global_zero:
            path = os.path.join(self.dirpath, LAST)
            label = _LABELS[stop] if stop == self._request else f"{_LABELS[stop]} sent to another process"
            if written:
                _say(f"RunGuard: stopped at step {step} ({label}); last.ckpt holds step {step}: resume from {path}")
            else:
                _say(f"RunGuard: stopped at step {step} ({label}); last.ckpt NOT written (the weights are not "
                     f"finite); {self._describe(trainer, path)}")
        if stop == _CTRL_C:
            raise KeyboardInterrupt  # Lightning: on_exception, teardown, exit 1
        raise SIGTERMException()  # a SystemExit: exit 0

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._stopping:
            return  # RunGuard's own stop: saved and reported already
        if not self._started:
            _say(f"RunGuard: training had not started ({type(exception).__name__}); no checkpoint written, "
                 "the existing ones are untouched")
            return
        if isinstance(exception, KeyboardInterrupt):
            # Only an interrupt RunGuard did not defer gets here: before the first step boundary (nothing to keep)
            # or a second Ctrl-C (a half-done step, and under DDP the ranks are at different points: no collective).
            when = (f"before the first step of this run ended (step {trainer.global_step})" if not self._stepped
                    else f"during the step after {self._boundary_step}")
            if trainer.is_global_zero:
                _say(f"RunGuard: interrupted {when}; no checkpoint written, "
                     f"{self._describe(trainer, os.path.join(self.dirpath, LAST))}")
            return
        if trainer.global_step == self._saved_step:
            return  # nothing new since the last save (or the restored checkpoint)
        if isinstance(exception, SIGTERMException):
            # Lightning's own SIGTERM stop (its handler ran because RunGuard's could not be installed): it raises at
            # a batch boundary, but under DDP not necessarily on every rank together, so only one process saves.
            if trainer.world_size == 1 and self.save(trainer, LAST):
                _say(f"RunGuard: stopped at step {trainer.global_step} (SIGTERM); resume from "
                     f"{os.path.join(self.dirpath, LAST)}")
        elif getattr(exception, "one_line", False):
            return  # the project's own errors (a diverged loss, bad input): the model is not worth keeping
        elif trainer.world_size == 1:  # under several processes the others may be stuck in a collective
            if self.save(trainer, CRASH):
                _say(f"RunGuard: {type(exception).__name__} at step {trainer.global_step}; state saved to "
                     f"{os.path.join(self.dirpath, CRASH)} (last.ckpt left as it was)")

    # --- saving -------------------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, filename: str) -> bool:
        """Save the whole training state through the atomic IO (collective under DDP: every rank calls it at the
        same point). False when the IO refused it (non-finite weights; only rank 0 knows, the others get True)."""
        io = self._io(trainer)
        if io is not None:
            io.refusal = None
        # the whole state (weights_only=False), said explicitly: unset, Lightning logs "`weights_only` was not set"
        trainer.save_checkpoint(os.path.join(self.dirpath, filename), weights_only=False)
        self._saved_step = trainer.global_step
        return io is None or io.refusal is None

    @staticmethod
    def _io(trainer: pl.Trainer) -> Optional[AtomicCheckpointIO]:
        io = trainer.strategy.checkpoint_io
        return io if isinstance(io, AtomicCheckpointIO) else None

    def _describe(self, trainer: pl.Trainer, path: str) -> str:
        io = self._io(trainer)
        if io is not None:
            return io.describe(path)
        return f"{os.path.basename(path)} is kept as it was" if os.path.isfile(path) else \
            f"there is no {os.path.basename(path)}"


@rank_zero_only
def _say(message: str) -> None:
    """One line on stdout from rank 0 (printed, not logged: it must show however quiet Lightning's logging is)."""
    print(message, flush=True)
