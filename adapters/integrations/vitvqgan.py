"""enhancing-transformers' ViT-VQGAN (``ViTVQ``) with the shared rotation-trick quantizer, trained under Lightning 2.

``RotationViTVQ`` (config ``target: adapters.integrations.vitvqgan.RotationViTVQ``) takes upstream ``ViTVQ``'s
arguments plus

  gradient: ste | rotation | rotation_released | reflection | rotation_unscaled   (see ``adapters.quantizer``)
  trust_checkpoint: false | true   (``path:`` loads with weights_only=False if the file needs it;
                                    adapters.runtime.safe_load)

and replaces upstream's ``VectorQuantizer`` by ``NormRotationQuantizer`` (l2-normalised lookup, same codebook,
same loss, same state-dict keys). ``gradient: ste`` is upstream ``ViTVQ`` numerically; ``rotation_released`` is the
authors' Table 4 code (``ROT_ViTVQ``): the raw ``pre_quant`` output is rotated onto the normalised codeword.
Upstream ``ViTVQ`` checkpoints, including the authors' released Table 4 one, load with no missing or unexpected keys.
``model.params.quantizer`` takes upstream's keys (``embed_dim, n_embed, beta, use_norm, ...``) plus the quantizer's
own: ``search``, ``codebook_init``, ``kmeans_iters``, ``track_stats``, and the collapse remedies ``codebook_update``,
``ema_decay``, ``ema_eps``, ``dead_code_threshold``, ``dead_code_every``, ``codebook_param``,
``simvq_learn_codebook`` (README's table); an unknown key is an error naming the valid ones.

Training is Lightning 2 manual optimisation reproducing what Lightning 1.5 did with upstream's two optimizers: per
batch, the autoencoder update (loss with ``optimizer_idx=0``, discriminator frozen), then a fresh forward pass and
the discriminator update (``optimizer_idx=1``, autoencoder frozen); both losses see the same step, which counts
batches (optimizer steps with ``update_every`` > 1) as upstream did. Optimizers (AdamW, betas (0.9, 0.99), weight
decay 1e-4) and schedulers are upstream's ``configure_optimizers``. A NaN or infinite loss stops the run with
``adapters.runtime.errors.NonFiniteLossError`` before it is back-propagated.

Logged besides upstream's keys: ``{split}/codebook_usage`` (fraction of the codebook used by a batch; its epoch mean
is the paper's per-batch usage), ``{split}/quant_error`` (mean ||e - q||^2 between normalised vectors),
``{split}/perplexity``, ``{split}/used_codes``, ``{split}/dead_codes``; the same accumulated over a whole training
epoch or validation run across all ranks with the suffix ``_total``; and a ``codebook_usage`` picture beside the
reconstructions (one pixel per code, brightness log(1 + count), black = unused).

Also here: ``VQLPIPSWithDiscriminator`` (upstream's loss, buildable offline) and ``ImageNetTrain`` /
``ImageNetValidation`` (the project's local ImageNet folders with upstream's transforms, enhancing's batch format).
Importing this module needs the enhancing-transformers tree on ``sys.path`` (its ``main.py`` and the tests do that).
"""
from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence, Union
from unittest import mock

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from adapters.integrations.upstream import upstream_imports

with upstream_imports("enhancing"):  # a missing third_party/enhancing-transformers: one error naming the tree
    from enhancing.losses import vqperceptual
    from enhancing.modules.stage1.vitvqgan import ViTVQ
    from enhancing.utils.general import initialize_from_config
from torchvision import transforms as T

from adapters.evaluation.data import ImageNetFolder
from adapters.integrations.losses import MissingWeightsError
from adapters.integrations.lightning_compat import AccumulatedUpdate, allow_numpy_scalars_in_checkpoints
from adapters.evaluation.codebook_logging import CodebookLoggingMixin
from adapters.quantizer import (GRADIENTS, NormRotationQuantizer, ResidualNormRotationQuantizer,
                                codebook_updates_paused)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, which lpips.LPIPS(net="vgg") loads
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
OFFLINE_ENV = "ROTATION_TRICK_OFFLINE"  # set to 1: fail at once instead of trying to download the weights
# What a diverged run's error (NonFiniteLossError) tells the user to change, in enhancing main.py's terms.
LR_OPTION = "-lr"
RESUME_OPTION = "-r experiments/<config>/<run>/ckpt/<checkpoint>.ckpt"


