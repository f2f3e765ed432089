"""Evaluate a VQ autoencoder checkpoint the way the rotation-trick paper's Tables 3 and 4 report it.

One pass over a dataset gives, per run, one JSON record (:func:`run_evaluation`) with:

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
Configs and checkpoints are loaded by ``adapters.evaluation.model_loading`` (re-exported here).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from adapters.evaluation import metrics as M
from adapters.runtime.errors import UserError
from adapters.evaluation.records import dumps_record
# Config and checkpoint loading, re-exported: callers use adapters.evaluation.load_model etc.
from adapters.evaluation.model_loading import (LoadedModel, build_from_config, get_obj_from_str,  # noqa: F401
                                               get_quantizer, instantiate, load_config, load_model, model_family,
                                               sha256_file)

SCHEMA = "rotation-trick-eval/1"

# What each metric in a record means; copied into every record so a JSON explains itself.
DEFINITIONS: dict[str, str] = {
    "codebook_usage_per_batch": "the paper's definition: fraction of codebook vectors used by one evaluation batch "
                                "(of data.batch_size images on one device), averaged over batches",
    "codebook_usage_per_batch_std": "standard deviation of the per-batch usage over batches",
    "codebook_usage_whole_set": "fraction of codebook vectors used at least once over the whole evaluated set",
    "used_codes_whole_set": "number of codebook vectors used at least once over the whole set",
    "perplexity_whole_set": "exp(entropy) of the code histogram over the whole set",
    "quant_error": "mean over latent vectors of ||e - q||^2, e the encoder output and q its codebook vector, in the "
                   "space the code is looked up in (l2-normalised for ViT-VQGAN); null for Gumbel quantizers",
    "quant_error_per_dim": "quant_error divided by the latent dimension d: the per-element mean squared error, the "
                           "form of upstream's codebook loss (the paper does not say which of the two it reports)",
    "valid_loss": "the model's loss module's val/rec_loss (as upstream's validation_step logs it), mean over images",
    "r_fid": "FID of the reconstructions against the originals (torch-fidelity Inception-v3, pool3 2048-d)",
    "r_is": "Inception Score of the reconstructions (torch-fidelity, 10 splits); r_is_std its std over splits",
    "is_originals": "Inception Score of the originals, for reference",
    "psnr": "mean per-image PSNR (dB) between uint8-rounded original and reconstruction in [0, 1]",
    "ssim": "mean per-image SSIM (Gaussian 11x11, sigma 1.5), uint8-rounded images in [0, 1]",
    "lpips": "mean LPIPS (lpips package v0.1, options.lpips_net backbone) between original and reconstruction",
}
METRIC_KEYS: tuple[str, ...] = (
    "codebook_usage_per_batch", "codebook_usage_per_batch_std", "codebook_usage_whole_set", "used_codes_whole_set",
    "perplexity_whole_set", "quant_error", "valid_loss", "r_fid", "r_is", "r_is_std", "is_originals", "psnr",
    "ssim", "lpips",
)
RECORD_KEYS: tuple[str, ...] = ("schema", "created", "config_path", "config", "checkpoint", "model", "data",
                                "options", "metrics", "skipped", "definitions", "code_counts", "environment")


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Model description (loading lives in adapters.evaluation.model_loading)
# ---------------------------------------------------------------------------------------------------------------
def quantizer_info(model: nn.Module) -> dict[str, Any]:
    """Class, estimator ('ste', 'rotation', ..., 'gumbel'), codebook size and dimension of the model's quantizer."""
    q = get_quantizer(model)
    cls = f"{type(q).__module__}.{type(q).__name__}"
    gumbel = "gumbel" in type(q).__name__.lower()
    gradient = "gumbel" if gumbel else str(getattr(q, "gradient", "ste"))
    n_embed = getattr(q, "n_e", None) or getattr(q, "n_embed", None)
    e_dim = getattr(q, "e_dim", None) or getattr(q, "embed_dim", None)
    return {"model_target": f"{type(model).__module__}.{type(model).__name__}", "quantizer": cls,
            "gradient": gradient, "n_embed": int(n_embed) if n_embed else None,
            "embed_dim": int(e_dim) if e_dim else None}


