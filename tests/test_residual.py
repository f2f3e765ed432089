"""Residual stages (adapters/quantizer/residual.py): enhancing's ``VectorQuantizer(use_residual=True)`` swapped and
reproduced with ``ste``; both rotation scopes against a float64 oracle written with explicit loops and d x d
matrices, and the ``stage`` scope against vector-quantize-pytorch's ``ResidualVQ``; bad values."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from adapters import swap_quantizers
from adapters.quantizer import GRADIENTS, NormRotationQuantizer, ResidualNormRotationQuantizer
from conftest import ROOT, requires_enhancing

N_E, E_DIM, STAGES = 32, 4, 2
ROTATIONS = [g for g in GRADIENTS if g != "ste"]


def _upstream(use_norm: bool = True, stages: int = STAGES) -> nn.Module:
    from enhancing.modules.stage1.quantizers import VectorQuantizer as EnhancingVQ

    torch.manual_seed(0)  # upstream's N(0, 1) codebook: spread out, no near-ties between the 32 codes
    return EnhancingVQ(E_DIM, N_E, beta=0.25, use_norm=use_norm, use_residual=True, num_quantizers=stages)


def _run(quantizer: nn.Module, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward and backward of <out, g> + loss: (out, loss, indices, grad of z, grad of the codebook)."""
    quantizer.zero_grad()
    z = z.clone().requires_grad_()
    out, loss, idx = quantizer(z)
    ((out * g).sum() + loss).backward()
    return out.detach(), loss.detach(), idx, z.grad, quantizer.embedding.weight.grad.clone()


# --- upstream, through swap_quantizers ------------------------------------------------------------------------------
@requires_enhancing
@pytest.mark.enhancing
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("stages", [2, 3])
def test_swapped_residual_quantizer_with_ste_is_upstream_bit_for_bit(use_norm: bool, stages: int) -> None:
    holder = nn.Module()
    holder.quantize = _upstream(use_norm, stages)
    keys = list(holder.state_dict())
    z, g = torch.randn(2, 9, E_DIM), torch.randn(2, 9, E_DIM)
    ref = _run(holder.quantize, z, g)
    assert ref[2].shape == (2, 9, stages)
    results = []
    for scope in ("total", "stage"):  # with ste the scopes are one estimator: both must be upstream's
        swapped = copy.deepcopy(holder)
        assert swap_quantizers(swapped, gradient="ste", search="blocked", rotation_scope=scope) == ["quantize"]
        q = swapped.quantize
        assert type(q) is ResidualNormRotationQuantizer and (q.num_quantizers, q.rotation_scope) == (stages, scope)
        assert q.use_residual and q.use_norm == use_norm and list(swapped.state_dict()) == keys
        results.append(_run(q, z, g))
    for out in results:
        for name, a, b in zip(("output", "loss", "indices", "input gradient"), ref[:4], out[:4]):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name
        # The codebook gradient sums the same terms in another order (the stage codeword is gathered twice: for
        # its loss and for the residual): equal up to float rounding, not bit for bit.
        torch.testing.assert_close(out[4], ref[4], rtol=1e-6, atol=1e-8)


@requires_enhancing
@pytest.mark.enhancing
def test_rotation_changes_only_the_encoder_gradient_and_checkpoints_cross_both_ways() -> None:
    up = _upstream()
    z, g = torch.randn(3, 7, E_DIM), torch.randn(3, 7, E_DIM)
    ref = _run(up, z, g)
    for scope in ("total", "stage"):
        ours = ResidualNormRotationQuantizer(E_DIM, N_E, 0.25, num_quantizers=STAGES, gradient="rotation_released",
                                             rotation_scope=scope, search="blocked")
        ours.load_state_dict(up.state_dict(), strict=True)
        out, loss, idx, gz, gc = _run(ours, z, g)
        assert torch.equal(idx, ref[2]) and torch.equal(loss, ref[1])
        torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-6)  # upstream's value is e + sg(s - e), rounded
        torch.testing.assert_close(gc, ref[4], rtol=1e-6, atol=1e-8)  # no estimator reaches the codebook
        assert not torch.allclose(gz, ref[3], rtol=1e-3, atol=1e-5)
        up.load_state_dict(ours.state_dict(), strict=True)
    # statistics: every stage's codes on the one codebook; the error the stages leave of the raw input
    stats = ours.last_stats
    counts = torch.bincount(idx.reshape(-1), minlength=N_E)
    assert int(ours.code_counts.sum()) == 3 * 7 * STAGES
    assert float(stats["used_codes"]) == float((counts > 0).sum())
    torch.testing.assert_close(stats["quant_error"], (z - out).square().sum(-1).mean(), rtol=1e-5, atol=1e-7)


