"""latent-diffusion's ``VQModel`` with the shared rotation-trick quantizer, trained under Lightning 2.

``RotationVQModel`` (config ``target: adapters.integrations.ldm.RotationVQModel``) takes upstream ``VQModel``'s
arguments plus

  gradient: ste | rotation | rotation_released | reflection | rotation_unscaled  (see adapters.quantizer)
  quantizer_config: {beta, legacy, use_norm, search, search_chunk_size, search_max_bytes, track_stats, codebook_init,
                     kmeans_iters, codebook_update, ema_decay, ema_eps, dead_code_threshold, dead_code_every,
                     codebook_param, simvq_learn_codebook}  (optional; upstream's beta 0.25; the collapse remedies
                     are README's table, "The quantizer and its gradient options")
  trust_checkpoint: false | true  (ckpt_path: load with weights_only=False if the file needs it;
                                   adapters.runtime.safe_load)

and keeps upstream's state-dict keys, so latent-diffusion's and the authors' VQGAN checkpoints load with no missing
or unexpected keys; ``gradient: ste`` is upstream ``VQModel`` numerically.

``GumbelVQModel`` is the Gumbel-softmax baseline of Table 3 (taming's ``GumbelQuantize`` after the same encoder and
``quant_conv``, temperature annealed by ``temperature_scheduler_config``).

Training uses Lightning 2 manual optimisation and reproduces what Lightning 1.4 did with upstream's two optimizers
per batch: the autoencoder step (loss with ``optimizer_idx=0``, discriminator frozen), then a fresh forward and the
discriminator step (``optimizer_idx=1``, autoencoder frozen), both at the same ``global_step``, which counts batches
as upstream; step-interval lr schedulers step once per batch. With ``update_every = N`` (latent-diffusion's
``main.py`` sets it from ``accumulate_grad_batches``, which Lightning 2 refuses under manual optimisation) the
gradients of N batches accumulate (each loss / N) and both optimizers, the schedulers and ``global_step`` advance
once per N batches and at an epoch's last batch, as Lightning 1.4 accumulated. A NaN or infinite loss stops the run
with ``adapters.runtime.errors.NonFiniteLossError`` before it is back-propagated.

Logged besides upstream's keys (``train/`` per batch and as epoch means, ``val/`` as validation means):
``{split}/codebook_usage`` (fraction of the codebook a batch uses), ``{split}/perplexity``, ``{split}/quant_error``
(mean ||e - q||^2), ``{split}/used_codes``, ``{split}/dead_codes``; and accumulated over a whole training epoch or a
whole validation run (all ranks): ``{split}/codebook_usage_total``, ``{split}/perplexity_total``, ... .
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from taming.modules.vqvae.quantize import GumbelQuantize
from torch import Tensor, nn

from adapters.integrations.upstream import upstream_imports

with upstream_imports("ldm"):  # a missing third_party/latent-diffusion: one error naming the tree
    from ldm.models.autoencoder import VQModel
    from ldm.modules.ema import LitEma
    from ldm.util import instantiate_from_config
from adapters.integrations.lightning_compat import AccumulatedUpdate, allow_numpy_scalars_in_checkpoints
from adapters.evaluation.codebook_logging import CodebookLoggingMixin
from adapters.quantizer import GRADIENTS, CodebookStats, RotationVectorQuantizer, codebook_updates_paused

QUANTIZER_OPTIONS = ("beta", "legacy", "use_norm", "search", "search_chunk_size", "search_max_bytes", "track_stats",
                     "codebook_init", "kmeans_iters", "codebook_update", "ema_decay", "ema_eps", "dead_code_threshold",
                     "dead_code_every", "codebook_param", "simvq_learn_codebook")
# What a diverged run's error (NonFiniteLossError) tells the user to change, in latent-diffusion main.py's terms.
LR_OPTION = "model.base_learning_rate"
RESUME_OPTION = "-r logs/<run>, or -r with one of its checkpoints/*.ckpt"


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class RotationVQModel(CodebookLoggingMixin, VQModel):
    """Upstream ``VQModel`` with ``RotationVectorQuantizer`` in ``self.quantize`` (see the module docstring).

    Input batches: ``batch[image_key]`` float (B, H, W, 3) in [-1, 1]; ``forward(x (B, 3, H, W))`` returns
    ``(reconstruction (B, 3, H, W), codebook loss)`` as upstream.
    """

    codebook_attr = "quantize"
    usage_picture_range = (-1.0, 1.0)  # latent-diffusion's ImageLogger maps [-1, 1] to pixels

    def __init__(self, ddconfig: dict, lossconfig: dict, n_embed: int, embed_dim: int, *args: Any,
                 gradient: str = "rotation", quantizer_config: Optional[dict] = None,
                 ckpt_path: Optional[str] = None, ignore_keys: Optional[list] = None, trust_checkpoint: bool = False,
                 **kwargs: Any) -> None:
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r} in model.params.gradient; choose one of {GRADIENTS}")
        qcfg = dict(quantizer_config or {})
        unknown = sorted(set(qcfg) - set(QUANTIZER_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} in model.params.quantizer_config; known: "
                             f"{list(QUANTIZER_OPTIONS)}")
        upstream_options = set(inspect.signature(VQModel.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - upstream_options)
        if unknown:
            hint = " (the authors' rot_trick: true is gradient: rotation_released)" if "rot_trick" in unknown else ""
            raise ValueError(f"unknown option(s) {unknown} in model.params of {type(self).__name__}{hint}; known: "
                             f"gradient, quantizer_config, trust_checkpoint, {', '.join(sorted(upstream_options))}")
        # The checkpoint is loaded after the quantizer swap (upstream loads it inside its __init__).
        super().__init__(ddconfig, lossconfig, n_embed, embed_dim, *args, **kwargs)
        allow_numpy_scalars_in_checkpoints()  # upstream's lr schedules store numpy floats; -r must read them
        if not _accepts(self.loss.forward, "predicted_indices"):
            raise ValueError(f"{type(self.loss).__module__}.{type(self.loss).__name__} does not accept the "
                             "predicted_indices argument that latent-diffusion's VQModel passes to its loss; use "
                             "lossconfig.target: adapters.integrations.losses.VQLPIPSWithDiscriminator (taming's loss; "
                             "latent-diffusion's "
                             "own ldm.modules.losses.vqperceptual loss fails at its first forward at the pinned "
                             "commit)")
        self.gradient = gradient
        self.quantize = self.build_quantizer(self.quantize, n_embed, embed_dim, ddconfig, gradient, qcfg,
                                             kwargs.get("remap"), kwargs.get("sane_index_shape", False))
        if self.use_ema:  # shadow the new quantizer's parameters
            self.model_ema = LitEma(self)
        self.trust_checkpoint = bool(trust_checkpoint)  # a plain attribute: not in the state dict
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys or []))
        self.automatic_optimization = False
        self.update_every = 1  # main.py sets it from accumulate_grad_batches; gradients accumulate over N batches

    def init_from_ckpt(self, path: str, ignore_keys: tuple | list = ()) -> None:
        """Upstream's ``init_from_ckpt`` (``ckpt_path:``), loading through ``adapters.runtime.safe_load``: a checkpoint
        that needs more than weights and Lightning's data types is refused unless ``trust_checkpoint: true``."""
        from adapters.runtime.safe_load import load_checkpoint

        sd = load_checkpoint(path, trust=getattr(self, "trust_checkpoint", False),
                             opt_in="set model.params.trust_checkpoint: true")["state_dict"]
        for k in list(sd.keys()):
            if any(k.startswith(ik) for ik in ignore_keys):
                print(f"Deleting key {k} from state_dict.")
                del sd[k]
        missing, unexpected = self.load_state_dict(sd, strict=False)
        print(f"Restored from {path} with {len(missing)} missing and {len(unexpected)} unexpected keys")
        if len(missing) > 0:
            print(f"Missing Keys: {missing}")
            print(f"Unexpected Keys: {unexpected}")

    # --- quantizer and its statistics ---------------------------------------------------------------------------
    def build_quantizer(self, upstream: nn.Module, n_embed: int, embed_dim: int, ddconfig: dict, gradient: str,
                        qcfg: dict, remap: Optional[str], sane_index_shape: bool) -> nn.Module:
        """The shared quantizer, starting from upstream's codebook (same initial draw for a given seed)."""
        beta = qcfg.pop("beta", 0.25)
        with torch.random.fork_rng(devices=[]):  # leave the RNG stream where upstream's would be
            quantizer = RotationVectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap,
                                                sane_index_shape=sane_index_shape, gradient=gradient, **qcfg)
        quantizer.adopt_initial_codebook(upstream)
        return quantizer

    # --- training ------------------------------------------------------------------------------------------------
    def before_train_step(self) -> None:
        """Hook run before each batch's updates (the Gumbel baseline anneals its temperature here)."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt_ae, opt_disc = self.optimizers()
        update = AccumulatedUpdate(self, batch_idx, LR_OPTION, RESUME_OPTION)  # steps every update_every batches
        step = update.step  # both losses see the same step, as under Lightning 1.4
        self.before_train_step()
        x = self.get_input(batch, self.image_key)

        # autoencoder (upstream's optimizer_idx 0)
        self.toggle_optimizer(opt_ae)
        xrec, qloss, ind = self(x, return_pred_indices=True)
        aeloss, log_dict_ae = self.loss(qloss, x, xrec, 0, step, last_layer=self.get_last_layer(), split="train",
                                        predicted_indices=ind)
        update.backward(opt_ae, aeloss, "train/total_loss", counted=True)  # one global step per update
        self.untoggle_optimizer(opt_ae)
        self.log_dict(log_dict_ae, prog_bar=False, logger=True, on_step=True, on_epoch=True)
        self.log_codebook_batch("train", skip=log_dict_ae)  # taming's loss may log perplexity itself

        # discriminator (optimizer_idx 1): Lightning 1.4 ran training_step again, after the autoencoder update; this
        # repeat of the batch neither counts codes nor updates an EMA codebook or restarts codes a second time
        self.toggle_optimizer(opt_disc)
        with torch.no_grad(), self._no_stats(), codebook_updates_paused(self.quantize):
            xrec, qloss, ind = self(x, return_pred_indices=True)
        discloss, log_dict_disc = self.loss(qloss, x, xrec, 1, step, last_layer=self.get_last_layer(),
                                            split="train")
        update.backward(opt_disc, discloss, "train/disc_loss", counted=False)  # Lightning 1.4 counted only one
        self.untoggle_optimizer(opt_disc)
        self.log_dict(log_dict_disc, prog_bar=False, logger=True, on_step=True, on_epoch=True)

        update.finish()
        return aeloss.detach()

    def log_images(self, batch: dict, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Upstream's inputs and reconstructions (B, 3, H, W) in [-1, 1], plus the codebook-usage picture of this
        split so far; the image logger's extra forward is not counted."""
        with self._no_stats():
            log = super().log_images(batch, *args, **kwargs)
        return self.with_usage_picture(log) if not kwargs.get("only_inputs") else log

    # --- validation ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        log_dict = self._validation_step(batch, batch_idx)
        self.log_codebook_batch("val")
        with self.ema_scope(), self._no_stats():
            self._validation_step(batch, batch_idx, suffix="_ema")
        return log_dict