# ---------------------------------------------------------------------------------------------------------------
# Codebook statistics
# ---------------------------------------------------------------------------------------------------------------
class CodebookTracker:
    """Per-batch and whole-set codebook statistics of one quantizer during an evaluation pass.

    Uses the quantizer's own statistics (``adapters.quantizer``) when it keeps them; otherwise a forward hook
    computes the same quantities from the quantizer's input and indices (taming ``VectorQuantizer2``, enhancing
    ``VectorQuantizer``; Gumbel quantizers give usage only, as their input is not a vector to compare with a code).
    The hook also records the latent shape.
    """

    def __init__(self, quantizer: nn.Module, n_embed: int) -> None:
        from adapters.quantizer import CodebookStats

        self.q = quantizer
        self.own = hasattr(quantizer, "epoch_stats") and bool(getattr(quantizer, "track_stats", True))
        self.gumbel = "gumbel" in type(quantizer).__name__.lower()
        self.n_embed = n_embed
        self.fallback = CodebookStats(n_embed)
        self.latent_shape: Optional[tuple[int, ...]] = None
        self._batch: Optional[dict[str, Tensor]] = None
        self.per_batch_usage: list[float] = []
        self.per_batch_quant_error: list[float] = []
        if self.own:
            quantizer.reset_stats()
        self._handle = quantizer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        z = inputs[0]
        z_q = output[0]
        self.latent_shape = tuple(z_q.shape[1:])
        if self.own:
            return
        ind = output[2]
        if isinstance(ind, (tuple, list)):  # taming: (perplexity, min_encodings, indices)
            ind = ind[2]
        ind = ind.reshape(z.shape[0], -1)
        if getattr(module, "remap", None) is not None and hasattr(module, "unmap_to_all"):
            ind = module.unmap_to_all(ind)
        ind = ind.reshape(-1).long()
        if self.gumbel or not hasattr(module, "embedding"):
            zeros = torch.zeros(ind.numel(), 1, device=ind.device)
            self._batch = self.fallback.update(ind, zeros, zeros)
            return
        weight = module.embedding.weight
        d = weight.shape[1]
        if z.dim() == 4 and z.shape[1] == d:  # taming: (B, C, H, W)
            e = z.permute(0, 2, 3, 1).reshape(-1, d)
        else:  # enhancing: (B, T, C)
            e = z.reshape(-1, d)
        q = weight[ind]
        norm = getattr(module, "norm", None)
        if callable(norm) and not isinstance(norm, nn.Module):  # enhancing's l2-normalisation lambda
            e, q = norm(e), norm(q)
        self._batch = self.fallback.update(ind, e.float(), q.float())

    def after_batch(self) -> None:
        """Record the statistics of the batch just quantized (call once per batch, after the forward)."""
        s = self.q.last_stats if self.own else self._batch
        if not s:
            raise RuntimeError("the quantizer ran no forward in this batch: cannot record codebook statistics")
        self.per_batch_usage.append(float(s["usage"]))
        self.per_batch_quant_error.append(float(s["quant_error"]))

    def finish(self) -> tuple[dict[str, Any], list[int]]:
        """Whole-set statistics (summed over ranks) and code counts. Every rank must call it."""
        self._handle.remove()
        stats = self.q.epoch_stats(reset=True) if self.own else self.fallback.compute(reset=True)
        counts = stats["code_counts"].cpu().long()
        usage = torch.tensor(self.per_batch_usage, dtype=torch.float64)
        packed = torch.tensor([usage.sum().item(), (usage ** 2).sum().item(), float(usage.numel())],
                              dtype=torch.float64)
        packed = _all_reduce_cpu(packed)
        n_b = max(packed[2].item(), 1.0)
        mean = packed[0].item() / n_b
        var = max(packed[1].item() / n_b - mean ** 2, 0.0)
        out = {
            "codebook_usage_per_batch": mean,
            "codebook_usage_per_batch_std": math.sqrt(var),
            "codebook_usage_whole_set": float(stats["usage"]),
            "used_codes_whole_set": int(stats["used_codes"]),
            "perplexity_whole_set": float(stats["perplexity"]),
            "quant_error": None if self.gumbel else float(stats["quant_error"]),
            "num_batches": int(packed[2].item()),
        }
        return out, counts.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): each rank evaluates a shard, sums are reduced