# --- loss -----------------------------------------------------------------------------------------------------------
def vgg16_weights_path() -> Path:
    """Where torchvision (and so LPIPS) looks for the VGG16 weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def missing_vgg16_message() -> str:
    return (f"the perceptual (LPIPS) loss needs torchvision's VGG16 ImageNet weights, which are missing here and "
            f"could not be downloaded: put {VGG16_FILE} (from {VGG16_URL}) at {vgg16_weights_path()} (set "
            f"TORCH_HOME to move that folder), or set model.params.loss.params.perceptual_weight: 0 to train "
            f"without LPIPS. (LPIPS's own linear heads ship inside the lpips package.)")


class _NoPerceptualLoss(nn.Module):
    """LPIPS stand-in for perceptual_weight 0: upstream still evaluates the term (and logs it), so it returns 0."""

    def forward(self, inputs: Tensor, reconstructions: Tensor) -> Tensor:
        """inputs, reconstructions: (B, 3, H, W) -> zeros (B, 1, 1, 1), LPIPS's output shape."""
        return inputs.new_zeros(inputs.shape[0], 1, 1, 1)


class VQLPIPSWithDiscriminator(vqperceptual.VQLPIPSWithDiscriminator):
    """enhancing's ``VQLPIPSWithDiscriminator`` (same arguments, forward, log keys and state-dict keys), buildable offline.

    ``perceptual_weight: 0`` builds no LPIPS network (upstream builds it, downloading VGG16, whatever its weight).
    Otherwise LPIPS is built as upstream; when its VGG16 weights are neither on disk nor downloadable the error
    names the file and where it goes (``MissingWeightsError``).

    ``discriminator: {target: ..., params: ...}`` (optional) builds that module in place of upstream's
    ``StyleDiscriminator(**disc_params)``, e.g. upstream's small ``enhancing.losses.layers.PatchDiscriminator`` for
    the CPU-sized tiny configs (a StyleGAN2 discriminator keeps 512 channels at every resolution up to 32 pixels).
    """

    def __init__(self, *args: Any, perceptual_weight: float = 1.0, discriminator: Optional[Any] = None,
                 **kwargs: Any) -> None:
        with self._substitutes(perceptual_weight, discriminator, kwargs):
            if perceptual_weight == 0:
                super().__init__(*args, perceptual_weight=perceptual_weight, **kwargs)
                return
            had_weights = vgg16_weights_path().is_file()
            if not had_weights and os.environ.get(OFFLINE_ENV, "0") not in ("", "0"):
                raise MissingWeightsError(missing_vgg16_message())
            try:
                super().__init__(*args, perceptual_weight=perceptual_weight, **kwargs)
            except (OSError, RuntimeError) as err:  # network errors (URLError is an OSError), truncated files
                if had_weights:
                    raise
                raise MissingWeightsError(missing_vgg16_message()) from err

    @staticmethod
    @contextmanager
    def _substitutes(perceptual_weight: float, discriminator: Optional[Any], kwargs: dict) -> Iterator[None]:
        """Swap the classes upstream's constructor builds, for its duration only."""
        patches = []
        if perceptual_weight == 0:
            patches.append(mock.patch.object(vqperceptual, "lpips",
                                             SimpleNamespace(LPIPS=lambda **_: _NoPerceptualLoss())))
        if discriminator is not None:
            if kwargs.get("disc_params"):
                raise ValueError("give either loss.params.discriminator (a target/params module) or "
                                 "loss.params.disc_params (upstream's StyleDiscriminator), not both")
            patches.append(mock.patch.object(vqperceptual, "StyleDiscriminator",
                                             lambda **_: initialize_from_config(_as_config(discriminator))))
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield


