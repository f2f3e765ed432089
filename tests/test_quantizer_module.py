"""RotationVectorQuantizer as a drop-in for taming's VectorQuantizer2 (and enhancing's VectorQuantizer)."""
from __future__ import annotations

import pytest
import torch
from taming.modules.vqvae.quantize import VectorQuantizer2

from adapters.quantizer import GRADIENTS, NormRotationQuantizer, RotationVectorQuantizer, nearest_code
from conftest import requires_enhancing


def _pair(legacy: bool, n_e: int = 64, e_dim: int = 4, **kw):
    torch.manual_seed(0)
    ref = VectorQuantizer2(n_e, e_dim, beta=0.25, legacy=legacy, **kw)
    ours = RotationVectorQuantizer(n_e, e_dim, beta=0.25, legacy=legacy, gradient="ste", **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    # A spread-out codebook, so that many codes are hit and ties are impossible.
    with torch.no_grad():
        w = torch.randn(n_e, e_dim) * 0.5
        ref.embedding.weight.copy_(w)
        ours.embedding.weight.copy_(w)
    return ref, ours


def _run(module, z: torch.Tensor, g: torch.Tensor):
    module.zero_grad()
    z = z.clone().requires_grad_(True)
    z_q, loss, (_, _, idx) = module(z)
    (z_q * g).sum().add(loss).backward()
    return z_q.detach(), loss.detach(), idx, z.grad, module.embedding.weight.grad.clone()


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [True, False])
def test_ste_equals_taming_vectorquantizer2(legacy: bool, sane_index_shape: bool) -> None:
    ref, ours = _pair(legacy, sane_index_shape=sane_index_shape)
    z = torch.randn(3, 4, 5, 6)
    g = torch.randn(3, 4, 5, 6)
    r, o = _run(ref, z, g), _run(ours, z, g)
    for name, a, b in zip(("z_q", "loss", "indices", "grad_z", "grad_codebook"), r, o):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_taming_state_dict_round_trips_strict() -> None:
    ref = VectorQuantizer2(32, 3, beta=0.25)
    ours = RotationVectorQuantizer(32, 3, beta=0.25, gradient="rotation_released")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert set(ours.state_dict()) == {"embedding.weight"}
    torch.testing.assert_close(ours.get_codebook_entry(torch.tensor([1, 2, 3, 4]), (1, 2, 2, 3)),
                               ref.get_codebook_entry(torch.tensor([1, 2, 3, 4]), (1, 2, 2, 3)))


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_every_estimator_has_upstream_forward_value_and_loss(gradient: str) -> None:
    ref, ours = _pair(True)
    ours.gradient = gradient
    z = torch.randn(2, 4, 3, 3)
    g = torch.randn(2, 4, 3, 3)
    zr, lr, ir, gzr, gcr = _run(ref, z, g)
    zo, lo, io, gzo, gco = _run(ours, z, g)
    torch.testing.assert_close(zo, zr, rtol=0, atol=1e-6)
    torch.testing.assert_close(lo, lr, rtol=0, atol=0)
    assert torch.equal(io, ir)
    # The codebook learns from the codebook loss alone, whatever the estimator.
    torch.testing.assert_close(gco, gcr, rtol=0, atol=1e-7)
    if gradient != "ste":
        assert not torch.allclose(gzo, gzr, atol=1e-4), "the encoder gradient must differ from straight-through"
        z_rows = ours.embedding.weight[io].view(2, 3, 3, 4).permute(0, 3, 1, 2)
        assert torch.equal(zo, z_rows), "forward value must be exactly the codeword"


def test_unknown_options_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="choose one of ste, rotation"):
        RotationVectorQuantizer(8, 3, gradient="rotate")
    with pytest.raises(ValueError, match="search_chunk_size must be a positive"):
        RotationVectorQuantizer(8, 3, search_chunk_size=0)
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 3, H, W\)"):
        RotationVectorQuantizer(8, 3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="use_residual"):
        NormRotationQuantizer(3, 8, use_residual=True)