# --- float64 oracle: explicit loops and d x d matrices ----------------------------------------------------------------
def _jacobian(e: Tensor, q: Tensor, gradient: str) -> Tensor:
    """d(output)/de of one row's estimator, as a (d, d) matrix (functional.py's docstring table)."""
    eye = torch.eye(e.numel(), dtype=torch.float64)
    if gradient == "ste":
        return eye
    u, q_hat = e / e.norm(), q / q.norm()
    w = (u + q_hat) / (u + q_hat).norm()
    rot = eye - 2 * torch.outer(w, w) + 2 * torch.outer(q_hat, u)
    project = eye - torch.outer(u, u)  # d(e/|e|)/de = project / |e|
    if gradient == "rotation":
        return q.norm() / e.norm() * rot
    if gradient == "rotation_released":
        return q.norm() / e.norm() * rot @ project
    if gradient == "reflection":
        v = (u - q_hat) / (u - q_hat).norm()
        return q.norm() / e.norm() * (eye - 2 * torch.outer(v, v)) @ project
    assert gradient == "rotation_unscaled"
    return rot @ project / e.norm()


def _oracle(z: Tensor, codebook: Tensor, g: Tensor, stages: int, beta: float, use_norm: bool, gradient: str,
            scope: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upstream's residual quantizer and the estimator's encoder gradient, row by row in float64.

    z, g: (N, d); codebook (K, d). Returns (output (N, d), loss (0-d), indices (N, stages), grad_z (N, d)).
    """
    def norm(x: Tensor) -> Tensor:
        return x / x.norm() if use_norm else x

    n, d = z.shape
    eye = torch.eye(d, dtype=torch.float64)
    out, grad = torch.zeros(n, d, dtype=torch.float64), torch.zeros(n, d, dtype=torch.float64)
    idx = torch.zeros(n, stages, dtype=torch.long)
    sq_err = torch.zeros(stages, dtype=torch.float64)  # per stage: sum over rows and dims of (q - n(r))^2
    for i in range(n):
        r = z[i].clone()
        codewords, residuals = [], []
        for k in range(stages):
            dist = [float(((norm(r) - norm(codebook[j])) ** 2).sum()) for j in range(codebook.shape[0])]
            j = min(range(len(dist)), key=dist.__getitem__)
            q = norm(codebook[j])
            idx[i, k] = j
            sq_err[k] += ((q - norm(r)) ** 2).sum()
            codewords.append(q)
            residuals.append(r)
            r = r - q
        out[i] = sum(codewords)
        if scope == "total":
            m = _jacobian(z[i], out[i], gradient)
        else:  # out_k = est(r_k, q_k), r_{k+1} = r_k - out_k: dr_{k+1}/dz = (I - J_k) dr_k/dz
            m, chain = torch.zeros(d, d, dtype=torch.float64), eye
            for r_k, q_k in zip(residuals, codewords):
                j_k = _jacobian(r_k, q_k, gradient)
                m = m + j_k @ chain
                chain = (eye - j_k) @ chain
        grad[i] = m.T @ g[i]
    loss = ((1 + beta) * sq_err / (n * d)).mean()  # beta * commitment + codebook term, equal in value
    return out, loss, idx, grad


@pytest.mark.parametrize("scope", ["total", "stage"])
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_both_rotation_scopes_match_the_float64_oracle(scope: str, gradient: str, use_norm: bool) -> None:
    torch.manual_seed(1)
    quantizer = ResidualNormRotationQuantizer(E_DIM, N_E, 0.25, use_norm=use_norm, num_quantizers=3,
                                              gradient=gradient, rotation_scope=scope, search="blocked").double()
    z = torch.randn(2, 6, E_DIM, dtype=torch.float64) * 2
    g = torch.randn(2, 6, E_DIM, dtype=torch.float64)
    out, loss, idx, gz, _ = _run(quantizer, z, g)
    ref_out, ref_loss, ref_idx, ref_grad = _oracle(z.reshape(-1, E_DIM), quantizer.embedding.weight.detach(),
                                                   g.reshape(-1, E_DIM), 3, 0.25, use_norm, gradient, scope)
    assert torch.equal(idx.reshape(-1, 3), ref_idx)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(gz.reshape(-1, E_DIM), ref_grad, rtol=1e-10, atol=1e-12)
    # the forward value: exactly the stages' codewords summed in upstream's order (ste: upstream's e + sg(s - e))
    codewords = quantizer.norm(quantizer.embedding.weight.detach()[idx])  # (2, 6, 3, d)
    summed = torch.zeros_like(z)
    for k in range(3):
        summed = summed + codewords[..., k, :]
    if gradient == "ste":
        assert torch.equal(out, z + (summed - z))
    else:
        assert torch.equal(out, summed)
    torch.testing.assert_close(out.reshape(-1, E_DIM), ref_out, rtol=0, atol=1e-12)


def test_the_scopes_differ_for_a_rotation_and_agree_for_ste() -> None:
    torch.manual_seed(2)
    z, g = torch.randn(4, 5, E_DIM), torch.randn(4, 5, E_DIM)
    grads = {}
    for gradient in ("ste", "rotation"):
        for scope in ("total", "stage"):
            torch.manual_seed(3)
            q = ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=STAGES, gradient=gradient,
                                              rotation_scope=scope, search="blocked")
            grads[gradient, scope] = _run(q, z, g)[3]
    assert torch.equal(grads["ste", "total"], grads["ste", "stage"])
    assert torch.equal(grads["ste", "total"], g)  # upstream's: grad_e = grad_s, whatever the number of stages
    assert not torch.allclose(grads["rotation", "total"], grads["rotation", "stage"], rtol=1e-3, atol=1e-5)


def test_stage_scope_matches_vector_quantize_pytorch_residual_vq() -> None:
    """Peer: vector-quantize-pytorch's ResidualVQ with one shared codebook, quant_grad_frac=1 (each residual keeps
    the gradient of the stages before it: the same chain as rotation_scope="stage") and its rotation trick
    (``rotate_to``, the paper's formula: our ``rotation``). Not bit for bit: its output is the rotated residual
    times |q|/|r| (q up to rounding, where ours is q exactly), and its search is another expression (same codes
    here: no near-ties). Euclidean lookup (use_norm=False): its cosine codebook normalises differently."""
    from vector_quantize_pytorch import ResidualVQ

    torch.manual_seed(4)
    peer = ResidualVQ(dim=E_DIM, num_quantizers=STAGES, codebook_size=N_E, shared_codebook=True, quant_grad_frac=1.0,
                      rotation_trick=True, learnable_codebook=True, ema_update=False, kmeans_init=False).train()
    ours = ResidualNormRotationQuantizer(E_DIM, N_E, use_norm=False, num_quantizers=STAGES, gradient="rotation",
                                         rotation_scope="stage", search="blocked")
    with torch.no_grad():
        peer.layers[0]._codebook.embed.copy_(ours.embedding.weight[None])
    for step in range(3):  # a fixed sequence of batches; no optimizer, so the codebook stays the same
        x, g = torch.randn(3, 5, E_DIM) * (1 + step), torch.randn(3, 5, E_DIM)
        xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_p, idx_p, _ = peer(xp)
        (out_p * g).sum().backward()
        out_o, _, idx_o = ours(xo)
        (out_o * g).sum().backward()
        assert torch.equal(idx_p, idx_o)
        torch.testing.assert_close(out_o, out_p.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(xo.grad, xp.grad, rtol=1e-5, atol=1e-5)


# --- construction, options, bad values --------------------------------------------------------------------------------
def test_bad_values_get_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^unknown rotation_scope 'per_stage': choose one of total, stage$"):
        ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=2, rotation_scope="per_stage")
    for bad in (None, 0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"num_quantizers must be a positive number of residual stages"):
            ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=bad)
    with pytest.raises(ValueError, match="use_residual=False is one lookup: build NormRotationQuantizer"):
        ResidualNormRotationQuantizer(E_DIM, N_E, use_residual=False, num_quantizers=2)
    with pytest.raises(ValueError, match=r"for use_residual=True \(residual stages\) build "
                                         r"adapters.quantizer.ResidualNormRotationQuantizer"):
        NormRotationQuantizer(E_DIM, N_E, use_residual=True, num_quantizers=2)
    with pytest.raises(ValueError, match=r"unknown quantizer option\(s\) \['rotation_scop'\] for "
                                         r"ResidualNormRotationQuantizer; valid: .*rotation_scope.*gradient.*search"):
        ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=2, rotation_scop="stage")
    for option, value in (("codebook_update", "ema"), ("dead_code_threshold", 1.0), ("codebook_param", "simvq")):
        with pytest.raises(ValueError, match=rf"^{option}={value!r} is not supported with residual stages"):
            ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=2, **{option: value})
    q = ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=2, gradient="reflection", search="blocked",
                                      codebook_init="kmeans", kmeans_iters=3)
    assert (q.gradient, q.search, q.codebook_init, q.kmeans_iters, q.rotation_scope) == \
        ("reflection", "blocked", "kmeans", 3, "total")
    with pytest.raises(ValueError, match=r"^unknown rotation_scope 'x': choose one of total, stage$"):
        swap_quantizers(nn.Sequential(nn.Linear(2, 2)), rotation_scope="x")
    from taming.modules.vqvae.quantize import VectorQuantizer2

    holder = nn.Module()
    holder.quantize = VectorQuantizer2(N_E, E_DIM, beta=0.25)
    with pytest.raises(ValueError, match="rotation_scope applies to residual quantizers .* this model has none"):
        swap_quantizers(holder, rotation_scope="stage")
    assert type(holder.quantize) is VectorQuantizer2


def test_kmeans_init_fits_the_first_stage_input_once() -> None:
    torch.manual_seed(5)
    q = ResidualNormRotationQuantizer(E_DIM, N_E, num_quantizers=STAGES, codebook_init="kmeans", search="blocked")
    before = q.embedding.weight.detach().clone()
    z = torch.randn(4, 16, E_DIM)
    q(z)
    assert not q.codebook_init_pending and not torch.equal(q.embedding.weight, before)
    after = q.embedding.weight.detach().clone()
    q(z)
    assert torch.equal(q.embedding.weight, after)  # no second init at the second stage or the next forward


# --- RotationViTVQ config -------------------------------------------------------------------------------------------
def _tiny_params(**quantizer: object) -> dict:
    params = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "tiny_rot_vitvqgan.yaml").model.params)
    params.pop("gradient")
    params["loss"] = {"target": "enhancing.losses.vqperceptual.DummyLoss", "params": {}}
    params["quantizer"].update(quantizer)
    return params


@requires_enhancing
@pytest.mark.enhancing
def test_rotation_vitvq_builds_residual_stages_from_its_config() -> None:
    from enhancing.modules.stage1.vitvqgan import ViTVQ

    from adapters.integrations.vitvqgan import RotationViTVQ

    torch.manual_seed(0)
    up = ViTVQ(**OmegaConf.create(_tiny_params(use_residual=True, num_quantizers=2)))
    ours = RotationViTVQ(**_tiny_params(use_residual=True, num_quantizers=2, rotation_scope="stage"), gradient="ste")
    assert type(ours.quantizer) is ResidualNormRotationQuantizer and ours.quantizer.rotation_scope == "stage"
    assert list(ours.state_dict()) == list(up.state_dict())
    ours.load_state_dict(up.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16)
    codes = up.encode_codes(x)
    assert codes.shape[-1] == 2 and torch.equal(ours.encode_codes(x), codes)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], up(x)[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.decode_codes(codes), up.decode_codes(codes), rtol=0, atol=1e-6)
    default = RotationViTVQ(**_tiny_params(use_residual=True, num_quantizers=2), gradient="rotation_released")
    assert default.quantizer.rotation_scope == "total"
    with pytest.raises(ValueError, match="model.params.quantizer.rotation_scope applies to residual stages"):
        RotationViTVQ(**_tiny_params(rotation_scope="stage"), gradient="ste")
    with pytest.raises(ValueError, match="unknown rotation_scope 'both'"):
        RotationViTVQ(**_tiny_params(use_residual=True, num_quantizers=2, rotation_scope="both"), gradient="ste")
