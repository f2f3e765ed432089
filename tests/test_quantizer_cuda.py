"""GPU correctness of the quantizer: the same numbers as on CPU, fp16/bf16 autocast, bounded search, and the fused
(Triton) search: exact or a near-tie, no recompilation, O(N + K) memory (CUDA only)."""
from __future__ import annotations

import warnings

import pytest
import torch

import adapters.quantizer.search as search_mod
from adapters.quantizer import (GRADIENTS, NormRotationQuantizer, RotationVectorQuantizer, find_nearest,
                                fused_compile_count, fused_nearest_code, nearest_code)
from test_quantizer_search import assert_nearest, check_near_ties, near_tie_data

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


@pytest.mark.parametrize("d,k,normalise", [(3, 8192, False), (4, 16384, False), (32, 8192, True)])
def test_cuda_fused_search_is_exact_or_a_near_tie(d: int, k: int, normalise: bool) -> None:
    z, cb = near_tie_data(4096, k, d, seed=d, normalise=normalise)
    z, cb = z.cuda(), cb.cuda()
    assert check_near_ties(z, cb, find_nearest(z, cb, "fused"), find_nearest(z, cb, "blocked")) > 0


def test_cuda_fused_finds_the_nearest_code_of_generic_rows() -> None:
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(20000, 4, generator=g).cuda(), torch.randn(4096, 4, generator=g).cuda()
    idx = fused_nearest_code(z, cb)
    assert idx.device.type == "cuda" and idx.dtype == torch.long
    assert_nearest(z, cb, idx)


def test_cuda_auto_uses_the_fused_search_without_a_warning() -> None:
    z, cb = torch.randn(300, 3, device="cuda"), torch.randn(40, 3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = find_nearest(z, cb, "auto")
    assert ("cuda", 3, torch.float32) in search_mod._WORKING
    assert_nearest(z, cb, idx)


def test_cuda_fused_search_compiles_once_and_needs_o_n_plus_k_memory() -> None:
    cb = torch.randn(8192, 3, device="cuda")
    fused_nearest_code(torch.randn(37, 3, device="cuda"), cb)
    compiled = fused_compile_count()
    for n, k in ((1, 8192), (1000, 17), (4099, 3001)):
        z, c = torch.randn(n, 3, device="cuda"), torch.randn(k, 3, device="cuda")
        assert_nearest(z, c, fused_nearest_code(z, c))
    z = torch.randn(65536, 3, device="cuda")  # the Table 3 shape: its distance matrix would take 2 GiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_nearest_code(z, cb)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 8 * 2**20
    assert fused_compile_count() == compiled
