"""adapters.swap_quantizers: every supported quantizer class is replaced faithfully; the rest are refused by name."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer, VectorQuantizer2
from torch import nn

from adapters import swap_quantizers
from adapters.quantizer import NormRotationQuantizer, RotationVectorQuantizer
from adapters.integrations.swap import (AlreadySwappedError, DiffusersRotationQuantizer, NotAModuleError,
                                        TamingV1RotationQuantizer, TrainedCodebookError, UnsupportedQuantizerError,
                                        swap_options)
from adapters.runtime.errors import UserError
from conftest import HAS_ENHANCING, HAS_LDM, ROOT

DOC = ROOT / "docs" / "swap.md"
N_E, E_DIM = 32, 4


class Tiny(nn.Module):
    """encoder conv -> quantizer -> decoder conv; ``tokens`` feeds (B, T, C) rows (enhancing's interface)."""

    def __init__(self, quantizer: nn.Module, tokens: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, E_DIM, 3, padding=1)
        self.quantize = quantizer
        self.decoder = nn.Conv2d(E_DIM, 3, 3, padding=1)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """x: (B, 3, H, W) -> (reconstruction (B, 3, H, W), the quantizer's whole return)."""
        h = self.encoder(x)
        if self.tokens:
            b, c, hh, ww = h.shape
            out = self.quantize(h.flatten(2).transpose(1, 2).contiguous())
            z_q = out[0].transpose(1, 2).reshape(b, c, hh, ww)
        else:
            out = self.quantize(h)
            z_q = out[0]
        return self.decoder(z_q), out


def _diffusers_vq() -> nn.Module:
    vae = pytest.importorskip("diffusers.models.autoencoders.vae",
                              reason="diffusers is not installed: pip install -e '.[diffusers]' to test its quantizer")
    return vae.VectorQuantizer(N_E, E_DIM, beta=0.25)


def _enhancing_vq(use_norm: bool = True) -> nn.Module:
    if not HAS_ENHANCING:
        pytest.skip("third_party/enhancing-transformers is absent (fresh clone): run scripts/setup_submodules.sh")
    from enhancing.modules.stage1.quantizers import VectorQuantizer as EnhancingVQ

    return EnhancingVQ(E_DIM, N_E, beta=0.25, use_norm=use_norm)


# (upstream class, replacement class, whether it takes (B, T, C) tokens)
CASES: dict[str, tuple[Callable[[], nn.Module], type, bool]] = {
    "taming_VectorQuantizer2": (lambda: VectorQuantizer2(N_E, E_DIM, beta=0.25), RotationVectorQuantizer, False),
    "taming_VectorQuantizer2_fixed": (lambda: VectorQuantizer2(N_E, E_DIM, beta=0.25, legacy=False,
                                                               sane_index_shape=True), RotationVectorQuantizer, False),
    "taming_VectorQuantizer": (lambda: VectorQuantizer(N_E, E_DIM, beta=0.25), TamingV1RotationQuantizer, False),
    "diffusers_VectorQuantizer": (_diffusers_vq, DiffusersRotationQuantizer, False),
    "enhancing_VectorQuantizer": (_enhancing_vq, NormRotationQuantizer, True),
    "enhancing_VectorQuantizer_no_norm": (lambda: _enhancing_vq(False), NormRotationQuantizer, True),
}


def _model(case: str) -> tuple[Tiny, type]:
    build, replacement, tokens = CASES[case]
    torch.manual_seed(0)
    model = Tiny(build(), tokens)
    with torch.no_grad():  # a spread-out codebook: many codes used, no near-ties
        model.quantize.embedding.weight.copy_(torch.randn(N_E, E_DIM))
    return model, replacement


def _step(model: Tiny, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward outputs (reconstruction, then every tensor the quantizer returned) and the encoder's weight gradient."""
    model.zero_grad()
    rec, out = model(x)
    (rec.square().mean() + out[1]).backward()
    flat = [rec, out[0], out[1]] + [t for t in (out[2] if isinstance(out[2], tuple) else (out[2],)) if t is not None]
    return [t.detach() for t in flat], model.encoder.weight.grad.clone()


@pytest.mark.parametrize("case", list(CASES))
def test_ste_is_upstream_and_rotation_changes_only_the_encoder_gradient(case: str) -> None:
    original, replacement = _model(case)
    swapped, rotated = copy.deepcopy(original), copy.deepcopy(original)
    keys = list(original.state_dict())
    assert swap_quantizers(swapped, gradient="ste", search="blocked") == ["quantize"]
    assert swap_quantizers(rotated, gradient="rotation_released", search="blocked") == ["quantize"]
    assert type(swapped.quantize) is replacement and type(rotated.quantize) is replacement
    assert list(swapped.state_dict()) == keys and list(rotated.state_dict()) == keys
    x = torch.randn(2, 3, 6, 6)
    ref_out, ref_grad = _step(original, x)
    ste_out, ste_grad = _step(swapped, x)
    assert len(ste_out) == len(ref_out)
    for i, (a, b) in enumerate(zip(ref_out, ste_out)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs"
    torch.testing.assert_close(ste_grad, ref_grad, rtol=1e-5, atol=1e-7)
    rot_out, rot_grad = _step(rotated, x)
    for a, b in zip(ref_out, rot_out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rot_grad, ref_grad, rtol=1e-3, atol=1e-6)


def test_hyperparameters_weights_mode_dtype_and_remap_are_kept(tmp_path: Path) -> None:
    used = tmp_path / "used.npy"
    np.save(used, np.arange(0, N_E, 2))
    torch.manual_seed(0)
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.5, remap=str(used), unknown_index="extra",
                                  sane_index_shape=True, legacy=False)).double().eval()
    used.unlink()  # a model loaded elsewhere: the swap takes the buffer, never re-reads the file
    weight, buffer = model.quantize.embedding.weight, model.quantize.used
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # built before the swap: must still update the codebook
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    swap_quantizers(model, search="blocked", track_stats=False)
    q = model.quantize
    assert (q.n_e, q.e_dim, q.beta, q.legacy, q.sane_index_shape, q.unknown_index, q.re_embed, q.remap) == \
        (N_E, E_DIM, 0.5, False, True, N_E // 2, N_E // 2 + 1, str(used))
    assert q.embedding.weight is weight and q.used is buffer and q.gradient == "rotation_released"
    assert not q.training and q.embedding.weight.dtype == torch.float64
    assert q.search == "blocked" and not q.track_stats
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    model.train()
    rec, (z_q, loss, (_, _, idx)) = model(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert idx.shape == (2, 4, 4) and int(idx.max()) <= N_E // 2 and rec.dtype == torch.float64
    (rec.square().mean() + loss).backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight.detach(), before)


def test_options_pass_through_and_unknown_or_kept_ones_are_refused() -> None:
    assert {"search", "track_stats", "codebook_init", "search_chunk_size"} <= set(swap_options())
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    swap_quantizers(model, gradient="rotation", search="blocked", codebook_init="kmeans", search_chunk_size=7)
    q = model.quantize
    assert (q.gradient, q.search, q.codebook_init, q.search_chunk_size) == ("rotation", "blocked", "kmeans", 7)
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta', 'serch'\] \(beta is kept from each "
                                         r"quantizer\); valid: .*search"):
        swap_quantizers(model, serch="blocked", beta=0.1)
    with pytest.raises(ValueError, match="unknown gradient estimator 'rotaton'"):
        swap_quantizers(model, gradient="rotaton")
    with pytest.raises(ValueError, match="unknown nearest-code search .fast."):
        swap_quantizers(model, search="fast")  # checked by the new module, before anything is installed
    assert type(model.quantize) is VectorQuantizer2


def test_the_callers_random_stream_is_untouched() -> None:
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    state = torch.get_rng_state()
    swap_quantizers(model, search="blocked")
    assert torch.equal(torch.get_rng_state(), state)


def test_shared_modules_hooks_and_nothing_to_swap() -> None:
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    model.alias = model.quantize  # one module under two names
    calls: list[str] = []
    model.quantize.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    assert swap_quantizers(model, search="blocked") == ["quantize"]
    assert model.alias is model.quantize and isinstance(model.quantize, RotationVectorQuantizer)
    model(torch.randn(1, 3, 4, 4))
    assert calls == ["RotationVectorQuantizer"]
    with pytest.warns(UserWarning, match="no supported quantizer in Sequential"):
        assert swap_quantizers(nn.Sequential(nn.Linear(2, 2))) == []
    with pytest.raises(ValueError, match="pass the module that holds"):
        swap_quantizers(VectorQuantizer2(N_E, E_DIM, beta=0.25))


def _documented_error(heading: str) -> str:
    """The error text in docs/swap.md's code block under ``heading``."""
    text = DOC.read_text()
    block = text.split(heading, 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    return block.rstrip("\n")


def test_a_second_swap_is_refused_with_the_documented_error_and_changes_nothing() -> None:
    """issue 23 item 1: a re-swap (a sweep, a notebook) used to pass the swapped quantizer over silently, keeping
    its first gradient and dropping codebook_init/search."""
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    assert swap_quantizers(model, gradient="ste", search="blocked") == ["quantize"]
    first = model.quantize
    for strict in (True, False):
        with pytest.raises(AlreadySwappedError) as err:
            swap_quantizers(model, gradient="rotation", search="fused", strict=strict)
        assert str(err.value) == _documented_error("## A second swap")
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert model.quantize is first and (first.gradient, first.search) == ("ste", "blocked")
    # a quantizer the project built (not swapped) is refused the same way, with its name
    held = nn.Module()
    held.a, held.b = RotationVectorQuantizer(N_E, E_DIM, gradient="rotation"), NormRotationQuantizer(E_DIM, N_E)
    with pytest.raises(AlreadySwappedError, match=r"^swap_quantizers: a \(RotationVectorQuantizer, gradient "
                                                  r"'rotation'\), b \(NormRotationQuantizer, gradient 'rotation'\) "
                                                  r"are already the project's quantizers; a second swap is refused"):
        swap_quantizers(held)


def test_kmeans_over_a_codebook_that_came_with_weights_is_refused_unless_forced() -> None:
    """issue 23 item 2: the swap installed a trained codebook into a module whose k-means init was pending, so the
    first training batch replaced it."""
    model = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25))
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # what a checkpoint brings: far outside the +-1/n_e draw
    trained = model.quantize.embedding.weight.detach().clone()
    with pytest.raises(TrainedCodebookError) as err:
        swap_quantizers(model, codebook_init="kmeans", search="blocked")
    assert str(err.value) == _documented_error("## k-means over a trained codebook")
    assert type(model.quantize) is VectorQuantizer2  # nothing changed
    with pytest.raises(ValueError, match="force_kmeans=True applies only with codebook_init='kmeans'"):
        swap_quantizers(model, force_kmeans=True)
    assert swap_quantizers(model, codebook_init="kmeans", force_kmeans=True, search="blocked") == ["quantize"]
    assert model.quantize.codebook_init_pending and torch.equal(model.quantize.embedding.weight, trained)
    # taming's own draw, uniform(-1/n_e, 1/n_e), in float32 and float64: training from scratch is not refused
    for dtype in (torch.float32, torch.float64):
        fresh = Tiny(VectorQuantizer2(N_E, E_DIM, beta=0.25)).to(dtype)
        assert swap_quantizers(fresh, codebook_init="kmeans", search="blocked") == ["quantize"]
        assert fresh.quantize.codebook_init_pending
    if HAS_ENHANCING:  # enhancing's N(0, 1) draw cannot be told from a trained codebook: always asks for force
        with pytest.raises(TrainedCodebookError, match="enhancing-transformers' N.0, 1. draw cannot be told"):
            swap_quantizers(Tiny(_enhancing_vq(), tokens=True), codebook_init="kmeans")


