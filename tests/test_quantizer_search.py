"""The nearest-code searches: fused (compiled, no N x K matrix) against blocked and against float64, near-tie bounds,
no recompilation per batch or codebook size, O(N + K) memory, auto's fallback (kept per device, dtype and d), one
dtype policy for both (float64 fused against cdist, half inputs upcast), non-finite codewords an error, and the
option in both codebases.

Bounds (derived in adapters/quantizer/search.py; u = 2^-24, gamma_m = m u / (1 - m u), D(k) = |z - c_k|^2 exact):
  fused index a vs the exact nearest k*:     D(a) - D(k*) <= gamma_{d+2} (D(a) + D(k*))
  blocked index b vs k*:                     D(b) - D(k*) <= gamma_{d+2} ((|z| + |c_b|)^2 + (|z| + |c_k*|)^2)
  fused a != blocked b:                      |D(a) - D(b)| <= gamma_{d+2} ((|z| + |c_a|)^2 + (|z| + |c_b|)^2)
The float64 recomputation adds at most gamma^{f64}_{d+2} of each distance, which the checks include.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import adapters.quantizer.search as search_mod
from adapters.runtime.errors import UserError
from adapters.quantizer import (NormRotationQuantizer, RotationVectorQuantizer, find_nearest, fused_compile_count,
                                fused_nearest_code, nearest_code)
from conftest import ROOT, requires_enhancing, requires_ldm

U32, U64 = 2.0 ** -24, 2.0 ** -53


def gamma(m: int, u: float = U32) -> float:
    return m * u / (1 - m * u)


def exact(z: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances of the float32 rows, recomputed in float64."""
    return ((z.double()[:, None, :] - cb.double()[None]) ** 2).sum(-1)


def near_tie_data(n: int, k: int, d: int, seed: int, normalise: bool = False):
    """Half the rows generic, half on the bisector of a code and its nearest neighbour (ties up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(k, d, generator=g, dtype=torch.float64)
    if normalise:
        cb = torch.nn.functional.normalize(cb, dim=1)
    d_cc = torch.cdist(cb, cb).fill_diagonal_(float("inf"))
    a = torch.randint(k, (n // 2,), generator=g)
    b = d_cc[a].argmin(1)
    diff = cb[b] - cb[a]
    noise = torch.randn(n // 2, d, generator=g, dtype=torch.float64) * 1e-3 * diff.norm(dim=1, keepdim=True)
    noise -= (noise * diff).sum(1, keepdim=True) / (diff * diff).sum(1, keepdim=True) * diff  # stay on the bisector
    ties = (cb[a] + cb[b]) / 2 + noise
    generic = cb[torch.randint(k, (n - n // 2,), generator=g)] + 0.3 * torch.randn(n - n // 2, d, generator=g,
                                                                                    dtype=torch.float64)
    z = torch.cat([ties, generic])
    if normalise:
        z = torch.nn.functional.normalize(z, dim=1)
    return z.float(), cb.float()


def bounds(z: torch.Tensor, cb: torch.Tensor, dist: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
    """(fused-style bound on D(i) - D(j), blocked-style bound) per row, float64 recomputation slack included."""
    d = z.shape[1]
    di, dj = dist.gather(1, i[:, None])[:, 0], dist.gather(1, j[:, None])[:, 0]
    zn = z.double().norm(dim=1)
    ni, nj = cb.double().norm(dim=1)[i], cb.double().norm(dim=1)[j]
    slack = gamma(d + 2, U64) * (di + dj)
    return gamma(d + 2) * (di + dj) + slack, gamma(d + 2) * ((zn + ni) ** 2 + (zn + nj) ** 2) + slack


def assert_nearest(z: torch.Tensor, cb: torch.Tensor, idx: torch.Tensor) -> None:
    """idx is the exact nearest code of each row, or within the fused search's near-tie bound of it."""
    dist = exact(z, cb)
    best = dist.argmin(1)
    rows = torch.arange(len(z), device=z.device)
    assert ((dist[rows, idx] - dist[rows, best]) <= bounds(z, cb, dist, idx, best)[0]).all()


