"""codebook_init: kmeans (issue 17): scale and reach after the first training forward, never after a load, the same
codebook on every rank, Lloyd against a float64 oracle, vector-quantize-pytorch's kmeans as a peer, config keys."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from taming.modules.vqvae.quantize import VectorQuantizer2

from conftest import run_ranks, requires_ldm

from adapters.quantizer import NormRotationQuantizer, RotationVectorQuantizer, kmeans_codebook
from adapters.quantizer.kmeans import kmeans_pp_seed, lloyd

ROOT = Path(__file__).resolve().parents[1]


def _encoder_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) vectors with |e| ~ 1 (0.5 to 1.5) in random directions."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    return e / e.norm(dim=1, keepdim=True) * (0.5 + torch.rand(n, 1, generator=g))


def _forward(q: torch.nn.Module, e: torch.Tensor) -> torch.Tensor:
    """One forward of either interface on rows e (N, d); returns the indices (N,)."""
    if isinstance(q, NormRotationQuantizer):
        return q(e.view(1, -1, e.shape[1]))[2].reshape(-1)
    n, d = e.shape
    z = e.view(1, n, 1, d).permute(0, 3, 1, 2)  # (1, d, N, 1): row i is position (i, 0)
    return q(z)[2][2].reshape(-1)


def _make(cls: type, k: int, d: int, **kw: object) -> torch.nn.Module:
    if cls is NormRotationQuantizer:
        return NormRotationQuantizer(d, k, search="blocked", **kw)
    return RotationVectorQuantizer(k, d, legacy=False, search="blocked", **kw)


@pytest.mark.parametrize("cls", [RotationVectorQuantizer, NormRotationQuantizer])
def test_first_training_forward_puts_codebook_at_encoder_scale_and_reaches_codes(cls: type) -> None:
    torch.manual_seed(0)
    q = _make(cls, 8192, 3, codebook_init="kmeans").train()
    e = _encoder_like(4096, 3)
    idx = _forward(q, e)
    c = q.embedding.weight.detach()
    ratio = (c.norm(dim=1).median() / e.norm(dim=1).median()).item()
    assert 0.3 <= ratio <= 3, ratio
    assert idx.unique().numel() >= 1024
    assert not q.codebook_init_pending
    if cls is NormRotationQuantizer:  # spherical: unit codewords
        assert torch.allclose(c.norm(dim=1), torch.ones(8192), atol=1e-5)
    # Not again: the next training forward leaves the codebook to the optimizer.
    before = c.clone()
    _forward(q, _encoder_like(4096, 3, seed=1) * 5)
    assert torch.equal(q.embedding.weight.detach(), before)


@pytest.mark.parametrize("cls", [RotationVectorQuantizer, NormRotationQuantizer])
def test_default_init_is_upstream_and_untouched(cls: type) -> None:
    torch.manual_seed(0)
    q = _make(cls, 512, 3).train()
    assert q.codebook_init == "upstream" and not q.codebook_init_pending
    before = q.embedding.weight.detach().clone()
    if cls is RotationVectorQuantizer:  # taming's uniform(-1/K, 1/K), the same draw as upstream's for a seed
        torch.manual_seed(0)
        assert torch.equal(before, VectorQuantizer2(512, 3, beta=0.25, legacy=False).embedding.weight.detach())
        assert before.abs().max() <= 1 / 512
    _forward(q, _encoder_like(256, 3))
    assert torch.equal(q.embedding.weight.detach(), before)


@pytest.mark.parametrize("cls", [RotationVectorQuantizer, NormRotationQuantizer])
def test_eval_forward_does_not_init(cls: type) -> None:
    q = _make(cls, 256, 3, codebook_init="kmeans").eval()
    before = q.embedding.weight.detach().clone()
    _forward(q, _encoder_like(512, 3))
    assert torch.equal(q.embedding.weight.detach(), before) and q.codebook_init_pending


@pytest.mark.parametrize("cls", [RotationVectorQuantizer, NormRotationQuantizer])
def test_loaded_codebook_is_never_reinitialised(cls: type) -> None:
    trained = _make(cls, 256, 3)
    with torch.no_grad():
        trained.embedding.weight.copy_(torch.randn(256, 3) * 0.1)
    q = _make(cls, 256, 3, codebook_init="kmeans").train()
    q.load_state_dict(trained.state_dict())  # what ckpt_path:, a resumed last.ckpt and a released checkpoint do
    _forward(q, _encoder_like(1024, 3))
    assert torch.equal(q.embedding.weight.detach(), trained.embedding.weight.detach())
    # A load without the codebook (ignore_keys dropped it) leaves the init pending.
    fresh = _make(cls, 256, 3, codebook_init="kmeans")
    fresh.load_state_dict({}, strict=False)
    assert fresh.codebook_init_pending


def test_adopting_upstreams_fresh_draw_keeps_the_init_pending() -> None:
    """The wrappers copy upstream's freshly drawn codebook (same draw for a seed); that is not a trained codebook."""
    upstream = VectorQuantizer2(128, 3, beta=0.25)
    q = RotationVectorQuantizer(128, 3, codebook_init="kmeans")
    q.adopt_initial_codebook(upstream)
    assert q.codebook_init_pending and torch.equal(q.embedding.weight, upstream.embedding.weight)


