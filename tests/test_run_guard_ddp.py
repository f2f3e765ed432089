"""RunGuard's stops, in a tiny Lightning model on the CPU (no upstream tree needed).

- Ctrl-C (issue 16, item 1): before the first step of a run ends it writes nothing (a resume leaves ``last.ckpt``
  byte-identical); after it, exactly one save, at the step the running batch ends, and the message says so; a
  second Ctrl-C stops at once without saving.
- A refused save (item 11): non-finite weights are not written, and the stop says so, with the step ``last.ckpt``
  still holds, instead of "resume from last.ckpt".
- DDP (item 7): two gloo processes; SIGTERM sent to one of them in the middle of a batch; both stop at the same
  step and leave one checkpoint of that step (Lightning 2's own handler broadcast from inside the signal handler and
  let each rank act on its own flag: the ranks split and hung).

The main.py side (upstream's Ctrl-C save, dropped by patch 0022) is tested in test_long_runs.py.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapters.runtime.run_guard import AtomicCheckpointIO, RunGuard
from conftest import ROOT


class Tiny(pl.LightningModule):
    """One linear layer; ``pause`` seconds in every training step (so that a signal lands mid-batch); with ``marks``,
    each rank writes ``"<pid> <global_step>"`` to ``<marks>/rank<r>`` as a step begins."""

    def __init__(self, pause: float = 0.0, marks: str = "") -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.pause, self.marks = pause, marks

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.marks:
            with open(os.path.join(self.marks, f"rank{self.global_rank}"), "w") as f:
                f.write(f"{os.getpid()} {self.global_step}")
        time.sleep(self.pause)
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(0))), batch_size=2)


class Probe(pl.Callback):
    """Sends this process ``signum`` in ``on_fit_start`` (``None`` in ``at_step``) or at the start of the batch
    that begins at step N (N in ``at_step``; once per entry); makes the weights NaN at the end of the batch that
    reaches ``poison_at``; logs every checkpoint write RunGuard's IO is asked for as ``(file name, global_step)``."""

    def __init__(self, at_step: list[Optional[int]], signum: int = signal.SIGINT,
                 poison_at: Optional[int] = None) -> None:
        self.at_step, self.signum, self.poison_at = at_step, signum, poison_at
        self.saves: list[tuple[str, int]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        io = trainer.strategy.checkpoint_io  # RunGuard.setup installed the atomic IO; no save happened yet
        assert isinstance(io, AtomicCheckpointIO)
        save = io.save_checkpoint

        def logged(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            self.saves.append((os.path.basename(path), checkpoint["global_step"]))
            save(checkpoint, path, storage_options)

        io.save_checkpoint = logged  # type: ignore[method-assign]
        if None in self.at_step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for _ in range(self.at_step.count(trainer.global_step)):
            os.kill(os.getpid(), self.signum)
            time.sleep(0.01)  # let the handler run before the next one

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.poison_at:  # before RunGuard's hook (later in the list) saves
            with torch.no_grad():
                pl_module.layer.weight.fill_(float("nan"))


def fit(tmp_path: Path, probe: Probe, max_steps: int, every: int = 0, ckpt: Optional[Path] = None) -> None:
    guard = RunGuard(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=every)
    callbacks = [probe, guard]  # the probe's batch-end poison before the guard's save
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), data(), ckpt_path=str(ckpt) if ckpt else None)


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]  # written by this test


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Any:
    """A failing test must not leave RunGuard's (or an ignored) SIGINT/SIGTERM handler behind in pytest."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    # Ctrl-C as in a terminal's foreground: pytest started as a background job (nohup ... &) has SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """last.ckpt of a finished 3-step run."""
    fit(tmp_path, Probe([]), max_steps=3, every=3)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 3
    return last


@pytest.mark.parametrize("when", ["on_fit_start", "first_batch"])
def test_ctrl_c_during_a_resume_before_its_first_step_writes_nothing(trained: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture, when: str) -> None:
    before = digest(trained)
    probe = Probe([None] if when == "on_fit_start" else [3])
    with pytest.raises(SystemExit) as stop:  # Lightning turns a KeyboardInterrupt into exit 1
        fit(tmp_path, probe, max_steps=10, every=1, ckpt=trained)
    assert stop.value.code == 1
    assert probe.saves == [] and digest(trained) == before
    out = capsys.readouterr().out
    assert "no checkpoint written" in out, out
    if when == "first_batch":
        assert "before the first step of this run ended (step 3); no checkpoint written, last.ckpt holds step 3" in out


def test_ctrl_c_after_a_step_saves_once_at_the_step_it_finishes(trained: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    probe = Probe([5])  # Ctrl-C at the start of the batch that makes step 6
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, probe, max_steps=20, ckpt=trained)
    assert stop.value.code == 1
    assert probe.saves == [("last.ckpt", 6)]  # one save, RunGuard's, at the step the running batch completed
    assert step_of(trained) == 6
    out = capsys.readouterr().out
    assert f"RunGuard: stopped at step 6 (Ctrl-C); last.ckpt holds step 6: resume from {trained}" in out, out


def test_second_ctrl_c_stops_at_once_without_saving(trained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    before = digest(trained)
    probe = Probe([5, 5])
    with pytest.raises(SystemExit):
        fit(tmp_path, probe, max_steps=20, ckpt=trained)
    assert probe.saves == [] and digest(trained) == before
    out = capsys.readouterr().out
    assert "interrupted during the step after 5; no checkpoint written, last.ckpt holds step 3" in out, out


def test_refused_save_at_a_stop_reports_the_step_last_ckpt_holds(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 recwarn: pytest.WarningsRecorder) -> None:
    # interval saves at steps 1 and 2; SIGTERM during the third batch; its weights turn NaN before the stop's save
    probe = Probe([2], signum=signal.SIGTERM, poison_at=3)
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, probe, max_steps=20, every=1)
    assert stop.value.code in (0, None)  # SIGTERM: exit 0
    last = tmp_path / "ckpt" / "last.ckpt"
    assert probe.saves == [("last.ckpt", 1), ("last.ckpt", 2), ("last.ckpt", 3)]
    assert step_of(last) == 2  # the refused one was not written
    out = capsys.readouterr().out
    assert "RunGuard: stopped at step 3 (SIGTERM); last.ckpt NOT written (the weights are not finite); " \
           "last.ckpt holds step 2" in out, out
    assert "resume from" not in out
    assert any("not writing" in str(w.message) and "(step 3)" in str(w.message) and "last.ckpt holds step 2"
               in str(w.message) for w in recwarn), [str(w.message) for w in recwarn]


def test_atomic_io_describes_what_a_file_holds(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    assert io.describe(path) == "there is no last.ckpt"
    torch.save({"global_step": 7, "state_dict": {}}, path)  # not written by this IO: read back (weights-only)
    assert io.describe(path) == "last.ckpt holds step 7"
    io.save_checkpoint({"global_step": 9, "state_dict": {"w": torch.ones(2)}}, path)
    assert io.describe(path) == "last.ckpt holds step 9" and step_of(path) == 9
    io.save_checkpoint({"global_step": 10, "state_dict": {"w": torch.tensor([float("inf")])}}, path)
    assert io.refusal is not None and io.refusal.step == 10 and io.refusal.keys == ["w"]
    assert step_of(path) == 9
    path.write_bytes(b"not a checkpoint")
    io.steps.clear()
    assert io.describe(path) == "last.ckpt is kept as it was (its step could not be read)"


DDP_SCRIPT = '''
import os
import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapters.runtime.run_guard import RunGuard
from test_run_guard_ddp import Tiny

out = sys.argv[1]
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=500, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[RunGuard(dirpath=os.path.join(out, "ckpt"))], default_root_dir=out)
try:
    trainer.fit(Tiny(pause=0.25, marks=out), DataLoader(TensorDataset(torch.randn(4000, 4)), batch_size=2))
finally:  # SIGTERM's stop is a SystemExit: this still runs, on both ranks
    with open(os.path.join(out, f"exit{trainer.global_rank}"), "w") as f:
        f.write(str(trainer.global_step))
'''


def mark(path: Path) -> Optional[tuple[int, int]]:
    """(pid, global_step) a rank wrote at the start of its running training step."""
    try:
        pid, step = path.read_text().split()
        return int(pid), int(step)
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.parametrize("target", [1, 0])
def test_ddp_sigterm_to_one_rank_mid_batch_stops_both_at_one_checkpoint(tmp_path: Path, target: int) -> None:
    (tmp_path / "ddp_stop.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "run.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "ddp_stop.py"), str(tmp_path)], cwd=tmp_path,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.time() + 40
        while True:  # both ranks past step 2, then the target's next step begins: signal it inside that step
            assert proc.poll() is None and time.time() < end, log.read_text()[-3000:]
            marks = [mark(tmp_path / f"rank{r}") for r in (0, 1)]
            if all(m and m[1] >= 2 for m in marks):
                break
            time.sleep(0.02)
        pid, step = marks[target]
        while mark(tmp_path / f"rank{target}") == (pid, step):
            time.sleep(0.005)
        os.kill(pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
        end = time.time() + 10
        while not all((tmp_path / f"exit{r}").exists() for r in (0, 1)) and time.time() < end:
            time.sleep(0.05)
    except (subprocess.TimeoutExpired, AssertionError):
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 included: it is rank 0's child, in the same session
        raise AssertionError(f"the ranks did not stop together (hang):\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    exits = [int((tmp_path / f"exit{r}").read_text()) for r in (0, 1)]
    assert exits[0] == exits[1] > step, (exits, step, out[-3000:])  # the same step, after the signalled one began
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == exits[0]
    how = "SIGTERM" if target == 0 else "SIGTERM sent to another process"
    assert f"RunGuard: stopped at step {exits[0]} ({how}); last.ckpt holds step {exits[0]}" in out, out[-3000:]