@pytest.mark.parametrize("chunk", [1, 7, 100, None])
def test_bounded_search_equals_full_distance_matrix(chunk) -> None:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1000, 8, generator=gen)
    cb = torch.randn(300, 8, generator=gen)
    full = torch.argmin(torch.sum(z ** 2, 1, keepdim=True) + torch.sum(cb ** 2, 1) - 2 * z @ cb.t(), dim=1)
    assert torch.equal(nearest_code(z, cb, chunk_rows=chunk), full)
    assert torch.equal(nearest_code(z, cb, max_bytes=4 * 300 * 3), full)  # three rows a block
    # and against an exact float64 oracle on the same data
    assert torch.equal(full, torch.cdist(z.double(), cb.double()).argmin(1))


def test_module_chunked_search_equals_unchunked() -> None:
    a = RotationVectorQuantizer(128, 3, search_chunk_size=5)
    b = RotationVectorQuantizer(128, 3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.embedding.weight.normal_()
        b.embedding.weight.copy_(a.embedding.weight)
    z = torch.randn(4, 3, 8, 8)
    assert torch.equal(a(z)[2][2], b(z)[2][2])


@requires_enhancing
@pytest.mark.parametrize("use_norm", [True, False])
def test_norm_quantizer_ste_equals_enhancing_vectorquantizer(use_norm: bool) -> None:
    from enhancing.modules.stage1.quantizers import VectorQuantizer

    torch.manual_seed(0)
    ref = VectorQuantizer(embed_dim=8, n_embed=64, beta=0.25, use_norm=use_norm)
    ours = NormRotationQuantizer(embed_dim=8, n_embed=64, beta=0.25, use_norm=use_norm, gradient="ste")
    ours.load_state_dict(ref.state_dict(), strict=True)
    z = torch.randn(2, 10, 8)
    g = torch.randn(2, 10, 8)
    outs = []
    for m in (ref, ours):
        m.zero_grad()
        zz = z.clone().requires_grad_(True)
        z_q, loss, idx = m(zz)
        (z_q * g).sum().add(loss).backward()
        outs.append((z_q.detach(), loss.detach(), idx, zz.grad, m.embedding.weight.grad.clone()))
    for name, a, b in zip(("z_q", "loss", "indices", "grad_z", "grad_codebook"), *outs):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    # upstream's decode path (embedding + norm) works on our module
    torch.testing.assert_close(ours.norm(ours.embedding(outs[1][2])), ref.norm(ref.embedding(outs[0][2])))


def test_norm_quantizer_rotates_raw_input_onto_unit_codeword() -> None:
    torch.manual_seed(1)
    m = NormRotationQuantizer(embed_dim=32, n_embed=128, gradient="rotation_released")
    z = (torch.randn(2, 16, 32) * 4).requires_grad_(True)
    z_q, _, idx = m(z)
    torch.testing.assert_close(z_q.norm(dim=-1), torch.ones(2, 16))
    assert torch.equal(z_q, torch.nn.functional.normalize(m.embedding.weight[idx], dim=-1))
    z_q.backward(torch.randn_like(z_q))
    assert (z.grad * z).sum(-1).abs().max() < 1e-4  # the released gradient has no component along e


@pytest.mark.parametrize("search", ["blocked", "auto"])
def test_a_float64_model_searches_in_float64_like_taming(search: str) -> None:
    """Codes far from the origin compared with their spacing (|c| = 1000, 1e-3 apart): in float32 the squared norms
    (~1e6, ulp 0.06) swallow distances of 1e-6, in float64 they do not. A float64 model must pick the nearer code, as
    taming's float64 search does; the module used to cast to float32 first."""
    ref = VectorQuantizer2(2, 2, beta=0.25, legacy=False).double()
    ours = RotationVectorQuantizer(2, 2, beta=0.25, legacy=False, gradient="rotation", search=search).double()
    codes = torch.tensor([[1000.0, 0.0], [1000.0, 1e-3]], dtype=torch.float64)
    with torch.no_grad():
        for m in (ref, ours):
            m.embedding.weight.copy_(codes)
    z = torch.tensor([1000.0, 0.9e-3], dtype=torch.float64).view(1, 2, 1, 1)
    z_q, _, (_, _, idx) = ours(z)
    assert ref(z)[2][2].flatten().tolist() == [1]
    assert idx.flatten().tolist() == [1]
    assert z_q.dtype == torch.float64 and torch.equal(z_q.flatten(), codes[1])