class GumbelVQModel(RotationVQModel):
    """Table 3's Gumbel VQGAN: taming's ``GumbelQuantize`` (straight-through hard samples, KL to the uniform prior
    weighted by ``kl_weight``) on upstream's encoder/decoder, trained like ``RotationVQModel``.

    ``temperature_scheduler_config`` (optional): a ``target:`` callable of the global step giving the temperature,
    e.g. ``ldm.lr_scheduler.LambdaWarmUpCosineScheduler`` as in taming's Gumbel configs; constant 1.0 without it.
    The statistics have no ``quant_error`` (a Gumbel sample is not a nearest code).
    """

    codebook_log_exclude = ("quant_error",)

    def __init__(self, *args: Any, kl_weight: float = 1e-8, temperature_scheduler_config: Optional[dict] = None,
                 temp_init: float = 1.0, straight_through: bool = True, **kwargs: Any) -> None:
        self._gumbel = dict(kl_weight=kl_weight, temp_init=temp_init, straight_through=straight_through)
        kwargs.setdefault("gradient", "ste")
        if kwargs["gradient"] != "ste":
            raise ValueError("GumbelVQModel has no nearest-code estimator to choose: leave model.params.gradient "
                             "unset (or ste)")
        super().__init__(*args, **kwargs)
        self.temperature_scheduler = (instantiate_from_config(temperature_scheduler_config)
                                      if temperature_scheduler_config is not None else None)

    def build_quantizer(self, upstream: nn.Module, n_embed: int, embed_dim: int, ddconfig: dict, gradient: str,
                        qcfg: dict, remap: Optional[str], sane_index_shape: bool) -> nn.Module:
        if qcfg:
            raise ValueError(f"quantizer_config {sorted(qcfg)} does not apply to GumbelVQModel; use kl_weight, "
                             "temp_init, straight_through, temperature_scheduler_config")
        # quant_conv maps z_channels -> embed_dim, so the Gumbel logits are computed from embed_dim channels.
        quantizer = GumbelQuantize(embed_dim, embed_dim, n_embed=n_embed, remap=remap, **self._gumbel)
        quantizer.stats = CodebookStats(n_embed)
        quantizer.track_stats = True
        return quantizer

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
        quant, emb_loss, info = super().encode(x)
        if self.quantize.track_stats:
            ind = info[2].reshape(-1)
            empty = quant.new_zeros(ind.numel(), 1)
            self.quantize.stats.update(ind, empty, empty)
        return quant, emb_loss, info

    def before_train_step(self) -> None:
        if self.temperature_scheduler is not None:
            self.quantize.temperature = float(self.temperature_scheduler(self.global_step))
        self.log("train/temperature", float(self.quantize.temperature), logger=True, on_step=True, on_epoch=False)
