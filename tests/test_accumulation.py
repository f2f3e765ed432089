"""Gradient accumulation (``update_every``) of RotationVQModel and RotationViTVQ under a real Lightning Trainer on CPU.

Lightning 2 refuses ``accumulate_grad_batches`` for models that optimise manually; the patched main.py files set
``model.update_every = N`` instead and the wrappers accumulate as Lightning 1.x did
(adapters.integrations.lightning_compat's ``AccumulatedUpdate``): loss / N per batch, both optimizers stepped at every
N-th batch and at an epoch's last batch, the lr schedulers and ``global_step`` once per update.

Both models are built in-process from configs/tiny_*.yaml; the images are fixed random tensors, in the batch format
each codebase expects (latent-diffusion ``{"image": (B, H, W, 3) in [-1, 1]}``, enhancing ``{"image": (B, 3, H, W)
in [0, 1]}``), and the loader never shuffles, so every run sees the same batches in the same order. The helpers
here are shared with test_nonfinite.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import ROOT, requires_enhancing, requires_ldm

CONFIGS = ROOT / "configs"
KINDS = [pytest.param("ldm", marks=[requires_ldm, pytest.mark.ldm]),
         pytest.param("vit", marks=[requires_enhancing, pytest.mark.enhancing])]
SIZE = {"ldm": 32, "vit": 16}  # the VQGAN is convolutional (32 px for speed: 8 x 8 latents); the ViT's is fixed


def build(kind: str, disc_start: int, lr: float = 1e-3, seed: int = 0, scheduler: bool = False) -> pl.LightningModule:
    """The model of configs/tiny_rot_vqgan.yaml (``ldm``) or configs/tiny_rot_vitvqgan.yaml (``vit``), built as
    its main.py builds it, with ``disc_start`` and the learning rate set; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if kind == "ldm":
        from ldm.util import instantiate_from_config

        cfg = OmegaConf.load(CONFIGS / "tiny_rot_vqgan.yaml").model
        cfg.params.lossconfig.params.disc_start = disc_start
        if scheduler:
            cfg.params.scheduler_config = {"target": "ldm.lr_scheduler.LambdaLinearScheduler", "params": {
                "warm_up_steps": [2], "cycle_lengths": [10], "f_start": [0.1], "f_max": [1.0], "f_min": [1.0]}}
        model = instantiate_from_config(cfg)
    else:
        from enhancing.utils.general import initialize_from_config

        cfg = OmegaConf.load(CONFIGS / "tiny_rot_vitvqgan.yaml").model
        cfg.params.loss.params.disc_start = disc_start
        # The config's k-means init fits the codebook to the first batch the quantizer sees, which is one micro-batch
        # under accumulation and the whole window in the oracle: the draw, not accumulation, would differ.
        cfg.params.quantizer.codebook_init = "upstream"
        if scheduler:
            cfg.params.scheduler = {"target": "enhancing.utils.scheduler.LambdaWarmUpCosineScheduler", "params": {
                "warm_up_steps": 2, "max_decay_steps": 10, "min_": 0.1, "max_": 1.0, "start": 0.0}}
        model = initialize_from_config(cfg)
    model.learning_rate = lr
    return model


