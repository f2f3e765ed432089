"""GPU correctness of the quantizer: the same numbers as on CPU, fp16/bf16 autocast, bounded search (CUDA only)."""
from __future__ import annotations

import pytest
import torch

from adapters.quantizer import GRADIENTS, NormRotationQuantizer, RotationVectorQuantizer, nearest_code

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: these tests check the quantizer on a GPU")


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_cuda_matches_cpu(gradient: str) -> None:
    torch.manual_seed(0)
    cpu = RotationVectorQuantizer(512, 4, gradient=gradient)
    gpu = RotationVectorQuantizer(512, 4, gradient=gradient).cuda()
    gpu.load_state_dict(cpu.state_dict())
    z = torch.randn(4, 4, 16, 16)
    g = torch.randn_like(z)
    outs = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        zz = z.to(dev).requires_grad_(True)
        z_q, loss, (_, _, idx) = m(zz)
        (z_q * g.to(dev)).sum().add(loss).backward()
        outs.append((z_q.detach().cpu(), loss.detach().cpu(), idx.cpu(), zz.grad.cpu()))
    (zc, lc, ic, gc), (zg, lg, ig, gg) = outs
    assert torch.equal(ic, ig)
    torch.testing.assert_close(zg, zc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg, lc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gg, gc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gradient", ["rotation", "rotation_released"])
def test_cuda_autocast_is_finite_and_exact(amp_dtype: torch.dtype, gradient: str) -> None:
    m = NormRotationQuantizer(32, 8192, gradient=gradient).cuda()
    z = (torch.randn(8, 1024, 32, device="cuda") * 100).to(amp_dtype).requires_grad_(True)
    with torch.autocast("cuda", dtype=amp_dtype):
        z_q, loss, idx = m(z)
    assert z_q.dtype == amp_dtype
    (z_q.float().sum() + loss).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss)
    expect = torch.nn.functional.normalize(m.embedding.weight[idx], dim=-1).to(amp_dtype)
    assert torch.equal(z_q.detach(), expect)


def test_cuda_bounded_search_equals_full() -> None:
    z = torch.randn(20000, 4, device="cuda")
    cb = torch.randn(16384, 4, device="cuda")
    full = torch.argmin(torch.sum(z ** 2, 1, keepdim=True) + torch.sum(cb ** 2, 1) - 2 * z @ cb.t(), dim=1)
    assert torch.equal(nearest_code(z, cb, chunk_rows=1000), full)
