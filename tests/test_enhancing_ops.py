"""The StyleGAN2 ops of enhancing's discriminator: built lazily, and their PyTorch fallbacks equal the reference math."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from conftest import requires_enhancing

pytestmark = requires_enhancing


def reference_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int]) -> np.ndarray:
    """The textbook definition: zero-insertion upsampling, padding (negative = crop), true 2-D convolution with the
    FIR kernel, then keeping every ``down``-th sample. x: (N, C, H, W); pad = (x0, x1, y0, y1). Returns (N, C, H', W')."""
    from scipy.signal import convolve2d

    n, c, h, w = x.shape
    x0, x1, y0, y1 = pad
    out = []
    for plane in x.reshape(n * c, h, w):
        u = np.zeros((h * up, w * up))
        u[::up, ::up] = plane
        u = np.pad(u, ((max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0))))
        u = u[max(-y0, 0):u.shape[0] - max(-y1, 0), max(-x0, 0):u.shape[1] - max(-x1, 0)]
        out.append(convolve2d(u, k, mode="valid")[::down, ::down])
    return np.stack(out).reshape(n, c, *out[0].shape)


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2, 1, 2)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)),
                                         (2, 2, (0, -1, 1, 0))])
def test_upfirdn2d_fallback_equals_reference(up: int, down: int, pad: tuple[int, int, int, int]) -> None:
    from enhancing.losses.op.upfirdn2d import upfirdn2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    k = torch.randn(4, 3, generator=g, dtype=torch.float64)  # asymmetric: a missing flip would show
    got = upfirdn2d(x, k, up=up, down=down, pad=pad).numpy()
    want = reference_upfirdn2d(x.numpy(), k.numpy(), up, down, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_blur_of_the_discriminator_is_a_normalised_fir() -> None:
    """Blur([1, 3, 3, 1]) as the StyleGAN2 discriminator builds it: a separable normalised binomial filter."""
    from enhancing.losses.layers import Blur

    blur = Blur([1, 3, 3, 1], pad=(2, 1))
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    k1 = np.array([1, 3, 3, 1], dtype=np.float64)
    k = np.outer(k1, k1) / np.outer(k1, k1).sum()
    want = reference_upfirdn2d(x.numpy(), k, 1, 1, (2, 1, 2, 1))
    np.testing.assert_allclose(blur.double()(x).numpy(), want, atol=1e-12)


def test_fused_leaky_relu_fallback_equals_reference() -> None:
    from enhancing.losses.op import FusedLeakyReLU, fused_leaky_relu

    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    v = x.numpy() + b.numpy()[None, :, None, None]
    want = np.where(v >= 0, v, 0.2 * v) * math.sqrt(2)
    np.testing.assert_allclose(fused_leaky_relu(x, b).numpy(), want, atol=1e-12)
    np.testing.assert_allclose(fused_leaky_relu(x).numpy(), np.where(x >= 0, x, 0.2 * x) * math.sqrt(2), atol=1e-12)
    act = FusedLeakyReLU(5).double()
    with torch.no_grad():
        act.bias.copy_(b)
    np.testing.assert_allclose(act(x).detach().numpy(), want, atol=1e-12)


def test_ops_do_not_build_at_import_and_fall_back_without_a_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp

    import importlib

    fused_act = importlib.import_module("enhancing.losses.op.fused_act")  # importing built nothing
    upfirdn2d = importlib.import_module("enhancing.losses.op.upfirdn2d")
    lazy_ext = importlib.import_module("enhancing.losses.op.lazy_ext")

    def no_toolchain(*args, **kwargs):
        raise OSError("nvcc not found")

    monkeypatch.setattr(cpp, "load", no_toolchain)
    monkeypatch.setattr(lazy_ext, "_cache", {})
    monkeypatch.delenv("ENHANCING_NO_CUDA_OPS", raising=False)
    with pytest.warns(UserWarning, match="pure-PyTorch"):
        assert lazy_ext.load_extension("fused", ["x.cpp"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second attempt, no second warning
        assert lazy_ext.load_extension("fused", ["x.cpp"]) is None
    # A non-CPU tensor with no compiled op takes the PyTorch path instead of calling the missing extension.
    monkeypatch.setattr(lazy_ext, "_cache", {"fused": None, "upfirdn2d": None})
    x = torch.empty(2, 4, 8, 8, device="meta")
    assert fused_act.fused_leaky_relu(x, torch.empty(4, device="meta")).shape == x.shape
    assert upfirdn2d.upfirdn2d(x, torch.empty(4, 4, device="meta"), down=2, pad=(1, 1)).shape == (2, 4, 4, 4)


def test_ops_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp

    from enhancing.losses.op import lazy_ext

    monkeypatch.setattr(cpp, "load", lambda *a, **k: pytest.fail("must not build with ENHANCING_NO_CUDA_OPS=1"))
    monkeypatch.setattr(lazy_ext, "_cache", {})
    monkeypatch.setenv("ENHANCING_NO_CUDA_OPS", "1")
    assert lazy_ext.load_extension("upfirdn2d", ["x.cpp"]) is None


def test_style_discriminator_trains_on_cpu_with_r1() -> None:
    """Forward, backward and the double backward of the R1 penalty run through the fallbacks."""
    from enhancing.losses.layers import StyleDiscriminator

    torch.manual_seed(0)
    d = StyleDiscriminator(size=8)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits = d(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    (logits.mean() + grad.square().sum()).backward()
    assert logits.shape == (2,)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
