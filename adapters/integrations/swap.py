"""``swap_quantizers``: the rotation trick in a VQ model one already has, by replacing its quantizers in place.

Supported (matched by exact class, so a subclass with its own code is never taken for its base), and what replaces it:

* taming's ``taming.modules.vqvae.quantize.VectorQuantizer2`` -> ``RotationVectorQuantizer``. This is also
  latent-diffusion's: its ``VQModel`` imports taming's class (the tree has no copy of its own);
* taming's first ``taming.modules.vqvae.quantize.VectorQuantizer`` -> ``TamingV1RotationQuantizer`` (its return: the
  perplexity, the one-hot encodings and (N, 1) indices);
* enhancing-transformers' ``enhancing.modules.stage1.quantizers.VectorQuantizer`` -> ``NormRotationQuantizer``
  (``use_norm`` kept); with ``use_residual=True`` -> ``ResidualNormRotationQuantizer`` (``num_quantizers`` stages
  on the shared codebook; option ``rotation_scope``: ``total`` or ``stage``, ``adapters/quantizer/residual.py``);
* diffusers' ``diffusers.models.autoencoders.vae.VectorQuantizer`` (``VQModel.quantize``) ->
  ``DiffusersRotationQuantizer`` (diffusers' argument and attribute names: ``vq_embed_dim``).

What is kept: hyperparameters (codes, dim, beta, legacy, remap with its ``used`` buffer, sane_index_shape, use_norm),
the codebook itself (the same ``nn.Embedding`` and ``Parameter`` objects, so an optimizer built before the swap still
updates it), device, dtype, train/eval mode, forward hooks, and so every state-dict key. Upstream classes are matched by
``(module, qualified name)`` strings, so neither enhancing-transformers nor diffusers is imported here.

Refused, because the project's quantizer would compute something else (one error naming them all, nothing changed;
``strict=False`` leaves them as they are with one warning and swaps the rest):

* Gumbel-softmax quantizers (no straight-through copy to replace), EMA codebooks (updated outside the gradient);
* enhancing's ``VectorQuantizer`` with ``straight_through=False`` (its output carries no encoder gradient);
* residual and product quantizers other than enhancing's: ``vector_quantize_pytorch`` (``ResidualVQ`` and the
  others), any class whose name says residual/product/grouped;
* subclasses of the supported classes, modules whose ``forward`` was replaced on the instance (accelerate's
  device-map hooks: swap before dispatching), and any other class whose name contains ``quantiz`` (torch's and
  weight-quantization libraries' modules excepted: they quantize weights, not latents).

A second swap is refused (``AlreadySwappedError``, whatever ``strict``): a model holding the project's quantizers
(``RotationVectorQuantizer`` and subclasses, swapped before or built by the project) cannot be re-swapped to another
gradient or options. ``codebook_init="kmeans"`` over a codebook that came with weights is refused
(``TrainedCodebookError``) unless ``force_kmeans=True``; an argument that is not a module is ``NotAModuleError``.
"""
from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from adapters.runtime.errors import UserError
from adapters.quantizer import (NormRotationQuantizer, ResidualNormRotationQuantizer, RotationVectorQuantizer,
                                check_gradient, check_rotation_scope)

_TAMING = "taming.modules.vqvae.quantize"
_ENHANCING = "enhancing.modules.stage1.quantizers"
_DIFFUSERS = "diffusers.models.autoencoders.vae"  # since diffusers 0.25 (0.42 tested); VQModel.quantize
SUPPORTED: dict[tuple[str, str], str] = {
    (_TAMING, "VectorQuantizer2"): "taming",
    (_TAMING, "VectorQuantizer"): "taming_v1",
    (_ENHANCING, "VectorQuantizer"): "enhancing",
    (_DIFFUSERS, "VectorQuantizer"): "diffusers",
}
# Hyperparameters every swap copies from the module it replaces: ``options`` may not override them.
KEPT = ("n_e", "e_dim", "beta", "remap", "unknown_index", "sane_index_shape", "legacy", "use_norm", "gradient")
# Modules of these packages quantize weights or activations (int8, fp8, QAT), not latents to a codebook. (Not all of
# transformers: its EnCodec, Chameleon, ... hold real vector quantizers, which must be refused, not passed over.)
_WEIGHT_QUANTIZATION = ("torch.", "bitsandbytes", "optimum.quanto", "quanto", "torchao", "hqq", "auto_gptq", "awq",
                        "transformers.integrations", "diffusers.quantizers")
