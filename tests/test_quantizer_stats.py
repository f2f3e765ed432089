"""Codebook statistics on known inputs, and summed across two gloo ranks on CPU."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adapters.quantizer import RotationVectorQuantizer, codebook_log_dict, perplexity_from_counts


def _known_quantizer() -> RotationVectorQuantizer:
    """8 codes on the axes of R^2 scaled 1..4, so each input's code is known by construction."""
    m = RotationVectorQuantizer(8, 2, gradient="rotation")
    codes = torch.tensor([[1., 0.], [0., 1.], [-1., 0.], [0., -1.], [4., 0.], [0., 4.], [-4., 0.], [0., -4.]])
    with torch.no_grad():
        m.embedding.weight.copy_(codes)
    return m


def _as_image(rows: torch.Tensor) -> torch.Tensor:
    return rows.t().reshape(1, 2, 1, -1)


def test_batch_and_accumulated_stats_on_known_inputs() -> None:
    m = _known_quantizer()
    # codes 0, 0, 1, 4: offsets 0.1 along y, so ||e - q||^2 = 0.01 each
    batch1 = torch.tensor([[1., .1], [1., .1], [.1, 1.], [4., .1]])
    _, _, (_, _, idx) = m(_as_image(batch1))
    assert idx.tolist() == [0, 0, 1, 4]
    last = m.last_stats
    assert last["usage"].item() == pytest.approx(3 / 8)
    assert last["used_codes"].item() == 3 and last["dead_codes"].item() == 5
    assert last["quant_error"].item() == pytest.approx((0.01 + 0.01 + 0.01 + 0.01) / 4, rel=1e-5)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert last["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)

    batch2 = torch.tensor([[0., -4.2]])  # code 7, error 0.04
    m(_as_image(batch2))
    assert m.last_stats["usage"].item() == pytest.approx(1 / 8)
    assert m.code_counts.tolist() == [2, 1, 0, 0, 1, 0, 0, 1]
    acc = m.epoch_stats(reset=False)
    assert acc["usage"].item() == pytest.approx(4 / 8)
    assert acc["dead_codes"].item() == 4
    assert acc["quant_error"].item() == pytest.approx((0.04 + 0.04) / 5, rel=1e-5)
    assert acc["code_counts"].tolist() == [2, 1, 0, 0, 1, 0, 0, 1]
    # reset empties the histogram; state dict keys are untouched by the statistics
    m.epoch_stats(reset=True)
    assert int(m.code_counts.sum()) == 0
    assert set(m.state_dict()) == {"embedding.weight"}


def test_track_stats_off_and_log_keys() -> None:
    m = RotationVectorQuantizer(8, 2, track_stats=False)
    m(torch.randn(1, 2, 3, 3))
    assert int(m.code_counts.sum()) == 0
    logs = codebook_log_dict(_known_quantizer().epoch_stats(), "val")
    assert set(logs) == {"val/codebook_usage", "val/quant_error", "val/perplexity", "val/used_codes", "val/dead_codes"}
    assert perplexity_from_counts(torch.tensor([5, 5, 0, 0])).item() == pytest.approx(2.0)
    assert perplexity_from_counts(torch.zeros(4, dtype=torch.long)).item() == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _known_quantizer()
        # DDP broadcasts rank 0's buffers before every forward: the statistics must survive that.
        ddp = torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=True)
        # rank 0 uses codes {0, 1}, rank 1 uses {1, 5}; rank 1 also runs one extra batch.
        rows = [torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[0., 1.], [0., 4.]])][rank]
        ddp(_as_image(rows))
        ddp(_as_image(rows))
        if rank == 1:
            m(_as_image(torch.tensor([[0., 4.]])))
        stats = m.epoch_stats()
        out[rank] = {k: v.tolist() for k, v in stats.items()}
    finally:
        dist.destroy_process_group()


def test_epoch_stats_sum_over_two_gloo_ranks() -> None:
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        res = dict(out)
    assert res[0] == res[1], "every rank must get the same global statistics"
    assert res[0]["code_counts"] == [2, 4, 0, 0, 0, 3, 0, 0]
    assert res[0]["usage"] == pytest.approx(3 / 8)
