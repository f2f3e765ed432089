"""Evaluate a VQ autoencoder checkpoint the way the rotation-trick paper's Tables 3 and 4 report it.

One pass over a dataset (:func:`evaluate`) gives the metrics of one JSON record (written by
:func:`adapters.evaluation.run.run_evaluation`):

- codebook usage, two ways: the paper's per-batch fraction of codebook vectors used, averaged over batches
  (it depends on the batch size, which the record keeps), and the fraction used anywhere in the whole set;
- quantization error: mean over latent vectors of ||e - q||^2 (in the lookup space: l2-normalised for ViT-VQGAN);
- valid loss: upstream's own ``val/rec_loss``, computed by calling the model's loss module exactly as upstream's
  ``validation_step`` does, averaged over images (Lightning's epoch mean);
- r-FID and r-IS of the reconstructions against the originals (torch-fidelity's Inception-v3), PSNR, SSIM, LPIPS.

Both codebases are supported through their public interfaces, so upstream-only checkpoints load too:

- ``taming`` family: latent-diffusion ``VQModel`` (and our ``RotationVQModel``), taming ``VQModel``/``GumbelVQ``:
  ``model.quantize``, ``model(x) -> (xrec, qloss, ...)``, batches ``image`` (B, H, W, 3) in [-1, 1];
- ``enhancing`` family: enhancing-transformers ``ViTVQ`` (and our ``RotationViTVQ``): ``model.quantizer``,
  ``model(x) -> (xrec, qloss)``, batches ``image`` (B, 3, H, W) in [0, 1].

Codebook statistics come from the quantizer itself when it keeps them (``adapters.quantizer``: ``last_stats``,
``epoch_stats``); for upstream quantizers they are computed from a forward hook with the same definitions.
Upstream trees must be importable (``ldm``/``enhancing`` on ``sys.path``); ``scripts/evaluate.py`` arranges that.
Configs and checkpoints are loaded by ``adapters.evaluation.model_loading``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adapters.evaluation import metrics as M
from adapters.evaluation.distributed import all_reduce_cpu, gather_cat, is_distributed, rank_shard, resolve_device
from adapters.evaluation.model_loading import get_quantizer, model_family
from adapters.evaluation.schema import METRIC_KEYS
from adapters.evaluation.tracker import CodebookTracker, quantizer_info
from adapters.runtime.errors import UserError


@dataclass
class EvalOptions:
    """How to evaluate. ``batch_size`` is also the batch of the paper's per-batch codebook usage."""

    batch_size: int = 16
    num_workers: int = 0
    limit: Optional[int] = None
    device: str = "auto"
    fid: bool = True
    inception_weights: Optional[str] = None
    lpips: bool = True
    lpips_net: str = "alex"
    lpips_backbone: Optional[str] = None
    valid_loss: bool = True
    ema: bool = False
    allow_download: bool = True
    progress: bool = True
    examples: int = 8
    trust_checkpoint: bool = False  # --trust-checkpoint: load with weights_only=False if needed (runs code)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of images or None, got {self.limit}")


@dataclass
class EvalResult:
    """What one evaluation pass measured, before it becomes a record (:func:`adapters.evaluation.run.make_record`)."""

    metrics: dict[str, Any]
    skipped: dict[str, str]
    code_counts: list[int]
    num_images: int
    latent_shape: Optional[str]
    examples: Optional[Tensor] = None  # (2k, 3, H, W) originals then reconstructions in [0, 1]
    seconds: float = 0.0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def to_unit(x: Tensor, family: str) -> Tensor:
    """Model-space images -> [0, 1] (taming family works in [-1, 1], enhancing in [0, 1])."""
    return (x + 1.0) / 2.0 if family == "taming" else x


def valid_rec_loss(model: nn.Module, family: str, qloss: Tensor, x: Tensor, xrec: Tensor, batch_idx: int) -> float:
    """The loss module's ``val/rec_loss`` for one batch, with upstream validation_step's arguments."""
    if family == "taming":
        _, log = model.loss(qloss, x, xrec, 0, model.global_step, last_layer=model.get_last_layer(), split="val")
    else:
        _, log = model.loss(qloss, x, xrec, 0, model.global_step, batch_idx,
                            last_layer=model.decoder.get_last_layer(), split="val")
    if "val/rec_loss" not in log:
        raise UserError(f"the loss module {type(model.loss).__name__} logs no val/rec_loss (it logs "
                        f"{', '.join(sorted(log)) or 'nothing'}): pass --no-valid-loss (valid_loss=False) for this "
                        "model")
    return float(log["val/rec_loss"])


def _has_forward(module: Any) -> bool:
    return isinstance(module, nn.Module) and type(module).forward is not nn.Module.forward