# residual/product VQ class names that do not say "quantiz" (ResidualVQ, GroupedResidualVQ, ProductVQ, RVQ)
_RESIDUAL_VQ = r"(residual|product|grouped).*vq|^rvq"
# nn.Module attributes holding hooks: carried over so the new module is observed as the old one was
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")

GUMBEL = ("a Gumbel-softmax quantizer: its gradient comes from a relaxed softmax, there is no straight-through copy "
          "for the rotation trick to replace")
EMA = ("an EMA codebook: its codes move by moving averages outside the gradient, which the project's quantizer "
       "does not reproduce")
RESIDUAL = ("a residual/product quantizer: the project's quantizer does one codebook lookup, not one per stage, so "
            "a swap would change what the model computes")
VQ_PYTORCH = ("vector-quantize-pytorch's {name}: its codebook updates (EMA by default) and options are not the "
              "project's quantizer's; it has the rotation trick itself (VectorQuantize(rotation_trick=True), the "
              "default when dim > 1)")
RESIDUAL_VQ_PYTORCH = ("vector-quantize-pytorch's {name}, a residual quantizer: the project's quantizer does one "
                       "codebook lookup, not one per stage, nor its EMA codebook updates; {name} already rotates "
                       "every stage itself (its VectorQuantize layers take rotation_trick=True, the default when "
                       "dim > 1)")
NO_STRAIGHT_THROUGH = ("enhancing's straight_through=False: its output carries no gradient to the encoder (only "
                       "the commitment loss reaches it); every estimator of the project's quantizer adds one, so a "
                       "swap would change the encoder's gradient")
SUBCLASS = ("a subclass of {base} with its own code: the project cannot check that it behaves as its base")
WRAPPED = ("its forward was replaced on the instance (e.g. accelerate's device-map or offload hooks): swap the "
           "quantizers before dispatching the model")
UNKNOWN = ("an unknown quantizer class: the project cannot check that its quantizer behaves the same; supported: "
           "taming VectorQuantizer2/VectorQuantizer, enhancing-transformers VectorQuantizer, diffusers VectorQuantizer")


class UnsupportedQuantizerError(UserError, TypeError):
    """``swap_quantizers(strict=True)`` found quantizers it cannot replace faithfully; the message names each one,
    says why, and that ``strict=False`` skips them with a warning. Nothing was changed."""


class AlreadySwappedError(UserError, ValueError):
    """``swap_quantizers`` met the project's own quantizers: a second swap could not change their gradient or
    options, so it is refused (nothing changed); the message names them."""


class TrainedCodebookError(UserError, ValueError):
    """``codebook_init="kmeans"`` would overwrite a codebook that came with weights; ``force_kmeans=True`` opts in."""


class NotAModuleError(UserError, TypeError):
    """``swap_quantizers`` was given something other than a ``torch.nn.Module`` (a path, a state dict, ...)."""


class TamingV1RotationQuantizer(RotationVectorQuantizer):
    """The project's quantizer behind taming's first ``VectorQuantizer(n_e, e_dim, beta)`` interface.

    That class is ``VectorQuantizer2`` with ``legacy=True`` except for its return: it also gives the perplexity and
    the one-hot encodings, and indices shaped (N, 1). ``forward(z)``: z (B, C, H, W) -> (z_q (B, C, H, W), loss,
    (perplexity 0-d, min_encodings (N, n_e), indices (N, 1))), N = B*H*W.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, **kwargs: Any) -> None:
        super().__init__(n_e, e_dim, beta, legacy=True, **kwargs)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:  # type: ignore[override]
        z_q, loss, (_, _, idx) = super().forward(z)
        idx = idx.reshape(-1, 1)
        # the same expressions as upstream, so the extra outputs are bit for bit upstream's
        min_encodings = torch.zeros(idx.shape[0], self.n_e).to(z)
        min_encodings.scatter_(1, idx, 1)
        e_mean = torch.mean(min_encodings, dim=0)
        perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
        return z_q, loss, (perplexity, min_encodings, idx)


class DiffusersRotationQuantizer(RotationVectorQuantizer):
    """The project's quantizer behind diffusers' ``VectorQuantizer(n_e, vq_embed_dim, beta, ...)`` interface.

    Same attribute names (``vq_embed_dim`` beside ``e_dim``), ``forward(z)`` (no Gumbel-interface arguments) and
    return ``(z_q (B, C, H, W), loss, (None, None, indices))``; ``get_codebook_entry`` as diffusers'. Needs no
    diffusers import: a ``save_pretrained`` folder of a swapped ``VQModel`` loads with plain diffusers.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float, remap: Optional[str] = None,
                 unknown_index: Any = "random", sane_index_shape: bool = False, legacy: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(n_e, vq_embed_dim, beta, remap=remap, unknown_index=unknown_index,
                         sane_index_shape=sane_index_shape, legacy=legacy, **kwargs)
        self.vq_embed_dim = vq_embed_dim

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:  # type: ignore[override]
        """z: (B, vq_embed_dim, H, W) -> (z_q (B, vq_embed_dim, H, W), loss (0-d), (None, None, indices))."""
        return super().forward(z)