# ---------------------------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_cpu(t: Tensor) -> Tensor:
    if not _dist_on():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(device: str) -> torch.device:
    """``--device`` -> a torch device this machine has; anything else is a ``UserError`` (one line, what to use)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:  # torch's message lists every device type it knows, over several lines
        raise UserError(f"--device {device}: not a device name; use auto (CUDA when present), cpu, cuda or "
                        f"cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
                   "torch sees no CUDA GPU")
            raise UserError(f"--device {device}: CUDA is not available on this machine ({why}); use --device cpu, "
                            f"or --device auto to take a GPU only where there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of those")
    return dev


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
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


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    skipped: dict[str, str]
    code_counts: list[int]
    num_images: int
    latent_shape: Optional[str]
    examples: Optional[Tensor] = None  # (2k, 3, H, W) originals then reconstructions in [0, 1]
    seconds: float = 0.0


def _shard(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """This rank's part of the evaluated images: ``limit`` spread evenly over the set (class-sorted sets keep all
    their classes), then one contiguous slice per rank, so that batches hold the same neighbouring images (and the
    per-batch usage the same meaning) whatever the number of processes."""
    n = len(dataset)  # type: ignore[arg-type]
    chosen = list(range(n))
    if limit is not None and limit < n:
        chosen = sorted({round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)}) if limit > 1 else [0]
    rank, world = (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)
    m = len(chosen)
    return Subset(dataset, chosen[rank * m // world:(rank + 1) * m // world])


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
    shard = _shard(dataset, options.limit)
    loader = DataLoader(shard, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    real_m, fake_m = M.FeatureMoments(2048), M.FeatureMoments(2048)
    real_logits: list[Tensor] = []
    fake_logits: list[Tensor] = []
    sums = torch.zeros(5, dtype=torch.float64)  # n_images, psnr, ssim, lpips, valid_loss (image-weighted)
    examples: list[Tensor] = []
    ema = model.ema_scope() if options.ema and getattr(model, "use_ema", False) else None
    if options.ema and ema is None:
        raise ValueError("--ema: this model keeps no EMA weights (use_ema is off)")
    is_main = not _dist_on() or dist.get_rank() == 0
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
    sums = _all_reduce_cpu(sums)
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
        fl = _gather_cat(fake_logits)
        rl = _gather_cat(real_logits)
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


def _gather_cat(chunks: list[Tensor]) -> Tensor:
    local = torch.cat(chunks) if chunks else torch.zeros(0, 1008)
    if not _dist_on():
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return torch.cat(gathered)


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------
def _environment(device: torch.device) -> dict[str, Any]:
    import torch_fidelity

    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "world_size": dist.get_world_size() if _dist_on() else 1}


def make_record(loaded: LoadedModel, result: EvalResult, options: EvalOptions, data_info: Mapping[str, Any],
                config_path: Optional[str | Sequence[str]], device: torch.device,
                row: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The JSON record of one evaluation run (schema ``rotation-trick-eval/1``)."""
    model_info = quantizer_info(loaded.model)
    model_info.update(family=loaded.family, latent_shape=result.latent_shape)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_path": config_path if config_path is None or isinstance(config_path, str) else list(config_path),
        "config": OmegaConf.to_container(loaded.config, resolve=True),
        "checkpoint": dict(loaded.checkpoint),
        "model": model_info,
        "row": {**default_row(model_info), **{k: v for k, v in dict(row or {}).items() if v is not None}},
        "data": {**dict(data_info), "num_images": result.num_images, "batch_size": options.batch_size},
        "options": asdict(options),
        "metrics": result.metrics,
        "skipped": result.skipped,
        "definitions": DEFINITIONS,
        "code_counts": result.code_counts,
        "environment": {**_environment(device), "seconds": round(result.seconds, 2)},
    }