def images(kind: str, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """n fixed random images, one dict each, in ``kind``'s batch format."""
    g = torch.Generator().manual_seed(seed)
    s = SIZE[kind]
    if kind == "ldm":
        return [{"image": torch.rand(s, s, 3, generator=g) * 2 - 1} for _ in range(n)]
    return [{"image": torch.rand(3, s, s, generator=g)} for _ in range(n)]


def model_input(model: pl.LightningModule, items: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The model's input (B, 3, H, W) for these images, through the model's own ``get_input``."""
    return model.get_input({"image": torch.stack([it["image"] for it in items])}, "image")


class StepRecorder(pl.Callback):
    """Wraps every optimizer's ``step``: the batches at which each stepped, the autoencoder's gradients at each of
    its steps, and ``global_step`` at the start of every batch."""

    def __init__(self) -> None:
        self.batch_idx = -1
        self.steps: list[list[int]] = []
        self.ae_grads: list[dict[str, torch.Tensor]] = []
        self.global_steps: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.steps = [[] for _ in trainer.optimizers]
        for i, opt in enumerate(trainer.optimizers):
            params = [p for group in opt.param_groups for p in group["params"]]
            opt.step = self._wrap(i, opt.step, params, names)

    def _wrap(self, i: int, step: Callable, params: list, names: dict) -> Callable:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.steps[i].append(self.batch_idx)
            if i == 0:
                self.ae_grads.append({names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None})
            return step(*args, **kwargs)
        return recorded

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self.global_steps.append(trainer.global_step)


def fit(model: pl.LightningModule, items: list[dict[str, torch.Tensor]], batch_size: int, update_every: int,
        root: Path, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """One epoch over ``items`` (in order) with ``model.update_every`` set, as the patched main.py files set it."""
    model.update_every = update_every
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(root), callbacks=list(callbacks))
    trainer.fit(model, DataLoader(items, batch_size=batch_size, shuffle=False))
    return trainer


def ae_parameters(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The autoencoder's parameters (those of its first optimizer, upstream's ``optimizer_idx`` 0), by name."""
    disc = {id(p) for p in model.loss.discriminator.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in disc and p.requires_grad}


def ae_loss(kind: str, model: pl.LightningModule, x: torch.Tensor, step: int) -> torch.Tensor:
    """Upstream's autoencoder loss (``optimizer_idx`` 0) of input x (B, 3, H, W) at ``step``, called directly."""
    if kind == "ldm":
        xrec, qloss, ind = model(x, return_pred_indices=True)
        return model.loss(qloss, x, xrec, 0, step, last_layer=model.get_last_layer(), split="train",
                          predicted_indices=ind)[0]
    xrec, qloss = model(x)
    return model.loss(qloss, x, xrec, 0, step, 0, last_layer=model.decoder.get_last_layer(), split="train")[0]


# --- counting -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("every, step_batches", [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (3, [2, 4])])
def test_both_optimizers_step_once_per_update(kind: str, every: int, step_batches: list[int], tmp_path: Path) -> None:
    """5 batches, update_every N: each optimizer steps at every N-th batch and at the epoch's last one; global_step
    and the lr schedulers advance once per update (N = 1: every batch, as before accumulation existed)."""
    model = build(kind, disc_start=0, scheduler=True)
    rec = StepRecorder()
    trainer = fit(model, images(kind, 10), batch_size=2, update_every=every, root=tmp_path, callbacks=[rec])
    assert rec.steps == [step_batches, step_batches]  # autoencoder, discriminator
    updates = len(step_batches)
    assert trainer.global_step == updates
    assert rec.global_steps == [sum(b < i for b in step_batches) for i in range(5)]
    for sched in model.lr_schedulers():
        assert sched.last_epoch == updates


# --- the update equals one step on the concatenated batches ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_accumulated_update_equals_one_step_on_the_concatenated_batches(kind: str, tmp_path: Path) -> None:
    """Before the discriminator starts, 4 batches of 2 with update_every 2 make the same 2 autoencoder updates as
    plain PyTorch (upstream's loss and optimizer, no Lightning) makes on the 2 concatenations of 4 images: the
    gradient at each step and the weights after. Batch-mean losses make the mean of two halves' losses the loss of
    their concatenation; the tiny configs have no LPIPS, no dropout, per-sample normalisation in the autoencoder."""
    lr, disc_start = 1e-3, 1000
    items = images(kind, 8)
    model, oracle = build(kind, disc_start, lr), build(kind, disc_start, lr)
    initial = {n: p.detach().clone() for n, p in ae_parameters(oracle).items()}
    assert all(torch.equal(p, initial[n]) for n, p in ae_parameters(model).items())  # same initial weights

    rec = StepRecorder()
    trainer = fit(model, items, batch_size=2, update_every=2, root=tmp_path, callbacks=[rec])
    assert rec.steps[0] == [1, 3] and trainer.global_step == 2

    oracle.train()
    opt_ae = oracle.configure_optimizers()[0][0]  # upstream's autoencoder optimizer (Adam / AdamW)
    params = ae_parameters(oracle)
    oracle_grads = []
    for step, window in enumerate((items[:4], items[4:])):
        opt_ae.zero_grad()
        ae_loss(kind, oracle, model_input(oracle, window), step).backward()
        oracle_grads.append({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
        opt_ae.step()

    assert len(rec.ae_grads) == 2
    for got, want in zip(rec.ae_grads, oracle_grads):
        assert got.keys() == want.keys() and len(want) == len(params)
        for name in want:  # a missing / N would double these, a missing zero_grad add the first window's
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")

    # The weights, where Adam's update is a well-conditioned function of the gradient: its first steps are
    # about lr * g / (|g| + eps), which turns gradients at rounding-noise level (e.g. a conv bias right before a
    # one-channel-per-group GroupNorm, exactly 0 in exact arithmetic) into steps of order lr either way.
    trained = ae_parameters(model)
    kept = total = 0
    for name, p in params.items():
        mask = (oracle_grads[0][name].abs() > 1e-6) & (oracle_grads[1][name].abs() > 1e-6)  # 100 x Adam's eps
        kept, total = kept + int(mask.sum()), total + mask.numel()
        torch.testing.assert_close(trained[name].detach()[mask], p.detach()[mask], rtol=0, atol=1e-2 * lr,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert kept > 0.95 * total
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in params.items())
    assert moved > 1.5 * lr  # two Adam steps of about lr each: a third step or a missing one would show
