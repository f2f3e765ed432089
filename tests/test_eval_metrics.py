"""adapters.evaluation.metrics: FID/IS against closed forms, PSNR/SSIM against references, weight errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.evaluation import metrics as M


def _moments(x: np.ndarray, chunks: int = 3) -> M.FeatureMoments:
    m = M.FeatureMoments(x.shape[1])
    for part in np.array_split(x, chunks):
        m.update(torch.from_numpy(part))
    return m


def test_feature_moments_match_numpy_mean_and_cov() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * rng.uniform(0.5, 3, size=6) + rng.normal(size=6)
    mu, sigma = _moments(x, chunks=7).statistics()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    a, b = _moments(x, 2), _moments(x, 5)
    assert abs(M.fid_from_moments(a, b)) < 1e-6


def test_fid_of_gaussians_matches_closed_form() -> None:
    # For commuting covariances (same eigenbasis U) FID = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2.
    rng = np.random.default_rng(2)
    d = 10
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    l1, l2 = rng.uniform(0.2, 4.0, d), rng.uniform(0.2, 4.0, d)
    s1, s2 = u @ np.diag(l1) @ u.T, u @ np.diag(l2) @ u.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert M.fid_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_sampled_shifted_gaussian_set_matches_shift() -> None:
    # Features drawn from N(0, I) and N(delta, I): FID -> |delta|^2 (sampling error O(d^2 / n)).
    rng = np.random.default_rng(3)
    d, n = 8, 40000
    delta = np.full(d, 0.5)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) + delta
    fid = M.fid_from_moments(_moments(x), _moments(y))
    assert fid == pytest.approx(float(delta @ delta), abs=0.02)


def test_statistics_need_two_vectors() -> None:
    m = M.FeatureMoments(3)
    m.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        m.statistics()


def test_inception_score_limits() -> None:
    # Identical predictions: IS = 1. Confident, distinct predictions over k classes: IS = k.
    same = torch.zeros(20, 1008)
    assert M.inception_score(same, splits=1)[0] == pytest.approx(1.0)
    k = 10
    confident = torch.full((k, 1008), -50.0)
    confident[torch.arange(k), torch.arange(k)] = 50.0
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        M.inception_score(torch.zeros(0, 1008))


def test_psnr_of_a_constant_offset() -> None:
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a + 0.1  # mse 0.01 -> 20 dB
    assert torch.allclose(M.psnr(a, b), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    ours = M.ssim(a, b)
    for i in range(2):
        ref = structural_similarity(a[i].permute(1, 2, 0).numpy().astype(np.float64),
                                    b[i].permute(1, 2, 0).numpy().astype(np.float64), channel_axis=2,
                                    data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=2e-3)
    assert M.ssim(a, a).min().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        M.ssim(a, b[:, :, :16])


def test_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 5)
    assert M.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


def test_inception_weights_missing_file_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(M.MissingWeightsError, match=M.INCEPTION_FILE):
        M.load_inception(tmp_path / "nope.pth")


def test_inception_weights_not_cached_and_downloads_disabled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(M.MissingWeightsError, match="--inception-weights") as err:
        M.load_inception(None, allow_download=False)
    assert str(tmp_path) in str(err.value) and M.INCEPTION_URL in str(err.value)


def test_inception_download_failure_is_one_clear_error(tmp_path, monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    with pytest.raises(M.MissingWeightsError, match="download failed: network is unreachable"):
        M.load_inception(None)


def test_lpips_backbone_from_a_local_torchvision_file(tmp_path) -> None:
    import torchvision

    alex = torchvision.models.alexnet(weights=None)
    path = tmp_path / M.LPIPS_BACKBONE_FILES["alex"]
    torch.save(alex.state_dict(), path)
    net = M.load_lpips("alex", path)
    assert torch.equal(getattr(net.net.slice1, "0").weight, alex.features[0].weight)
    assert torch.equal(getattr(net.net.slice5, "10").weight, alex.features[10].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max().item() < 1e-6
    assert (net(x, -x) > 0).all()


def test_lpips_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="not supported"):
        M.load_lpips("squeeze")
    with pytest.raises(M.MissingWeightsError, match="no such file"):
        M.load_lpips("alex", tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(M.MissingWeightsError, match="not torchvision's alex"):
        M.load_lpips("alex", wrong)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.MissingWeightsError, match="--lpips-backbone"):
        M.load_lpips("vgg", None, allow_download=False)
