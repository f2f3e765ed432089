"""Image and codebook metrics for evaluating VQ autoencoders: r-FID, r-IS, PSNR, SSIM, LPIPS.

Everything works on batches so an evaluation streams the validation set once:

- r-FID / r-IS use torch-fidelity's Inception-v3 (``inception-v3-compat``: the TF-FID weights every FID paper uses).
  FID statistics are accumulated as float64 moments (:class:`FeatureMoments`), so 50,000 images never sit in memory
  and several ranks can sum theirs; the Fréchet distance itself is torch-fidelity's ``fid_statistics_to_metric``.
- PSNR / SSIM are computed per image on [0, 1] images (SSIM: Wang et al. 2004, 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, channel-wise then averaged: the same numbers as ``skimage.metrics.structural_similarity``
  with ``gaussian_weights=True, use_sample_covariance=False``).
- LPIPS is the ``lpips`` package's network. Its linear heads ship in the wheel; its backbone is torchvision's
  ImageNet AlexNet/VGG16, which torchvision downloads. :func:`load_lpips` takes a local backbone file instead.

Nothing here downloads unless asked to load standard weights that are not cached; then a failure raises one
:class:`MissingWeightsError` saying which file is needed and where to put it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.runtime.errors import MissingWeightsError

# torch-fidelity's Inception-v3 (converted from the TF FID graph); the file name is part of its release URL.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torchvision's ImageNet backbones that lpips loads (file names as torchvision caches them).
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}




def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub caches (and torchvision / torch-fidelity look for) a downloaded weight file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


# ---------------------------------------------------------------------------------------------------------------
# Inception features, FID and IS
# ---------------------------------------------------------------------------------------------------------------
def load_inception(weights_path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                   allow_download: bool = True) -> nn.Module:
    """torch-fidelity's Inception-v3 returning ('2048', 'logits_unbiased') features for uint8 (B, 3, H, W) input.

    weights_path: a local copy of ``weights-inception-2015-12-05-6726825d.pth`` (air-gapped machines). Without it
    the torch.hub cache is used, then a download is tried (unless ``allow_download`` is False).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    cached = hub_checkpoint_path(INCEPTION_FILE)
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise MissingWeightsError(
                f"--inception-weights {weights_path}: no such file. It must be torch-fidelity's Inception-v3 "
                f"state dict {INCEPTION_FILE} (download it from {INCEPTION_URL} on a connected machine).")
        path: Optional[Path] = Path(weights_path)
    elif cached.is_file():
        path = cached
    else:
        path = None
        if not allow_download:
            raise MissingWeightsError(_inception_help(cached, "downloads are disabled"))
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=None if path is None else str(path))
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if path is None:
            raise MissingWeightsError(_inception_help(cached, f"the download failed: {exc}")) from exc
        raise MissingWeightsError(f"could not load Inception weights from {path}: {exc}. It must be torch-fidelity's "
                                  f"{INCEPTION_FILE} ({INCEPTION_URL}).") from exc
    return net.to(device).eval()


def _inception_help(cached: Path, why: str) -> str:
    return (f"r-FID/r-IS need torch-fidelity's Inception-v3 weights {INCEPTION_FILE}, and {why}. On a connected "
            f"machine download {INCEPTION_URL}, then either put it at {cached} or pass --inception-weights PATH "
            f"(or skip these metrics with --no-fid).")


@torch.no_grad()
def inception_features(net: nn.Module, images_uint8: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 (B, 3, H, W) -> (pool features (B, 2048) float64 on CPU, unbiased logits (B, 1008) float32 on CPU)."""
    feats = net(images_uint8)
    pool, logits = feats if isinstance(feats, (tuple, list)) else (feats["2048"], feats["logits_unbiased"])
    return pool.double().cpu(), logits.float().cpu()


class FeatureMoments:
    """Running float64 sums for a Gaussian fit of features: n, sum x (D,), sum x x^T (D, D)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: Tensor) -> None:
        """feats: (N, D)."""
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the moments over ranks (every rank must call it) when torch.distributed is initialised."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.flatten()])
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        d = self.sum.numel()
        self.n = int(round(packed[0].item()))
        self.sum = packed[1:1 + d].clone()
        self.outer = packed[1 + d:].view(d, d).clone()

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), sigma unbiased as numpy.cov (what torch-fidelity's statistics use)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) via torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    out = fid_statistics_to_metric({"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)},
                                   {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)},
                                   verbose=False)
    return float(out[KEY_METRIC_FID])