def _latent_str(shape: Optional[tuple[int, ...]], family: str) -> Optional[str]:
    """Latent shape as the paper writes it, HxWxC."""
    if shape is None:
        return None
    if family == "taming" and len(shape) == 3:
        c, h, w = shape
        return f"{h}x{w}x{c}"
    if len(shape) == 2:
        t, c = shape
        side = int(round(math.sqrt(t)))
        return f"{side}x{side}x{c}" if side * side == t else f"{t}x{c}"
    return "x".join(map(str, shape))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, options: EvalOptions, device: Optional[torch.device] = None,
             inception: Optional[nn.Module] = None, lpips_net: Optional[nn.Module] = None) -> EvalResult:
    """Run one evaluation pass. ``inception``/``lpips_net`` may be injected (tests, custom weights); otherwise they
    are loaded per ``options`` (``options.fid``/``options.lpips`` False skips them).

    Returns metrics reduced over ranks when torch.distributed is initialised (each rank gets its shard).
    """
    t0 = time.time()
    device = device or resolve_device(options.device)
    family = model_family(model)
    model.to(device).eval()
    skipped: dict[str, str] = {}
    if options.fid and inception is None:
        inception = M.load_inception(options.inception_weights, device, allow_download=options.allow_download)
    if inception is not None:
        inception.to(device).eval()
    elif not options.fid:
        skipped.update(r_fid="disabled (--no-fid)", r_is="disabled (--no-fid)", is_originals="disabled (--no-fid)")
    if options.lpips and lpips_net is None:
        lpips_net = M.load_lpips(options.lpips_net, options.lpips_backbone, device,
                                 allow_download=options.allow_download)
    if lpips_net is not None:
        lpips_net.to(device).eval()
    else:
        skipped["lpips"] = "disabled (--no-lpips)"
    do_loss = options.valid_loss and _has_forward(getattr(model, "loss", None))
    if not options.valid_loss:
        skipped["valid_loss"] = "disabled (--no-valid-loss)"
    elif not do_loss:
        skipped["valid_loss"] = f"the model's loss module ({type(getattr(model, 'loss', None)).__name__}) has no forward"

    info = quantizer_info(model)
    tracker = CodebookTracker(get_quantizer(model), info["n_embed"])
    part = rank_shard(dataset, options.limit)
    loader = DataLoader(part, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    real_m, fake_m = M.FeatureMoments(2048), M.FeatureMoments(2048)
    real_logits: list[Tensor] = []
    fake_logits: list[Tensor] = []
    sums = torch.zeros(5, dtype=torch.float64)  # n_images, psnr, ssim, lpips, valid_loss (image-weighted)
    examples: list[Tensor] = []
    ema = model.ema_scope() if options.ema and getattr(model, "use_ema", False) else None
    if options.ema and ema is None:
        raise ValueError("--ema: this model keeps no EMA weights (use_ema is off)")
    is_main = not is_distributed() or dist.get_rank() == 0
    from tqdm.auto import tqdm

    if ema is not None:
        ema.__enter__()
    try:
        for batch_idx, batch in enumerate(tqdm(loader, desc="evaluate", disable=not (options.progress and is_main))):
            batch = _to_device(batch, device)
            x = model.get_input(batch, model.image_key).to(device)
            out = model(x)
            xrec, qloss = out[0], out[1]
            tracker.after_batch()
            b = x.shape[0]
            sums[0] += b
            if do_loss:
                sums[4] += valid_rec_loss(model, family, qloss, x, xrec, batch_idx) * b
            x8 = M.to_uint8(to_unit(x, family))
            r8 = M.to_uint8(to_unit(xrec, family))
            x01, r01 = x8.float() / 255.0, r8.float() / 255.0
            sums[1] += M.psnr(x01, r01).double().clamp(max=100.0).sum().cpu()
            sums[2] += M.ssim(x01, r01).double().sum().cpu()
            if lpips_net is not None:
                sums[3] += lpips_net(x01 * 2 - 1, r01 * 2 - 1).double().sum().cpu()
            if inception is not None:
                fr, lr = M.inception_features(inception, x8)
                ff, lf = M.inception_features(inception, r8)
                real_m.update(fr)
                fake_m.update(ff)
                real_logits.append(lr)
                fake_logits.append(lf)
            if len(examples) < options.examples:
                k = min(options.examples - len(examples), b)
                examples.extend(zip(x01[:k].cpu(), r01[:k].cpu()))
    finally:
        if ema is not None:
            ema.__exit__(None, None, None)

    code_stats, counts = tracker.finish()
    sums = all_reduce_cpu(sums)
    n = int(sums[0].item())
    if n == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    metrics: dict[str, Any] = {k: None for k in METRIC_KEYS}
    metrics.update({k: v for k, v in code_stats.items() if k in metrics})
    # The same error per latent dimension (the form of upstream's codebook-loss MSE), in case the paper's
    # quantization error was that one; an extra key, so older records stay valid.
    dim = getattr(get_quantizer(model), "e_dim", None) or getattr(get_quantizer(model), "embed_dim", None)
    metrics["quant_error_per_dim"] = (code_stats["quant_error"] / dim
                                      if code_stats["quant_error"] is not None and dim else None)
    if code_stats["quant_error"] is None:
        skipped["quant_error"] = "Gumbel quantizer: its input is not compared with a codebook vector"
    metrics["psnr"] = sums[1].item() / n
    metrics["ssim"] = sums[2].item() / n
    if lpips_net is not None:
        metrics["lpips"] = sums[3].item() / n
    if do_loss:
        metrics["valid_loss"] = sums[4].item() / n
    if inception is not None:
        real_m.all_reduce()
        fake_m.all_reduce()
        fl = gather_cat(fake_logits)
        rl = gather_cat(real_logits)
        if n >= 2:
            metrics["r_fid"] = M.fid_from_moments(real_m, fake_m)
        else:
            skipped["r_fid"] = "needs at least 2 images"
        metrics["r_is"], metrics["r_is_std"] = M.inception_score(fl)
        metrics["is_originals"], _ = M.inception_score(rl)
    ex = None
    if examples:
        ex = torch.stack([e[0] for e in examples] + [e[1] for e in examples])
    return EvalResult(metrics=metrics, skipped=skipped, code_counts=counts, num_images=n,
                      latent_shape=_latent_str(tracker.latent_shape, family), examples=ex,
                      seconds=time.time() - t0)