def test_kmeans_after_diffusers_from_pretrained_is_refused(tmp_path: Path) -> None:
    """A diffusers model loaded by from_pretrained brought its codebook, even one inside the +-1/n_e bound."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
    config = dict(block_out_channels=(8,), norm_num_groups=4, num_vq_embeddings=N_E, vq_embed_dim=E_DIM,
                  latent_channels=E_DIM)
    torch.manual_seed(0)
    diffusers.VQModel(**config).save_pretrained(tmp_path)  # an untouched draw: only from_pretrained tells
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' note that accelerate is not installed
        loaded = diffusers.VQModel.from_pretrained(tmp_path)
    holder = nn.Module()
    holder.vae = loaded  # nested: the loaded model's prefix is what counts
    with pytest.raises(TrainedCodebookError, match=r"vae\.quantize: its model was loaded by from_pretrained"):
        swap_quantizers(holder, codebook_init="kmeans")
    assert swap_quantizers(diffusers.VQModel(**config), codebook_init="kmeans", search="blocked") == ["quantize"]


def test_a_non_module_argument_is_one_clear_error() -> None:
    """issue 23 item 12: swap_quantizers("path") was an AttributeError from deep inside the walk."""
    with pytest.raises(NotAModuleError) as err:
        swap_quantizers("runs/dvq/model")
    assert str(err.value) == _documented_error("## Not a model")
    assert isinstance(err.value, UserError) and isinstance(err.value, TypeError)
    with pytest.raises(NotAModuleError, match="got dict"):
        swap_quantizers({"quantize.embedding.weight": torch.zeros(2, 2)})


class EMAVectorQuantizer(nn.Module):
    """A user's EMA codebook quantizer (refused by its name)."""