def swap_options() -> tuple[str, ...]:
    """The options ``swap_quantizers`` passes to the new quantizers (the project quantizer's own, minus ``KEPT``,
    plus ``rotation_scope`` for residual ones)."""
    params = inspect.signature(RotationVectorQuantizer.__init__).parameters
    return tuple(p for p in params if p not in ("self", *KEPT)
                 and params[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)) \
        + ("rotation_scope",)


def _key(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _dotted(module: nn.Module) -> str:
    return ".".join(_key(type(module)))


def refusal(module: nn.Module) -> Optional[str]:
    """Why ``module`` must not be swapped (a reason in words), or None: supported, the project's own, or not a
    quantizer."""
    if isinstance(module, RotationVectorQuantizer):
        return None
    cls = type(module)
    mod, name = _key(cls)
    low = name.lower()
    kind = SUPPORTED.get((mod, name))
    if kind is not None:
        if "forward" in vars(module):
            return WRAPPED
        if kind == "enhancing" and not getattr(module, "straight_through", True):
            return NO_STRAIGHT_THROUGH
        return None
    if mod.startswith("vector_quantize_pytorch"):
        return (RESIDUAL_VQ_PYTORCH if re.search(r"residual|grouped", low) else VQ_PYTORCH).format(name=name)
    base = next((b for b in cls.__mro__[1:] if _key(b) in SUPPORTED), None)
    if base is not None:
        return SUBCLASS.format(base=".".join(_key(base)))
    # Only names that say quantizer are judged: a "VQModel", "ViTVQ" or "LitEma" is a container, descended into.
    if mod.startswith(_WEIGHT_QUANTIZATION) or not ("quantiz" in low or re.search(_RESIDUAL_VQ, low)):
        return None
    if "gumbel" in low:
        return GUMBEL
    if "EMA" in name or low.startswith("ema"):
        return EMA
    if re.search(r"residual|product|grouped", low):
        return RESIDUAL
    return UNKNOWN


def _uses_norm(module: nn.Module) -> bool:
    """Whether enhancing's quantizer l2-normalises (upstream keeps ``use_norm`` only inside its ``norm`` lambda)."""
    probe = torch.tensor([[3.0, 4.0]])
    return not torch.equal(module.norm(probe), probe)


def _from_pretrained(module: nn.Module) -> bool:
    """Whether diffusers' ``from_pretrained`` made ``module`` (it records the source in ``config._name_or_path``)."""
    config = getattr(module, "config", None)
    return isinstance(config, Mapping) and bool(config.get("_name_or_path"))


def _may_be_trained(kind: str, old: nn.Module, loaded: bool) -> Optional[str]:
    """Why ``old``'s codebook may have come with weights, or None where it can only be its constructor's draw:
    taming's and diffusers' uniform(-1/n_e, 1/n_e) is bounded (a trained codebook leaves the bound); enhancing's
    N(0, 1) is not. ``loaded``: it sits in a model diffusers' ``from_pretrained`` made."""
    weight = old.embedding.weight
    if loaded:
        return "its model was loaded by from_pretrained"
    if kind == "enhancing":
        return "enhancing-transformers' N(0, 1) draw cannot be told from a trained codebook"
    if weight.is_meta:
        return "its weights are on the meta device, to be loaded later"
    bound = (1.0 / old.n_e) * (1 + 4 * torch.finfo(weight.dtype).eps)  # the draw's bound, rounded to the dtype
    if float(weight.detach().abs().max()) > bound:
        return f"its values lie outside a fresh draw's +-1/n_e = {1.0 / old.n_e:.3g}"
    return None


def _build(kind: str, old: nn.Module, gradient: str, options: dict[str, Any],
           rotation_scope: Optional[str] = None) -> RotationVectorQuantizer:
    """The replacement for ``old``, sharing its codebook module, buffers, mode and hooks."""
    # The new module draws its own codebook before it takes old's: fork the RNG so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        if kind == "taming":
            new: RotationVectorQuantizer = RotationVectorQuantizer(
                old.n_e, old.e_dim, old.beta, sane_index_shape=old.sane_index_shape, legacy=old.legacy,
                gradient=gradient, **options)
        elif kind == "taming_v1":
            new = TamingV1RotationQuantizer(old.n_e, old.e_dim, old.beta, gradient=gradient, **options)
        elif kind == "diffusers":
            new = DiffusersRotationQuantizer(old.n_e, old.vq_embed_dim, old.beta, sane_index_shape=old.sane_index_shape,
                                             legacy=old.legacy, gradient=gradient, **options)
        elif getattr(old, "use_residual", False):
            scope = {} if rotation_scope is None else {"rotation_scope": rotation_scope}
            new = ResidualNormRotationQuantizer(old.embed_dim, old.n_embed, old.beta, use_norm=_uses_norm(old),
                                                num_quantizers=old.num_quantizers, gradient=gradient, **scope,
                                                **options)
        else:
            new = NormRotationQuantizer(old.embed_dim, old.n_embed, old.beta, use_norm=_uses_norm(old),
                                        num_quantizers=old.num_quantizers, gradient=gradient, **options)
    new.embedding = old.embedding  # the same Parameter: same values, name, device, dtype, optimizer state
    if getattr(old, "remap", None) is not None:
        # taken from the module, not re-read from the .npy path (which need not exist where the model was loaded)
        new.remap, new.re_embed, new.unknown_index = old.remap, old.re_embed, old.unknown_index
        new.register_buffer("used", old.used)
    for name in _HOOK_DICTS:
        if getattr(old, name, None):
            new.__dict__[name] = old.__dict__[name]
    if getattr(old, "_backward_hooks", None):  # whether they are full or legacy module backward hooks
        new.__dict__["_is_full_backward_hook"] = old.__dict__.get("_is_full_backward_hook")
    new.train(old.training)
    return new


def _walk(root: nn.Module, visit: Callable[[str, nn.Module], bool],
          ) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """Every (qualified name, parent, attribute, child) below ``root``, preorder; a child seen before, or for which
    ``visit(name, child)`` returns False, is not descended into."""
    found: list[tuple[str, nn.Module, str, nn.Module]] = []
    seen: set[int] = set()

    def rec(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}{attr}"
            found.append((name, parent, attr, child))
            if id(child) not in seen:
                seen.add(id(child))
                if visit(name, child):
                    rec(child, name + ".")

    rec(root, "")
    return found


def swap_quantizers(model: nn.Module, gradient: str = "rotation_released", strict: bool = True,
                    force_kmeans: bool = False, **options: Any) -> list[str]:
    """Replace, in place, every supported vector quantizer in ``model`` by the project's (see the module docstring).

    Args:
      model: any ``nn.Module`` holding quantizers (a diffusers/taming/latent-diffusion ``VQModel``, a ``ViTVQ``, ...),
        swapped once: one holding the project's quantizers already is refused (``AlreadySwappedError``).
      gradient: the estimator (``adapters.quantizer.GRADIENTS``); ``ste`` reproduces upstream (forward bit for bit
        up to near-tie code choices, encoder gradients up to rounding); ``rotation_released`` is the authors' code.
      strict: True raises ``UnsupportedQuantizerError`` naming every quantizer that cannot be swapped faithfully,
        before anything changes; False leaves those as they are, with one warning, and swaps the rest.
      force_kmeans: with ``codebook_init="kmeans"``, re-initialise even a codebook that may have come with weights
        (refused otherwise: ``TrainedCodebookError``).
      options: passed to each new quantizer: ``search``, ``search_chunk_size``, ``search_max_bytes``,
        ``track_stats``, ``codebook_init`` (``kmeans`` re-initialises the codebook on the first training batch: for
        training from scratch, not fine-tuning), ``kmeans_iters``, the remedies (:func:`swap_options`), and
        ``rotation_scope`` (``total`` | ``stage``) for residual quantizers.

    Returns:
      the qualified names of the modules replaced (a module held under several names is listed once).
    """
    if not isinstance(model, nn.Module):
        shown = repr(model) if len(repr(model)) <= 60 else repr(model)[:57] + "..."
        raise NotAModuleError(f"swap_quantizers takes the model, a torch.nn.Module holding its quantizers; got "
                              f"{type(model).__name__} {shown}: build or load the model first (e.g. "
                              f"diffusers.VQModel.from_pretrained(path)) and pass it")
    check_gradient(gradient)
    allowed = swap_options()
    bad = sorted(set(options) - set(allowed))
    if bad:
        kept = sorted(set(options) & set(KEPT))
        why = f" ({', '.join(kept)} {'is' if len(kept) == 1 else 'are'} kept from each quantizer)" if kept else ""
        raise ValueError(f"swap_quantizers: unknown option(s) {bad}{why}; valid: {', '.join(allowed)}")
    rotation_scope = options.pop("rotation_scope", None)
    if rotation_scope is not None:
        check_rotation_scope(rotation_scope)
    kmeans = options.get("codebook_init") == "kmeans"
    if force_kmeans and not kmeans:
        raise ValueError("swap_quantizers: force_kmeans=True applies only with codebook_init='kmeans'")
    if SUPPORTED.get(_key(type(model))) is not None:
        raise ValueError("swap_quantizers replaces quantizers inside a model; pass the module that holds "
                         f"this {type(model).__name__}")

    plan: dict[int, str] = {}  # id(old) -> kind, for the modules to replace
    refused: list[tuple[str, nn.Module, str]] = []  # (name, module, why)
    already: list[tuple[str, nn.Module]] = []  # the project's own quantizers
    loaded = [""] if _from_pretrained(model) else []  # prefixes of modules that came with weights

    def visit(name: str, module: nn.Module) -> bool:
        if isinstance(module, RotationVectorQuantizer):
            already.append((name, module))
            return False
        why = refusal(module)
        if why is not None:
            refused.append((name, module, why))
            return False
        kind = SUPPORTED.get(_key(type(module)))
        if kind is not None:
            plan[id(module)] = kind
            return False
        if _from_pretrained(module):
            loaded.append(name + ".")
        return True

    occurrences = _walk(model, visit)
    if already:
        # Passing them over would keep their first gradient and options without a word (a sweep re-swapping
        # one model object); rebuilding them in place could not carry every option's state: refused.
        held = ", ".join(f"{name} ({type(m).__name__}, gradient {m.gradient!r})" for name, m in already)
        one = len(already) == 1
        raise AlreadySwappedError(
            f"swap_quantizers: {held} {'is' if one else 'are'} already the project's quantizer{'' if one else 's'}; "
            f"a second swap is refused, as it could not change {'its' if one else 'their'} gradient or options: "
            f"swap a freshly built or loaded model once, with the settings wanted (a project model takes them "
            f"from its config)")
    if refused:
        lines = "\n".join(f"  {name} ({_dotted(m)}): {why}" for name, m, why in refused)
        if strict:
            raise UnsupportedQuantizerError(
                f"swap_quantizers: {len(refused)} quantizer(s) cannot be swapped faithfully, nothing was changed:\n"
                f"{lines}\npass strict=False to leave them as they are (with a warning) and swap the rest")
        warnings.warn(f"swap_quantizers: left as they are (not swapped):\n{lines}", UserWarning, stacklevel=2)

    targets: dict[int, tuple[str, nn.Module]] = {}  # id -> (first name, module) of each module to replace
    for name, _, _, child in occurrences:
        if id(child) in plan and id(child) not in targets:
            targets[id(child)] = (name, child)
    if rotation_scope is not None and not any(getattr(m, "use_residual", False) for _, m in targets.values()):
        raise ValueError("swap_quantizers: rotation_scope applies to residual quantizers (enhancing's "
                         "use_residual=True), and this model has none to swap")
    if kmeans and not force_kmeans:
        trained = [(name, why) for name, m in targets.values()
                   if (why := _may_be_trained(plan[id(m)], m, any(name.startswith(p) for p in loaded)))]
        if trained:
            held = "; ".join(f"{name}: {why}" for name, why in trained)
            raise TrainedCodebookError(
                f"swap_quantizers: codebook_init='kmeans' would overwrite a codebook that may have come with "
                f"weights ({held}); a trained codebook is never re-initialised: leave codebook_init out to "
                f"fine-tune it, or pass force_kmeans=True if it is untrained")

    # Build every replacement before installing any: a bad option then changes nothing.
    new = {key: _build(plan[key], m, gradient, options, rotation_scope) for key, (_, m) in targets.items()}
    for _, parent, attr, child in occurrences:
        if id(child) in new:
            setattr(parent, attr, new[id(child)])
    if not (targets or refused):
        warnings.warn(f"swap_quantizers: no supported quantizer in {type(model).__name__}; nothing was replaced",
                      UserWarning, stacklevel=2)
    return [name for name, _ in targets.values()]


__all__ = ["AlreadySwappedError", "DiffusersRotationQuantizer", "NotAModuleError", "SUPPORTED",
           "TamingV1RotationQuantizer", "TrainedCodebookError", "UnsupportedQuantizerError", "refusal", "swap_options",
           "swap_quantizers"]