def test_upstream_checkpoint_loads_strictly_and_keys_are_unchanged() -> None:
    upstream = VectorQuantizer2(128, 3, beta=0.25, legacy=False)
    q = RotationVectorQuantizer(128, 3, legacy=False, codebook_init="kmeans")
    assert list(q.state_dict()) == list(upstream.state_dict())  # no new key: the pending flag is an attribute
    q.load_state_dict(upstream.state_dict(), strict=True)
    back = VectorQuantizer2(128, 3, beta=0.25, legacy=False)
    back.load_state_dict(q.state_dict(), strict=True)


def test_bad_options_are_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="upstream, kmeans"):
        RotationVectorQuantizer(64, 3, codebook_init="kmean")
    with pytest.raises(ValueError, match="kmeans_iters"):
        RotationVectorQuantizer(64, 3, codebook_init="kmeans", kmeans_iters=-1)
    with pytest.raises(ValueError, match=r"unknown quantizer option\(s\) \['codebook_int'\] for NormRotationQuantizer; "
                                         r"valid: .*codebook_init"):
        NormRotationQuantizer(8, 64, codebook_int="kmeans")
    with pytest.raises(ValueError, match=r"\['serach'\] for RotationVectorQuantizer; valid: n_e, e_dim, .*search"):
        RotationVectorQuantizer(64, 3, serach="blocked")