class MyQuantizer(nn.Module):
    """An unknown quantizer (refused by its name)."""


class TweakedVQ(VectorQuantizer2):
    """A subclass with its own code (refused: the project cannot know what it changed)."""


def test_what_cannot_be_swapped_is_named_in_one_error_and_nothing_changes() -> None:
    model = nn.Module()
    model.good = VectorQuantizer2(N_E, E_DIM, beta=0.25)
    model.gumbel = GumbelQuantize(E_DIM, E_DIM, N_E)
    model.ema = EMAVectorQuantizer()
    model.mine = MyQuantizer()
    model.tweaked = TweakedVQ(N_E, E_DIM, beta=0.25)
    model.wrapped = VectorQuantizer2(N_E, E_DIM, beta=0.25)
    model.wrapped.forward = model.wrapped.forward  # what accelerate's hooks do
    model.linear = nn.Linear(2, 2)
    model.qat = torch.ao.quantization.FakeQuantize()  # weight quantization: not a codebook, not refused
    with pytest.raises(UnsupportedQuantizerError) as err:
        swap_quantizers(model)
    message = str(err.value)
    assert message.startswith("swap_quantizers: 5 quantizer(s) cannot be swapped faithfully, nothing was changed:")
    for line in ("  gumbel (taming.modules.vqvae.quantize.GumbelQuantize): a Gumbel-softmax quantizer",
                 "  ema (test_swap.EMAVectorQuantizer): an EMA codebook",
                 "  mine (test_swap.MyQuantizer): an unknown quantizer class",
                 "  tweaked (test_swap.TweakedVQ): a subclass of taming.modules.vqvae.quantize.VectorQuantizer2",
                 "  wrapped (taming.modules.vqvae.quantize.VectorQuantizer2): its forward was replaced"):
        assert line in message, line
    assert "good" not in message and "qat" not in message
    assert message.endswith("pass strict=False to leave them as they are (with a warning) and swap the rest")
    assert type(model.good) is VectorQuantizer2
    with pytest.warns(UserWarning, match=r"left as they are \(not swapped\):\n  gumbel "):
        assert swap_quantizers(model, strict=False, search="blocked") == ["good"]
    assert isinstance(model.good, RotationVectorQuantizer) and type(model.gumbel) is GumbelQuantize