def fid_from_moments(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID between two accumulated feature sets."""
    return fid_from_statistics(*a.statistics(), *b.statistics())


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of unbiased logits (N, 1008), torch-fidelity's implementation.

    Splits shrink to N when fewer than ``splits`` images are given (IS of tiny sets is only a smoke signal).
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    n = logits.shape[0]
    if n < 1:
        raise ValueError("the Inception Score needs at least one image")
    out = isc_features_to_metric(logits.float().cpu(), splits=max(1, min(splits, n)), shuffle=True, rng_seed=2020)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


# ---------------------------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------------------------
def to_uint8(x01: Tensor) -> Tensor:
    """[0, 1] float (B, 3, H, W) -> uint8, rounded as an image file would store it."""
    return (x01.clamp(0, 1) * 255.0).round().to(torch.uint8)


def psnr(a01: Tensor, b01: Tensor) -> Tensor:
    """Per-image PSNR in dB of [0, 1] images (B, C, H, W) -> (B,). Identical images give +inf."""
    mse = ((a01.double() - b01.double()) ** 2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a01: Tensor, b01: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM of [0, 1] images (B, C, H, W) -> (B,): mean of the valid-region SSIM map over channels.

    Images smaller than the window use a window of their smaller side (odd), so tiny test images still work.
    """
    if a01.shape != b01.shape or a01.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a01.shape)}, {tuple(b01.shape)}")
    c = a01.shape[1]
    size = min(window, a01.shape[-1], a01.shape[-2])
    size -= (size + 1) % 2  # odd
    x, y = a01.double(), b01.double()
    w = _gaussian_window(size, sigma, c, x.device, x.dtype)
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731 - valid region only, as skimage crops the border
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1).float()


# ---------------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------------
def load_lpips(net: str = "alex", backbone_path: Optional[str | os.PathLike] = None,
               device: str | torch.device = "cpu", allow_download: bool = True) -> nn.Module:
    """The lpips package's LPIPS (v0.1 linear heads from the wheel) on torchvision's ImageNet backbone.

    backbone_path: a local torchvision state dict (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), for
    air-gapped machines. Without it torchvision's cache is used, then a download is tried.
    Input of the returned module: two (B, 3, H, W) images in [-1, 1]; output (B, 1, 1, 1).
    """
    import lpips

    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net {net!r} is not supported here: choose one of {sorted(LPIPS_BACKBONE_FILES)}")
    fname = LPIPS_BACKBONE_FILES[net]
    cached = hub_checkpoint_path(fname)
    help_text = (f"LPIPS needs torchvision's ImageNet {net} weights {fname}; on a connected machine run "
                 f"`python -c \"import torchvision; torchvision.models.{'alexnet' if net == 'alex' else 'vgg16'}"
                 f"(weights='DEFAULT')\"` and copy {cached} here, or pass --lpips-backbone PATH (or --no-lpips)")
    if backbone_path is None and not cached.is_file() and not allow_download:
        raise MissingWeightsError(help_text + " (downloads are disabled)")
    if backbone_path is None:
        try:
            model = lpips.LPIPS(net=net, verbose=False)
        except (OSError, RuntimeError) as exc:
            raise MissingWeightsError(f"{help_text}. The download failed: {exc}") from exc
        return model.to(device).eval()
    if not Path(backbone_path).is_file():
        raise MissingWeightsError(f"--lpips-backbone {backbone_path}: no such file. {help_text}.")
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    tv_sd = torch.load(backbone_path, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's `features` children under their original indices, split across slices:
    # slice{k}.{i}.weight <- features.{i}.weight
    own = model.net.state_dict()
    mapped = {}
    for key in own:
        idx_and_param = key.split(".", 1)[1]
        src = f"features.{idx_and_param}"
        if src not in tv_sd:
            raise MissingWeightsError(f"{backbone_path} is not torchvision's {net} state dict (no key {src}). "
                                      f"{help_text}.")
        mapped[key] = tv_sd[src]
    model.net.load_state_dict(mapped)
    return model.to(device).eval()
