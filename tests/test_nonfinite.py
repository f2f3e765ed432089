"""A NaN or infinite training loss stops both wrappers with NonFiniteLossError before it reaches the weights.

Issue 11: ``main.py ... model.base_learning_rate=10 ...disc_start=0`` used to train on with NaN losses and exit 0.
Now each loss is checked before its backward (adapters.integrations.lightning_compat.AccumulatedUpdate.check_finite);
the error names the loss's log key, the step and what to try. Models, data and the Trainer come from
test_accumulation.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from adapters.runtime.errors import NonFiniteLossError
from adapters.integrations.lightning_compat import AccumulatedUpdate
from conftest import LDM_TREE, ROOT, requires_ldm
from test_accumulation import KINDS, build, fit, images

LR_OPTION = {"ldm": "model.base_learning_rate", "vit": "-lr"}


class Snapshots(pl.Callback):
    """The module's parameters at the end of every training batch, and the trainer's optimizers."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizers = list(trainer.optimizers)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def assert_finite_state(model: pl.LightningModule, snaps: Snapshots) -> None:
    """Weights and both optimizers' states hold no NaN or infinity (a checkpoint taken now could be resumed)."""
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert len(snaps.optimizers) == 2
    for opt in snaps.optimizers:
        for state in opt.state.values():
            for value in state.values():
                assert torch.isfinite(torch.as_tensor(value)).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("every, nan_batch, step", [(1, 2, 2), (2, 3, 1)])
def test_nan_in_the_data_stops_before_the_autoencoder_update(kind: str, every: int, nan_batch: int, step: int,
                                                             tmp_path: Path) -> None:
    """One NaN pixel in batch ``nan_batch`` (with update_every 2: the second batch of a window, whose first batch's
    gradients are already accumulated): the autoencoder loss is NaN, the run stops there, and no weight changed
    since the previous batch."""
    items = images(kind, 10)
    items[2 * nan_batch]["image"].view(-1)[0] = float("nan")
    model, snaps = build(kind, disc_start=0), Snapshots()
    with pytest.raises(NonFiniteLossError) as err:
        fit(model, items, batch_size=2, update_every=every, root=tmp_path, callbacks=[snaps])
    message = str(err.value)
    assert message.startswith(f"train/total_loss is nan at step {step} (epoch 0, batch {nan_batch});")
    assert LR_OPTION[kind] in message and "-r " in message and "check the training data" in message
    assert len(snaps.after) == nan_batch
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snaps.after[-1][name]), name  # nothing stepped at the NaN batch
    assert_finite_state(model, snaps)


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_discriminator_loss_stops_before_the_discriminator_update(kind: str, tmp_path: Path) -> None:
    """The discriminator loss (upstream's ``disc_loss(logits_real, logits_fake)``, two arguments, once per batch;
    enhancing's generator loss calls it with one) made NaN from batch 2 on: the error names ``train/disc_loss``
    and the discriminator's weights are those of the end of batch 1."""
    model, snaps = build(kind, disc_start=0), Snapshots()
    disc_loss, calls = model.loss.disc_loss, []

    def nan_from_batch_2(*logits: torch.Tensor) -> torch.Tensor:
        loss = disc_loss(*logits)
        if len(logits) == 2:
            calls.append(1)
            loss = loss * float("nan") if len(calls) > 2 else loss
        return loss

    model.loss.disc_loss = nan_from_batch_2
    with pytest.raises(NonFiniteLossError, match=r"^train/disc_loss is nan at step 2 \(epoch 0, batch 2\);"):
        fit(model, images(kind, 10), batch_size=2, update_every=1, root=tmp_path, callbacks=[snaps])
    assert len(snaps.after) == 2
    for name, p in model.loss.discriminator.named_parameters():
        assert torch.equal(p.detach(), snaps.after[-1][f"loss.discriminator.{name}"]), name
    assert_finite_state(model, snaps)


@requires_ldm
@pytest.mark.ldm
def test_the_issue_learning_rate_stops_at_its_first_non_finite_loss(tmp_path: Path) -> None:
    """Issue 11's run in-process: configs/tiny_rot_vqgan.yaml at lr 10 x batch 4, discriminator from step 0. Every
    loss logged before the error was finite, and the weights still are."""
    model, snaps = build("ldm", disc_start=0, lr=40.0), Snapshots()
    logged: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            logged.extend(float(trainer.callback_metrics[k]) for k in ("train/total_loss_step",
                                                                       "train/disc_loss_step"))

    with pytest.raises(NonFiniteLossError) as err:
        fit(model, images("ldm", 80), batch_size=4, update_every=1, root=tmp_path, callbacks=[Losses(), snaps])
    key, _, rest = str(err.value).partition(" is ")
    assert key in ("train/total_loss", "train/disc_loss")
    batches = len(logged) // 2
    assert 0 < batches < 20 and f"at step {batches} (epoch 0, batch {batches})" in rest
    assert all(torch.isfinite(torch.tensor(logged)))
    assert_finite_state(model, snaps)


def _fake_module(bad_elsewhere: bool) -> Any:
    """What AccumulatedUpdate reads from a LightningModule; ``strategy.reduce`` sums a flag over 2 processes."""
    other = torch.tensor(float(bad_elsewhere))
    strategy = SimpleNamespace(reduce=lambda flag, reduce_op: flag + other)
    return SimpleNamespace(trainer=SimpleNamespace(strategy=strategy, is_last_batch=False), global_step=7,
                           current_epoch=1, update_every=1)


def test_every_process_stops_at_the_same_check() -> None:
    """Under DDP the finiteness flag is summed over processes: a process whose own loss is finite stops too, and
    says the loss was not finite on another process; nothing stops when all are finite."""
    update = AccumulatedUpdate(_fake_module(bad_elsewhere=False), 3, "-lr", "-r x.ckpt")
    update.check_finite("train/total_loss", torch.tensor(1.5))
    with pytest.raises(NonFiniteLossError, match=r"^train/total_loss is inf at step 7 \(epoch 1, batch 3\);"):
        update.check_finite("train/total_loss", torch.tensor(float("inf")))
    elsewhere = AccumulatedUpdate(_fake_module(bad_elsewhere=True), 3, "-lr", "-r x.ckpt")
    with pytest.raises(NonFiniteLossError, match=r"^train/disc_loss is not finite on another process at step 7"):
        elsewhere.check_finite("train/disc_loss", torch.tensor(0.25))


@requires_ldm
@pytest.mark.ldm
@pytest.mark.slow
@pytest.mark.longrun
def test_the_issue_command_exits_1_with_one_line(tmp_path: Path) -> None:
    """The issue's command through the patched latent-diffusion main.py: exit status 1 and one line naming the
    loss, the step and what to try, instead of 35 NaN steps and exit 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(LDM_TREE / "main.py"), "-l", str(tmp_path / "logs"), "--base",
         "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_steps=40", "model.base_learning_rate=10",
         "model.params.lossconfig.params.disc_start=0", "data.params.validation.params.length=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "NonFiniteLossError" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("main.py: NonFiniteLossError: train/")
    assert "model.base_learning_rate" in lines[0] and "-r logs/<run>" in lines[0]