def test_residual_vq_is_refused_with_the_documented_error() -> None:
    from vector_quantize_pytorch import ResidualVQ

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(8, 8)
            self.rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16)

    with pytest.raises(UnsupportedQuantizerError) as err:
        swap_quantizers(Model())
    assert str(err.value) == _documented_error("## Residual quantizers")


@pytest.mark.skipif(not HAS_ENHANCING, reason="third_party/enhancing-transformers is absent (fresh clone)")
@pytest.mark.enhancing
def test_enhancing_gumbel_and_no_straight_through_are_refused_and_residual_is_swapped() -> None:
    """issue 23 item 11: with straight_through=False enhancing's output carries no encoder gradient; the swap used
    to replace it by a straight-through quantizer, silently changing the encoder's gradient. (Residual stages are
    tests/test_residual.py's.)"""
    from enhancing.modules.stage1.quantizers import GumbelQuantizer
    from enhancing.modules.stage1.quantizers import VectorQuantizer as EnhancingVQ

    from adapters.quantizer import ResidualNormRotationQuantizer

    model = nn.Module()
    model.residual = EnhancingVQ(E_DIM, N_E, use_residual=True, num_quantizers=2)
    model.gumbel = GumbelQuantizer(E_DIM, N_E)
    model.copyless = EnhancingVQ(E_DIM, N_E)
    model.copyless.straight_through = False
    with pytest.raises(UnsupportedQuantizerError) as err:
        swap_quantizers(model)
    message = str(err.value)
    assert message.startswith("swap_quantizers: 2 quantizer(s) cannot be swapped faithfully")
    assert "  gumbel (enhancing.modules.stage1.quantizers.GumbelQuantizer): a Gumbel-softmax quantizer" in message
    assert ("  copyless (enhancing.modules.stage1.quantizers.VectorQuantizer): "
            + _documented_error("## enhancing without straight-through")) in message
    assert "residual" not in message
    with pytest.warns(UserWarning, match="copyless"):
        assert swap_quantizers(model, strict=False, search="blocked") == ["residual"]
    assert type(model.residual) is ResidualNormRotationQuantizer and type(model.copyless) is EnhancingVQ


@pytest.mark.skipif(not HAS_LDM, reason="third_party/latent-diffusion is absent (fresh clone)")
@pytest.mark.ldm
def test_latent_diffusion_vqmodel_uses_tamings_class_and_swaps() -> None:
    from ldm.models.autoencoder import VQModel

    ddconfig = dict(double_z=False, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    model = VQModel(ddconfig, {"target": "torch.nn.Identity"}, n_embed=N_E, embed_dim=E_DIM).eval()
    swapped = copy.deepcopy(model)
    assert swap_quantizers(swapped, gradient="ste", search="blocked") == ["quantize"]
    assert list(swapped.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(swapped(x)[0], model(x)[0])