def default_row(model_info: Mapping[str, Any]) -> dict[str, Any]:
    """Which paper row a run belongs to: Table 3 for latent-diffusion/taming models, Table 4 for ViT-VQGAN."""
    table = 4 if model_info.get("family") == "enhancing" else 3
    g = model_info.get("gradient")
    approach = "gumbel" if g == "gumbel" else ("ste" if g == "ste" else "rotation")
    return {"table": table, "approach": approach, "gradient": g, "setting": model_info.get("latent_shape")}


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first problem if ``record`` is not a schema-1 evaluation record."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"not an evaluation record of schema {SCHEMA!r} (schema: {record.get('schema')!r})")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"evaluation record lacks keys {missing}")
    m = record["metrics"]
    lacking = [k for k in METRIC_KEYS if k not in m]
    if lacking:
        raise ValueError(f"evaluation record's metrics lack {lacking}")
    for k in METRIC_KEYS:
        v = m[k]
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"metric {k} must be a number or null, got {type(v).__name__}")
    for k in ("codebook_usage_per_batch", "codebook_usage_whole_set"):
        if m[k] is not None and not 0.0 <= m[k] <= 1.0:
            raise ValueError(f"metric {k} is a fraction in [0, 1], got {m[k]}")
    if m["used_codes_whole_set"] is not None and m["used_codes_whole_set"] != sum(1 for c in record["code_counts"] if c):
        raise ValueError("used_codes_whole_set disagrees with code_counts")
    if not isinstance(record["data"].get("num_images"), int) or record["data"]["num_images"] < 1:
        raise ValueError("data.num_images must be a positive integer")
    row = record.get("row") or {}
    if row.get("table") not in (3, 4):
        raise ValueError(f"row.table must be 3 or 4, got {row.get('table')!r}")


def save_examples(examples: Tensor, path: str | os.PathLike) -> None:
    """Originals (top row) above reconstructions (bottom row) as one PNG."""
    from torchvision.utils import save_image

    k = examples.shape[0] // 2
    save_image(examples, str(path), nrow=k, padding=2)


def model_image_size(cfg: DictConfig) -> Optional[int]:
    """Training resolution named by a model config (latent-diffusion ddconfig.resolution, enhancing image_size)."""
    params = cfg.model.get("params", {}) or {}
    if "image_size" in params:
        return int(params["image_size"])
    dd = params.get("ddconfig", None)
    return int(dd["resolution"]) if dd is not None and "resolution" in dd else None


def config_validation_dataset(cfg: DictConfig) -> Dataset:
    """The validation dataset a training config names (latent-diffusion ``data:``, enhancing ``dataset:``)."""
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is not None and node.get("params", None) is not None and "validation" in node.params:
            return build_from_config(node.params.validation, f"{section}.params.validation")
    raise ValueError("the config names no validation dataset (data.params.validation or dataset.params.validation); "
                     "pass --data-root (ImageNet folder) or --offline-photos")


def build_dataset(loaded: LoadedModel, source: str = "config", root: Optional[str] = None, split: str = "val",
                  size: Optional[int] = None, limit: Optional[int] = None, photos_length: int = 64,
                  seed: int = 0) -> tuple[Dataset, dict[str, Any]]:
    """The evaluation dataset in the model's batch format, and a description for the record.

    source: ``imagenet`` (``adapters.evaluation.data.ImageNetFolder`` at ``root``, centre crops, ``limit`` images spread
    over the classes), ``photos`` (deterministic crops of scikit-image's bundled photographs: offline smoke tests), or
    ``config`` (the config's own validation dataset).
    """
    from adapters.evaluation import data as D

    layout = "chw" if loaded.family == "enhancing" else "hwc"
    size = size or model_image_size(loaded.config) or 256
    if source == "imagenet" and loaded.family == "enhancing":
        # Table 4: enhancing's own validation transform (PIL Resize of the whole image to size x size, antialiased,
        # aspect not kept; CenterCrop a no-op), so valid loss is upstream's val/rec_loss and r-FID sees its inputs.
        from adapters.integrations import vitvqgan as V

        split = {"validation": "val"}.get(split, split)
        if split == "val":
            ds = V.ImageNetValidation(root=root, resolution=size, max_images=limit)
        else:  # evaluating on train images: the same (validation) transform, no random crop or flip
            from torchvision import transforms as T

            val_transform = T.Compose([T.Resize((size, size)), T.CenterCrop((size, size)), T.ToTensor()])
            ds = V._EnhancingImageNet(split, root, size, val_transform, max_images=limit)
        return ds, {"source": "imagenet", "root": str(ds.root), "split": split, "size": size, "layout": layout,
                    "transform": "enhancing ImageNetValidation: Resize((size, size)) + CenterCrop + ToTensor"}
    if source == "imagenet":
        ds = D.ImageNetFolder(root=root, split=split, size=size, random_crop=False, max_images=limit, layout=layout)
        return ds, {"source": "imagenet", "root": str(ds.root), "split": split, "size": size, "layout": layout,
                    "transform": "taming: shorter side to size (bilinear) + centre crop"}
    if source == "photos":
        n = limit or photos_length
        # Crop the photographs at the scale the config's own PhotoCrops validation set uses (tiny configs shrink
        # them first), so evaluation images look like training images; only the number of crops changes.
        like = _config_photo_params(loaded.config)
        scale_to, photos = like.get("scale_to"), like.get("photos")
        ds = D.PhotoCrops(size=size, length=n, photos=photos, random_crop=False, scale_to=scale_to, seed=seed,
                          layout=layout)
        # Whether any evaluated photograph was also a training photograph (issue 16, item 6): the report states it.
        trained_on = _config_photo_params(loaded.config, splits=("train",))
        train_photos = D.resolve_photos(trained_on.get("photos")) if trained_on else None
        disjoint = None if train_photos is None else not set(ds.names) & set(train_photos)
        return ds, {"source": "offline-photos", "photos": ds.names, "size": size, "scale_to": scale_to,
                    "seed": seed, "layout": layout, "train_photos": train_photos, "held_out": disjoint}
    if source == "config":
        ds = config_validation_dataset(loaded.config)
        return ds, {"source": "config", "target": str(_validation_target(loaded.config)), "layout": layout}
    raise ValueError(f"unknown data source {source!r}: use 'imagenet', 'photos' or 'config'")