def test_lloyd_is_a_fixed_point_of_the_float64_oracle() -> None:
    """After Lloyd, every non-empty centre is the mean of the rows nearest to it (explicit float64 distances)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(300, 4, generator=g) * 0.1 + m for m in torch.randn(6, 4, generator=g) * 3])
    c = lloyd(x.double(), kmeans_pp_seed(x.double(), 6, g), iters=30)
    d = ((x.double()[:, None, :] - c[None]) ** 2).sum(-1)
    assign = d.argmin(1)
    for j in range(6):
        members = x.double()[assign == j]
        assert members.shape[0] > 0
        assert torch.allclose(c[j], members.mean(0), atol=1e-9)


def test_kmeans_pp_covers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0], [-10, 0], [0, 10], [0, -10]])
    x = torch.cat([centres[i] + 0.01 * torch.randn(200, 2, generator=g) for i in range(4)])
    seeds = kmeans_pp_seed(x, 4, g)
    nearest = ((seeds[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]  # D^2 sampling picks one seed per far cluster


@pytest.mark.parametrize("spherical", [False, True])
def test_inertia_no_worse_than_vector_quantize_pytorch(spherical: bool) -> None:
    """The peer library's kmeans (uniform seeding + Lloyd): ours (k-means++ + Lloyd) reaches an inertia at most 5%
    above it on clustered data, over 3 seeds (k-means++ usually does better; neither is a global optimum)."""
    vq = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    import torch.nn.functional as F

    ours_total, theirs_total = 0.0, 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.cat([torch.randn(100, 8, generator=g) * 0.2 + m for m in torch.randn(32, 8, generator=g) * 2])
        if spherical:
            x = F.normalize(x, dim=1)
        torch.manual_seed(seed)
        ours = kmeans_codebook(x, 32, iters=10, spherical=spherical, generator=g)
        theirs, _ = vq.kmeans(x[None], 32, num_iters=10, use_cosine_sim=spherical)
        for c, acc in ((ours, "ours"), (theirs[0], "theirs")):
            inertia = torch.cdist(x, c).min(1).values.pow(2).sum().item()
            if acc == "ours":
                ours_total += inertia
            else:
                theirs_total += inertia
    assert ours_total <= 1.05 * theirs_total, (ours_total, theirs_total)


def test_fewer_vectors_than_codes_gives_distinct_jittered_copies() -> None:
    x = _encoder_like(100, 3)
    c = kmeans_codebook(x, 1000, generator=torch.Generator().manual_seed(0))
    assert c.shape == (1000, 3) and torch.isfinite(c).all()
    assert torch.unique(c, dim=0).shape[0] == 1000  # the copies are distinct
    # every vector is a codeword exactly: each row's nearest code is at distance 0
    assert (x[:, None] - c[None]).abs().sum(-1).min(1).values.max() == 0


@pytest.mark.parametrize("n, k", [(100, 1000), (4096, 512), (4096, 4096)])
def test_duplicate_encoder_rows_never_become_duplicate_codewords(n: int, k: int) -> None:
    # A flat image region gives many equal encoder rows: (n, k) = (100, 1000) has fewer vectors than codes, (4096,
    # 512) more vectors than codes but only 300 distinct ones, (4096, 4096) exactly as many as codes (all fallbacks).
    distinct = _encoder_like(min(n, 300), 3)
    x = distinct[torch.arange(n) % distinct.shape[0]]
    for spherical in (False, True):
        c = kmeans_codebook(x, k, spherical=spherical, generator=torch.Generator().manual_seed(1))
        assert c.shape == (k, 3) and torch.isfinite(c).all()
        assert torch.unique(c, dim=0).shape[0] == k, "every code k-means returns must be distinct"
    # a batch of one repeated vector still gives k distinct codes at its scale
    c = kmeans_codebook(torch.full((64, 3), 0.5), 16)
    assert torch.unique(c, dim=0).shape[0] == 16 and (c - 0.5).abs().max() < 0.1


def test_kmeans_init_leaves_the_global_random_stream_to_the_run() -> None:
    # The upstream-init twin of a seed and the k-means run must see the same crops, sampler seeds and dropout after
    # the init: the init draws from a generator of its own, seeded from the run's seed.
    e = _encoder_like(1024, 3, seed=5)
    after = {}
    for init in ("upstream", "kmeans"):
        torch.manual_seed(7)
        q = RotationVectorQuantizer(512, 3, legacy=False, codebook_init=init, search="blocked").train()
        _forward(q, e)
        after[init] = torch.rand(8)
    assert torch.equal(after["upstream"], after["kmeans"])


def test_kmeans_init_follows_the_run_seed() -> None:
    e = _encoder_like(1024, 3, seed=5)
    books = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        q = RotationVectorQuantizer(2048, 3, legacy=False, codebook_init="kmeans", search="blocked").train()
        _forward(q, e)
        books.append(q.embedding.weight.detach().clone())
    assert torch.equal(books[0], books[1]) and not torch.equal(books[0], books[2])


def test_non_finite_batch_is_a_clear_error_and_non_finite_rows_are_ignored() -> None:
    with pytest.raises(ValueError, match="no finite encoder output"):
        kmeans_codebook(torch.full((10, 3), float("nan")), 4)
    x = _encoder_like(64, 3)
    x[0] = float("inf")
    assert torch.isfinite(kmeans_codebook(x, 16)).all()


def test_dtype_is_kept() -> None:
    assert kmeans_codebook(_encoder_like(64, 3).double(), 8).dtype == torch.float64


# --- DDP: every rank ends with rank 0's codebook ------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG streams and batches per rank, as under DDP
        q = RotationVectorQuantizer(512, 3, legacy=False, codebook_init="kmeans", search="blocked").train()
        _forward(q, _encoder_like(1024, 3, seed=rank))
        torch.save(q.embedding.weight.detach(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_codebook(tmp_path: Path) -> None:
    run_ranks(_ddp_worker, tmp_path)
    c0, c1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(c0, c1)
    # and it is rank 0's batch that set it (k-means on it fits rank 0's vectors better than rank 1's)
    x0 = _encoder_like(1024, 3, seed=0)
    x1 = _encoder_like(1024, 3, seed=1)
    inertia = [torch.cdist(x, c0).min(1).values.pow(2).mean().item() for x in (x0, x1)]
    assert inertia[0] < inertia[1]


def _ddp_failure_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: before the fix rank 1 waited in the codebook's broadcast until it expired.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        q = RotationVectorQuantizer(64, 3, legacy=False, codebook_init="kmeans", search="blocked").train()
        e = _encoder_like(256, 3, seed=rank)
        if rank == 0:
            e = torch.full_like(e, float("nan"))  # rank 0's k-means fails: no finite encoder output
        start = time.monotonic()
        try:
            _forward(q, e)
            Path(f"{out}/rank{rank}.txt").write_text("no error")
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            Path(f"{out}/rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc} after {time.monotonic() - start:.1f}")
    finally:
        dist.destroy_process_group()


def test_ddp_kmeans_failure_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    run_ranks(_ddp_failure_worker, tmp_path)
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0.startswith("ValueError") and "no finite encoder output" in r0
    assert r1.startswith("RuntimeError") and "failed on rank 0" in r1
    assert float(r1.rsplit(" ", 1)[1]) < 30, r1  # at once, not at the collective's timeout


# --- config keys -------------------------------------------------------------------------------------------------
def test_vitvqgan_kmeans_configs_name_their_base_and_set_the_key() -> None:
    from adapters.evaluation.model_loading import load_config

    for name, base in (("small_kmeans_vitvqgan", "small_vitvqgan"), ("small_kmeans_rot_vitvqgan", "small_rot_vitvqgan")):
        cfg, ref = load_config(ROOT / "configs" / f"{name}.yaml"), load_config(ROOT / "configs" / f"{base}.yaml")
        assert cfg.model.params.quantizer.codebook_init == "kmeans"
        del cfg.model.params.quantizer["codebook_init"]
        assert cfg == ref  # nothing else differs


@requires_ldm
@pytest.mark.ldm
def test_vqgan_config_key_reaches_the_quantizer() -> None:
    from adapters.integrations.ldm import RotationVQModel

    ddconfig = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    loss = {"target": "adapters.integrations.losses.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 0, "disc_in_channels": 3, "disc_num_layers": 1, "disc_ndf": 8,
                       "perceptual_weight": 0.0}}
    model = RotationVQModel(ddconfig, loss, n_embed=64, embed_dim=3, gradient="ste",
                            quantizer_config={"codebook_init": "kmeans", "kmeans_iters": 3})
    assert model.quantize.codebook_init_pending and model.quantize.kmeans_iters == 3
    model.train()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert not model.quantize.codebook_init_pending
    assert model.quantize.embedding.weight.abs().max() > 1 / 64  # no longer taming's uniform(-1/K, 1/K)