def check_near_ties(z: torch.Tensor, cb: torch.Tensor, fused: torch.Tensor, blocked: torch.Tensor) -> int:
    """Assert both bounds for every row, and that fused and blocked differ only on the bisector rows (the first
    half of near_tie_data's rows). Returns how many rows differ."""
    dist = exact(z, cb)
    best = dist.argmin(1)
    rows = torch.arange(len(z), device=z.device)
    fused_bound, _ = bounds(z, cb, dist, fused, best)
    gap = dist[rows, fused] - dist[rows, best]
    assert (gap <= fused_bound).all(), f"fused misses the nearest code by {gap.max():.3g} > {fused_bound.max():.3g}"
    gap_b = dist[rows, blocked] - dist[rows, best]
    assert (gap_b <= bounds(z, cb, dist, blocked, best)[1]).all()

    differ = (fused != blocked).nonzero()[:, 0]
    assert (differ < len(z) // 2).all(), "a generic (non-tie) row got different indices"
    pair_gap = (dist[differ, fused[differ]] - dist[differ, blocked[differ]]).abs()
    assert (pair_gap <= bounds(z[differ], cb, dist[differ], fused[differ], blocked[differ])[1]).all()
    # The bound is tight enough to matter: on generic rows the runner-up code would violate it.
    generic = rows[len(z) // 2:]
    second = dist[generic].topk(2, largest=False).indices[:, 1]
    runner_gap = dist[generic, second] - dist[generic, best[generic]]
    assert (runner_gap > bounds(z[generic], cb, dist[generic], second, best[generic])[1]).float().mean() > 0.99
    return len(differ)


@pytest.mark.parametrize("d,k,normalise", [(3, 512, False), (4, 1024, False), (32, 512, True)])
def test_fused_is_the_exact_nearest_code_and_differs_from_blocked_only_at_near_ties(d: int, k: int,
                                                                                     normalise: bool) -> None:
    z, cb = near_tie_data(4096, k, d, seed=d, normalise=normalise)
    differ = check_near_ties(z, cb, find_nearest(z, cb, "fused"), find_nearest(z, cb, "blocked"))
    # The bisector rows make the two searches disagree somewhere, so the pair bound is really exercised.
    assert differ > 0


def test_fused_keeps_full_precision_where_the_expanded_distance_cancels() -> None:
    # Codes 100 away from the origin and 0.01 apart: |z|^2 + |c|^2 - 2 z.c loses about 8 of float32's 24 bits.
    g = torch.Generator().manual_seed(7)
    cb = 100 + 0.01 * torch.randn(512, 3, generator=g)
    z = cb[torch.arange(4096) % 512] + 0.01 * torch.randn(4096, 3, generator=g)
    dist = exact(z, cb)
    best = dist.argmin(1)
    fused, blocked = fused_nearest_code(z, cb), nearest_code(z, cb)
    fused_bound, _ = bounds(z, cb, dist, fused, best)
    assert ((dist[torch.arange(4096), fused] - dist[torch.arange(4096), best]) <= fused_bound).all()
    assert (fused == best).float().mean() > 0.999
    _, blocked_bound = bounds(z, cb, dist, blocked, best)
    assert ((dist[torch.arange(4096), blocked] - dist[torch.arange(4096), best]) <= blocked_bound).all()
    assert (blocked != best).float().mean() > 0.05, "the expanded form should visibly lose precision here"


def test_no_recompilation_for_another_batch_or_codebook_size() -> None:
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(50, 3, generator=g)
    fused_nearest_code(torch.randn(37, 3, generator=g), cb)  # compiles for d = 3 unless this session already did
    compiled = fused_compile_count()
    for n, k in ((1000, 50), (1, 50), (2, 7), (5, 1), (4099, 3001)):
        z, c = torch.randn(n, 3, generator=g), torch.randn(k, 3, generator=g)
        assert_nearest(z, c, fused_nearest_code(z, c))
    with torch.inference_mode():  # Lightning's validation
        fused_nearest_code(torch.randn(9, 3, generator=g), cb)
    fused_nearest_code(torch.randn(40, 6, generator=g)[:, ::2], cb)  # strided input
    assert fused_nearest_code(torch.randn(0, 3), cb).shape == (0,)
    assert fused_compile_count() == compiled


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS peak")
def test_fused_search_memory_is_o_n_plus_k() -> None:
    n, k = 32768, 8192  # the full distance matrix would be 1 GiB of float32
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(n, 3, generator=g), torch.randn(k, 3, generator=g)
    fused_nearest_code(z[:8], cb)  # compile first: the compiler's own memory is not the search's

    def rss(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    base = rss("VmRSS")
    idx = fused_nearest_code(z, cb)
    extra = rss("VmHWM") - base
    assert extra < 48 * 2**20, f"the fused search took {extra / 2**20:.0f} MiB beyond its inputs"
    assert idx.shape == (n,)


def test_modules_give_the_same_codes_with_either_search() -> None:
    torch.manual_seed(0)
    fused = RotationVectorQuantizer(256, 3, gradient="rotation_released", search="fused")
    blocked = RotationVectorQuantizer(256, 3, gradient="rotation_released", search="blocked")
    blocked.load_state_dict(fused.state_dict())
    z = torch.randn(4, 3, 16, 16)
    (qf, lf, (_, _, i_f)), (qb, lb, (_, _, i_b)) = fused(z), blocked(z)
    assert torch.equal(i_f, i_b) and torch.equal(qf, qb) and torch.equal(lf, lb)
    # The l2-normalised (ViT-VQGAN) path: codes equal, or a near-tie of the normalised vectors.
    vf = NormRotationQuantizer(32, 512, gradient="rotation_released", search="fused")
    vb = NormRotationQuantizer(32, 512, gradient="rotation_released", search="blocked")
    vb.load_state_dict(vf.state_dict())
    x = torch.randn(2, 64, 32)
    (_, _, jf), (_, _, jb) = vf(x), vb(x)
    zn = torch.nn.functional.normalize(x.reshape(-1, 32), dim=1)
    cn = torch.nn.functional.normalize(vf.embedding.weight.detach(), dim=1)
    dist = exact(zn, cn)
    jf, jb = jf.reshape(-1), jb.reshape(-1)
    gap = (dist.gather(1, jf[:, None]) - dist.gather(1, jb[:, None]))[:, 0].abs()
    assert (gap <= bounds(zn, cn, dist, jf, jb)[1]).all()


def test_non_finite_rows_get_a_code_and_leave_the_others_alone() -> None:
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(64, 3, generator=g)
    z = torch.randn(40, 3, generator=g)
    z[1, 0], z[2, 1], z[3, 2] = float("nan"), float("inf"), -float("inf")
    idx = fused_nearest_code(z, cb)
    assert ((idx >= 0) & (idx < 64)).all() and idx[1] == 0  # an all-NaN row: code 0, as argmin gives
    finite = torch.isfinite(z).all(1)
    assert torch.equal(idx[finite], exact(z[finite], cb).argmin(1))


@pytest.mark.parametrize("z_dtype,cb_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float16)])
def test_both_searches_upcast_half_inputs_the_same_way(z_dtype: torch.dtype, cb_dtype: torch.dtype) -> None:
    """Issue 16, item 8: blocked computed in the inputs' dtype (bf16: wrong codes; fp16 z with an fp32 codebook:
    a raw dtype error). Both searches compute in float32 now: the codes of the float32 copies, near-ties aside."""
    z, cb = near_tie_data(2048, 512, 3, seed=21)
    z_h, cb_h = z.to(z_dtype), cb.to(cb_dtype)
    z32, cb32 = z_h.float(), cb_h.float()  # exact: every half value is a float32
    blocked, fused = find_nearest(z_h, cb_h, "blocked"), find_nearest(z_h, cb_h, "fused")
    assert torch.equal(blocked, nearest_code(z32, cb32)) and torch.equal(fused, fused_nearest_code(z32, cb32))
    # the half inputs' own exact nearest code (rounded half values, distances in float64), near-ties aside
    assert_nearest(z32, cb32, fused)
    dist = exact(z32, cb32)
    best, rows = dist.argmin(1), torch.arange(len(z32))
    assert ((dist[rows, blocked] - dist[rows, best]) <= bounds(z32, cb32, dist, blocked, best)[1]).all()
    differ = (fused != blocked).nonzero()[:, 0]
    gap = (dist[differ, fused[differ]] - dist[differ, blocked[differ]]).abs()
    assert (gap <= bounds(z32[differ], cb32, dist[differ], fused[differ], blocked[differ])[1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("search", ["blocked", "fused", "auto"])
def test_a_non_finite_codeword_is_one_clear_error_whichever_the_search(search: str, bad: float) -> None:
    """Issue 16, item 8: blocked chose a NaN codeword, fused skipped it. One policy now: a corrupted codebook is
    a UserError (one line), never a silent choice."""
    g = torch.Generator().manual_seed(4)
    z, cb = torch.randn(50, 3, generator=g), torch.randn(20, 3, generator=g)
    cb[7, 1] = bad
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        with pytest.raises(UserError) as info:
            find_nearest(z.to(dtype), cb.to(dtype), search)
        message = str(info.value)
        assert info.value.one_line and "\n" not in message
        assert message.startswith("nearest-code search: 1 of 20 codebook rows are not finite (NaN or inf; rows 7)")
        assert "Resume from an earlier checkpoint" in message
    with pytest.raises(UserError, match="codebook rows are not finite"):
        (nearest_code if search == "blocked" else fused_nearest_code)(z, cb)
    quantizer = RotationVectorQuantizer(20, 3, search=search)
    with torch.no_grad():
        quantizer.embedding.weight[3, 0] = bad
    with pytest.raises(UserError, match=r"1 of 20 codebook rows are not finite \(NaN or inf; rows 3\)"):
        quantizer(torch.randn(2, 3, 4, 4))


def test_non_finite_rows_of_z_get_code_0_in_both_searches() -> None:
    g = torch.Generator().manual_seed(8)
    cb = torch.randn(64, 3, generator=g) + 2.0  # all coordinates mostly positive: inf - inf in the expanded form
    z = torch.randn(40, 3, generator=g)
    z[1, 0], z[2, 1], z[3, 2], z[4] = float("nan"), float("inf"), -float("inf"), float("inf")
    finite = torch.isfinite(z).all(1)
    expected = torch.where(finite, exact(torch.where(finite[:, None], z, 0.0), cb).argmin(1), 0)
    for dtype in (torch.float32, torch.float64):
        for search in ("blocked", "fused"):
            assert torch.equal(find_nearest(z.to(dtype), cb.to(dtype), search), expected), (dtype, search)


def test_search_option_errors_are_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"^unknown nearest-code search 'fast': choose one of auto, fused, blocked$"):
        RotationVectorQuantizer(8, 3, search="fast")
    with pytest.raises(ValueError, match="unknown nearest-code search"):
        NormRotationQuantizer(4, 8, search="Fused")
    with pytest.raises(ValueError, match=r"expects z \(N, d\) and a non-empty codebook \(K, d\), got \(5, 3\) and "):
        find_nearest(torch.randn(5, 3), torch.randn(7, 4))


@pytest.fixture
def fresh_search_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's memory of what it warned about and what failed, emptied for one test."""
    monkeypatch.setattr(search_mod, "_WARNED", set())
    monkeypatch.setattr(search_mod, "_FAILED", {})
    monkeypatch.setattr(search_mod, "_WORKING", set())


def test_auto_falls_back_to_blocked_and_says_why_once(monkeypatch: pytest.MonkeyPatch,
                                                      fresh_search_state: None) -> None:
    monkeypatch.setattr(search_mod, "fused_search_unavailable",
                        lambda device: "no working C++ compiler for torch.compile (install g++ or set CXX)")
    z, cb = torch.randn(100, 3), torch.randn(20, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = find_nearest(z, cb, "auto"), find_nearest(z, cb, "auto")
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert said == ["search: auto uses the blocked nearest-code search on cpu: no working C++ compiler for "
                    "torch.compile (install g++ or set CXX); set search: blocked to silence this"]
    assert torch.equal(first, nearest_code(z, cb)) and torch.equal(second, first)
    with pytest.raises(RuntimeError, match=r"^search: fused cannot run on cpu: no working C\+\+ compiler .*; use "
                                           r"search: auto \(falls back to blocked\) or search: blocked$"):
        find_nearest(z, cb, "fused")


def test_auto_falls_back_when_compiling_fails(monkeypatch: pytest.MonkeyPatch, fresh_search_state: None) -> None:
    def broken(d: int, dtype: torch.dtype):
        def run(z, ct):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long inductor trace)")
        return run

    monkeypatch.setattr(search_mod, "_fused_for", broken)
    z, cb = torch.randn(64, 3), torch.randn(16, 3)
    with pytest.raises(RuntimeError, match=r"^search: fused cannot run on cpu for float32 rows of dimension 3: "
                                           r"torch.compile failed \(RuntimeError: InvalidCxxCompiler: No working C\+\+ "
                                           r"compiler found\); use search: auto"):
        find_nearest(z, cb, "fused")
    with pytest.warns(RuntimeWarning, match=r"blocked nearest-code search on cpu for float32 rows of dimension 3: "
                                            r"torch.compile failed"):
        idx = find_nearest(z, cb, "auto")
    assert torch.equal(idx, nearest_code(z, cb))
    # later calls for this (device, dtype, d) do not try again; nothing else is marked
    assert list(search_mod._FAILED) == [("cpu", torch.float32, 3)]
    assert search_mod._FAILED["cpu", torch.float32, 3].startswith("torch.compile failed")


def test_a_failed_compile_never_poisons_other_calls(monkeypatch: pytest.MonkeyPatch,
                                                    fresh_search_state: None) -> None:
    """Issue 16, item 5: a failure is kept per (device, dtype, d); float32 and other dimensions keep fusing."""
    real = search_mod._fused_for

    def fails_for_float64(d: int, dtype: torch.dtype):
        if dtype == torch.float64:
            def run(z, ct):
                raise RuntimeError("LoweringException: no float64 here")
            return run
        return real(d, dtype)

    monkeypatch.setattr(search_mod, "_fused_for", fails_for_float64)
    g = torch.Generator().manual_seed(5)
    z64 = torch.randn(200, 3, generator=g, dtype=torch.float64)
    cb64 = torch.randn(40, 3, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="on cpu for float64 rows of dimension 3: torch.compile failed"):
        assert torch.equal(find_nearest(z64, cb64, "auto"), nearest_code(z64, cb64))
    z32, cb32 = z64.float(), cb64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for float32
        assert torch.equal(find_nearest(z32, cb32, "fused"), exact(z32, cb32).argmin(1))
        assert torch.equal(find_nearest(z32, cb32, "auto"), exact(z32, cb32).argmin(1))
    assert ("cpu", torch.float32, 3) in search_mod._WORKING
    assert list(search_mod._FAILED) == [("cpu", torch.float64, 3)]
    with pytest.raises(RuntimeError, match="^search: fused cannot run on cpu for float64 rows of dimension 3: "):
        find_nearest(z64, cb64, "fused")


def test_fused_in_float64_returns_cdists_indices_and_leaves_float32_working(fresh_search_state: None) -> None:
    """Issue 16, item 5: float64 rows used to be viewed as int32 pairs; under auto that disabled fused for good."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    cb = torch.randn(300, 3, generator=g, dtype=torch.float64)
    expected = torch.cdist(z, cb, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.equal(torch.cdist(z, cb).argmin(1), expected)  # generic data: no near-tie in float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must not fall back (nor warn)
        assert torch.equal(find_nearest(z, cb, "auto"), expected)
        assert torch.equal(find_nearest(z, cb, "fused"), expected)
        mixed = torch.cdist(z, cb.float().double(), compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        assert torch.equal(find_nearest(z, cb.float(), "fused"), mixed)  # float64 if either is
        z32, cb32 = z.float(), cb.float()
        assert torch.equal(find_nearest(z32, cb32, "fused"), exact(z32, cb32).argmin(1))
        assert torch.equal(find_nearest(z32, cb32, "auto"), exact(z32, cb32).argmin(1))
    assert search_mod._FAILED == {}
    assert {("cpu", torch.float64, 3), ("cpu", torch.float32, 3)} <= search_mod._WORKING


def test_fused_search_inside_a_callers_compile() -> None:
    z, cb = torch.randn(300, 3), torch.randn(40, 3)
    compiled = torch.compile(lambda a, b: find_nearest(a, b, "fused"), fullgraph=True)
    assert torch.equal(compiled(z, cb), exact(z, cb).argmin(1))


@requires_ldm
def test_latent_diffusion_config_reaches_the_quantizer() -> None:
    from adapters.integrations.ldm import RotationVQModel

    dd = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    loss = {"target": "adapters.integrations.losses.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 0, "disc_in_channels": 3, "disc_num_layers": 1, "disc_ndf": 8,
                       "perceptual_weight": 0.0}}
    model = RotationVQModel(ddconfig=dd, lossconfig=loss, n_embed=32, embed_dim=3,
                            quantizer_config={"search": "blocked"})
    assert model.quantize.search == "blocked"
    assert RotationVQModel(ddconfig=dd, lossconfig=loss, n_embed=32, embed_dim=3).quantize.search == "auto"
    with pytest.raises(ValueError, match="unknown nearest-code search 'fusd'"):
        RotationVQModel(ddconfig=dd, lossconfig=loss, n_embed=32, embed_dim=3, quantizer_config={"search": "fusd"})


@requires_enhancing
def test_enhancing_config_reaches_the_quantizer() -> None:
    from omegaconf import OmegaConf

    from adapters.integrations.vitvqgan import RotationViTVQ

    params = OmegaConf.load(ROOT / "configs" / "tiny_rot_vitvqgan.yaml").model.params
    params.quantizer.search = "blocked"
    params.loss = {"target": "enhancing.losses.vqperceptual.DummyLoss"}
    assert RotationViTVQ(**params).quantizer.search == "blocked"