def _config_photo_params(cfg: DictConfig, splits: Sequence[str] = ("validation", "train")) -> dict[str, Any]:
    """params of the config's first PhotoCrops dataset among ``splits`` (default: validation, else train), or {}."""
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is None or node.get("params", None) is None:
            continue
        for split in splits:
            ds = node.params.get(split, None)
            if ds is not None and str(ds.get("target", "")).endswith("PhotoCrops"):
                return dict(OmegaConf.to_container(ds.get("params", {}) or {}, resolve=True))
    return {}


def _validation_target(cfg: DictConfig) -> Optional[str]:
    for section in ("data", "dataset"):
        node = cfg.get(section, None)
        if node is not None and node.get("params", None) is not None and "validation" in node.params:
            return node.params.validation.get("target")
    return None


def run_evaluation(config: str | os.PathLike | Sequence[str | os.PathLike], checkpoint: Optional[str | os.PathLike],
                   dataset: Dataset | Callable[[LoadedModel], tuple[Dataset, dict[str, Any]]], options: EvalOptions, out_json: Optional[str | os.PathLike] = None,
                   data_info: Optional[Mapping[str, Any]] = None, row: Optional[Mapping[str, Any]] = None,
                   inception: Optional[nn.Module] = None, lpips_net: Optional[nn.Module] = None) -> dict[str, Any]:
    """Load, evaluate, and (on rank 0) write the JSON record (+ an examples PNG beside it). Returns the record.

    dataset: a Dataset in the model's batch format, or a callable ``loaded_model -> (dataset, data_info)``
    (e.g. ``lambda m: build_dataset(m, "photos")``) when the format depends on the model.
    """
    device = resolve_device(options.device)
    cfg_paths = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    loaded = load_model(load_config(cfg_paths), checkpoint, device, trust_checkpoint=options.trust_checkpoint,
                        config_name=" + ".join(map(str, cfg_paths)))
    if callable(dataset) and not isinstance(dataset, Dataset):
        dataset, built_info = dataset(loaded)
        data_info = {**built_info, **dict(data_info or {})}
    result = evaluate(loaded.model, dataset, options, device, inception=inception, lpips_net=lpips_net)
    record = make_record(loaded, result, options, data_info or {}, [str(p) for p in cfg_paths], device, row)
    validate_record(record)
    if out_json is not None and (not _dist_on() or dist.get_rank() == 0):
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        if result.examples is not None:
            png = out.with_suffix(".png")
            save_examples(result.examples, png)
            record["examples_png"] = png.name
        out.write_text(dumps_record(record, default=_json_default))  # number lists on one line (issue 17)
    return record


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read and validate evaluation JSONs (directories are searched for *.json)."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder of evaluation records")
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            rec = json.loads(f.read_text())
            if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
                validate_record(rec)
                rec["_path"] = str(f)
                out.append(rec)
            elif not p.is_dir():
                raise ValueError(f"{f} is not an evaluation record (schema {SCHEMA})")
    return out