# --- data -----------------------------------------------------------------------------------------------------------
class _EnhancingImageNet(ImageNetFolder):
    """A local ImageNet split (``adapters.evaluation.data.ImageNetFolder`` listing) with enhancing's torchvision
    transforms.

    Item: {"image": float32 (3, H, W) in [0, 1], "class": LongTensor (1,), "class_label", "file_path_"}.
    Upstream's own loader needs torchvision's ImageNet devkit archives; this one reads <root>/{train,val}/<wnid>/.
    """

    def __init__(self, split: str, root: Optional[str] = None, resolution: Union[int, Sequence[int]] = 256,
                 transform: Optional[T.Compose] = None, classes: Optional[Union[int, Sequence[str]]] = None,
                 max_images: Optional[int] = None) -> None:
        size = resolution if isinstance(resolution, int) else int(resolution[0])
        super().__init__(root=root, split=split, size=size, classes=classes, max_images=max_images, layout="chw")
        self.transform = transform

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        path, wnid = self.items[i]
        with Image.open(path) as img:
            image = self.transform(img.convert("RGB"))
        label = self.class_to_label[wnid]
        return {"image": image, "class": torch.tensor([label]), "class_label": label, "file_path_": str(path)}


class ImageNetTrain(_EnhancingImageNet):
    """Training split; upstream's ``ImageNetTrain`` transform: Resize(shorter side), RandomCrop, horizontal flip."""

    def __init__(self, root: Optional[str] = None, resolution: Union[int, Sequence[int]] = 256, **kwargs: Any) -> None:
        transform = T.Compose([T.Resize(resolution), T.RandomCrop(resolution), T.RandomHorizontalFlip(),
                               T.ToTensor()])
        super().__init__("train", root, resolution, transform, **kwargs)


class ImageNetValidation(_EnhancingImageNet):
    """Validation split; upstream's ``ImageNetValidation`` transform: Resize to (r, r), CenterCrop."""

    def __init__(self, root: Optional[str] = None, resolution: Union[int, Sequence[int]] = 256, **kwargs: Any) -> None:
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        transform = T.Compose([T.Resize(res), T.CenterCrop(res), T.ToTensor()])
        super().__init__("val", root, resolution, transform, **kwargs)


# --- model ----------------------------------------------------------------------------------------------------------
def _as_config(value: Any) -> Any:
    """Upstream reads ``encoder.dim`` etc. as attributes: accept plain dicts too (tests, Python callers)."""
    return OmegaConf.create(value) if isinstance(value, dict) else value


