"""The Lightning-side codebook logging shared by both wrappers (no upstream tree needed)."""
from __future__ import annotations

import math

import torch

from adapters.evaluation.codebook_logging import stats_paused, usage_picture
from adapters.quantizer import RotationVectorQuantizer


def test_usage_picture_is_one_pixel_per_code_log_scaled() -> None:
    counts = torch.zeros(8192, dtype=torch.long)
    counts[[0, 5, 8191]] = torch.tensor([1, 100, 7])
    pic = usage_picture(counts)
    assert pic.shape == (1, 3, 64, 128)
    flat = pic[0, 0].reshape(-1)
    assert flat[5] == 1.0 and flat[1] == 0.0
    assert math.isclose(flat[0].item(), math.log(2) / math.log(101), rel_tol=1e-6)
    assert torch.equal(pic[0, 0], pic[0, 2])


def test_stats_paused_stops_counting_and_restores() -> None:
    q = RotationVectorQuantizer(16, 3)
    z = torch.randn(1, 3, 4, 4)
    with stats_paused(q):
        q(z)
        assert q.track_stats is False
    assert q.track_stats is True and int(q.code_counts.sum()) == 0
    q(z)
    assert int(q.code_counts.sum()) == 16