class RotationViTVQ(CodebookLoggingMixin, ViTVQ):
    """Upstream ``ViTVQ`` with ``NormRotationQuantizer`` in ``self.quantizer`` (see the module docstring).

    Input batches: ``batch[image_key]`` float (B, 3, H, W) in [0, 1]; ``forward(x)`` returns
    ``(reconstruction (B, 3, H, W), codebook loss)`` as upstream.
    """

    def __init__(self, image_key: str, image_size: int, patch_size: int, encoder: Any, decoder: Any,
                 quantizer: Any, loss: Any, path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 scheduler: Optional[Any] = None, gradient: str = "rotation", trust_checkpoint: bool = False) -> None:
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r} in model.params.gradient; choose one of "
                             f"{', '.join(GRADIENTS)}")
        encoder, decoder, quantizer, loss = map(_as_config, (encoder, decoder, quantizer, loss))
        scheduler = _as_config(scheduler)
        if "gradient" in quantizer:
            raise ValueError("put the estimator at model.params.gradient, not model.params.quantizer.gradient")
        allow_numpy_scalars_in_checkpoints()  # upstream's lr schedules store numpy floats; -r must read them
        # The checkpoint is loaded after the quantizer swap (upstream would load it into its own quantizer).
        super().__init__(image_key, image_size, patch_size, encoder, decoder, quantizer, loss, None,
                         list(ignore_keys), scheduler)
        upstream = self.quantizer
        options = OmegaConf.to_container(quantizer)
        # use_residual: true, num_quantizers: N -> N stages on the shared codebook, with rotation_scope: total | stage
        residual = bool(options.get("use_residual"))
        if "rotation_scope" in options and not residual:
            raise ValueError("model.params.quantizer.rotation_scope applies to residual stages: set "
                             "model.params.quantizer.use_residual: true and num_quantizers, or drop rotation_scope")
        with torch.random.fork_rng(devices=[]):  # the draws below leave the RNG stream where upstream's would be
            cls = ResidualNormRotationQuantizer if residual else NormRotationQuantizer
            self.quantizer = cls(gradient=gradient, **options)
        self.quantizer.adopt_initial_codebook(upstream)  # same initial codebook as upstream for a seed
        self.gradient = gradient
        self.automatic_optimization = False
        self.update_every = 1  # main.py sets it from -u; gradients are accumulated over this many batches
        self.trust_checkpoint = bool(trust_checkpoint)  # a plain attribute: not in the state dict
        if path is not None:
            self.init_from_ckpt(path, list(ignore_keys))

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> tuple[list[str], list[str]]:
        """Load a (Lightning) checkpoint's state_dict, dropping keys that start with ``ignore_keys``.

        Upstream loads with ``strict=False`` silently; this prints what did not match and returns
        (missing, unexpected). The file loads through ``adapters.runtime.safe_load``: a checkpoint needing more than
        weights and Lightning's data types is refused unless ``trust_checkpoint: true``.
        """
        from adapters.runtime.safe_load import load_checkpoint

        sd = load_checkpoint(path, trust=getattr(self, "trust_checkpoint", False),
                             opt_in="set model.params.trust_checkpoint: true")
        sd = sd.get("state_dict", sd)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        detail = (f"; missing {missing[:5]}" if missing else "") + (f"; unexpected {unexpected[:5]}" if unexpected else "")
        print(f"Restored from {path}: {len(missing)} missing and {len(unexpected)} unexpected keys{detail}")
        return list(missing), list(unexpected)

    def decode_codes(self, code: Tensor) -> Tensor:
        """Codes (B, T) -> images (B, 3, H, W), as upstream, from the quantizer's effective codewords (under
        ``codebook_param: simvq`` upstream's ``quantizer.embedding(code)`` would read the stored C, not C W)."""
        if getattr(self.quantizer, "codebook_transform", None) is None:
            return super().decode_codes(code)
        quant = self.quantizer.get_codebook_entry(code, None)  # normalised in use_norm mode, as upstream's
        if self.quantizer.use_residual:
            quant = quant.sum(-2)
        return self.decode(quant)

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        update = AccumulatedUpdate(self, batch_idx, LR_OPTION, RESUME_OPTION)  # steps every update_every batches
        step = update.step  # one value for both losses, as under Lightning 1.5
        x = self.get_input(batch, self.image_key)
        last_layer = self.decoder.get_last_layer()

        # autoencoder: upstream's optimizer_idx 0
        opt_ae = optimizers[0]
        self.toggle_optimizer(opt_ae)
        xrec, qloss = self(x)
        aeloss, log_dict_ae = self.loss(qloss, x, xrec, 0, step, batch_idx, last_layer=last_layer, split="train")
        update.backward(opt_ae, aeloss, "train/total_loss", counted=True)  # one global step per update
        self.untoggle_optimizer(opt_ae)
        self.log("train/total_loss", aeloss, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        del log_dict_ae["train/total_loss"]
        self.log_dict(log_dict_ae, prog_bar=False, logger=True, on_step=True, on_epoch=True)
        self.log_codebook_batch("train")

        # discriminator: optimizer_idx 1. Lightning 1.5 ran training_step again after the autoencoder update.
        if len(optimizers) > 1:
            opt_disc = optimizers[1]
            self.toggle_optimizer(opt_disc)
            # a repeat of the batch: no code counted, no EMA update or restart a second time
            with torch.no_grad(), self._no_stats(), codebook_updates_paused(self.quantizer):
                xrec, qloss = self(x)
            discloss, log_dict_disc = self.loss(qloss, x, xrec, 1, step, batch_idx, last_layer=last_layer,
                                                split="train")
            update.backward(opt_disc, discloss, "train/disc_loss", counted=False)  # Lightning 1.5 counted one
            self.untoggle_optimizer(opt_disc)
            self.log("train/disc_loss", discloss, prog_bar=True, logger=True, on_step=True, on_epoch=True)
            del log_dict_disc["train/disc_loss"]
            self.log_dict(log_dict_disc, prog_bar=False, logger=True, on_step=True, on_epoch=True)

        update.finish()
        return aeloss.detach()

    # --- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        out = super().validation_step(batch, batch_idx)
        self.log_codebook_batch("val")
        return out

    # --- pictures ---------------------------------------------------------------------------------------------------
    def log_images(self, batch: dict, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Upstream's originals and reconstructions (B, 3, H, W), plus the codebook-usage picture of this split so far."""
        with self._no_stats():
            log = super().log_images(batch, *args, **kwargs)
        return self.with_usage_picture(log)
