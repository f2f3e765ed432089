"""Drop-in vector quantizers with a choice of gradient estimator (see ``functional`` for the math).

``RotationVectorQuantizer`` subclasses taming's ``VectorQuantizer2``: same constructor arguments, state-dict keys
(``embedding.weight``, plus ``used`` with ``remap``; a collapse remedy adds its own only when on), forward return and
``get_codebook_entry``; with ``gradient="ste"`` its forward pass is upstream's, bit for bit.
``NormRotationQuantizer`` is the same module behind enhancing-transformers' ``VectorQuantizer`` interface
(l2-normalised lookup, ``(B, T, C)`` input).
"""
from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import Tensor

from .ema import CodeEMA, check_codebook_update
from .functional import check_gradient, rotation_trick
from .kmeans import check_codebook_init, kmeans_codebook, kmeans_seed
from .restarts import check_restarts, dead_code_restarts, restart_seed
from .search import check_search, find_nearest, work_dtype
from .simvq import check_codebook_param, codebook_transform, reset_transform
from .stats import CodebookStats


def refuse_unknown_options(cls: type, kwargs: dict[str, Any]) -> None:
    """One ValueError naming unknown constructor options and the valid ones: a misspelt option must not be ignored."""
    if kwargs:
        valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        raise ValueError(f"unknown quantizer option(s) {sorted(kwargs)} for {cls.__name__}; valid: {', '.join(valid)}")


@contextmanager
def codebook_updates_paused(quantizer: torch.nn.Module) -> Iterator[None]:
    """Within the block a training forward does not update the codebook (EMA, dead-code restarts): for forwards that
    repeat a batch (the discriminator's pass). A quantizer without such updates (Gumbel) is left as it is."""
    was = getattr(quantizer, "codebook_updates", None)
    if was is not None:
        quantizer.codebook_updates = False
    try:
        yield
    finally:
        if was is not None:
            quantizer.codebook_updates = was


class RotationVectorQuantizer(VectorQuantizer2):
    """taming's ``VectorQuantizer2`` with the rotation trick (or another named estimator) in place of the copy.

    Extra arguments:
      gradient: one of ``functional.GRADIENTS``; default ``rotation`` (the paper's formula).
      use_norm: look codes up between l2-normalised vectors and output the normalised codeword (ViT-VQGAN).
      search: nearest-code search, ``auto`` (default: ``fused`` where torch.compile can build it, else ``blocked``),
        ``fused`` (one compiled kernel, no N x K matrix) or ``blocked`` (taming's expression by row blocks); see
        ``search.py`` for how their indices can differ (near-ties only).
      search_chunk_size: rows per block of the blocked search (default: blocks of at most ``search_max_bytes``),
        bounding its memory; indices equal the full distance matrix's.
      track_stats: keep codebook statistics (``last_stats``, ``epoch_stats()``); they never enter the state dict.
      codebook_init: ``upstream`` (default: the parent class's draw, untouched) or ``kmeans``: on the first training
        forward, before any optimizer step, the codebook is set by k-means on that batch's encoder outputs
        (``kmeans.py``; spherical in ``use_norm`` mode), computed on rank 0 and broadcast under torch.distributed.
        A codebook that arrives through ``load_state_dict`` (``ckpt_path:``, a resumed ``last.ckpt``, a released
        checkpoint) is never re-initialised. The pending flag is a plain attribute: no new state-dict key.
      kmeans_iters: Lloyd iterations after the k-means++ seeding (default 10).

    Collapse remedies (each off by default: no new state-dict key, upstream's forward; README's table):
      codebook_update: ``gradient`` (default: the codebook loss term trains it) or ``ema`` (``ema.py``: running means
        of the assigned encoder outputs, decay ``ema_decay`` (0.99), Laplace ``ema_eps`` (1e-5); the codebook gets no
        gradient and the loss keeps only the encoder's commitment term, with its weight: beta, or 1 under taming's
        ``legacy=True``; buffers ``code_ema.counts``, ``code_ema.sums``, ``code_ema.steps``).
      dead_code_threshold: restart codes whose running count is below it (``restarts.py``; 0 = off), checked every
        ``dead_code_every`` training forwards; ``last_stats["restarted_codes"]`` counts them.
      codebook_param: ``plain`` (default) or ``simvq`` (``simvq.py``: effective codebook C W, key
        ``codebook_transform.weight``; C frozen unless ``simvq_learn_codebook``).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: Optional[str] = None,
                 unknown_index: Any = "random", sane_index_shape: bool = False, legacy: bool = True,
                 gradient: str = "rotation", use_norm: bool = False, search_chunk_size: Optional[int] = None,
                 search_max_bytes: int = 64 * 2**20, track_stats: bool = True, search: str = "auto",
                 codebook_init: str = "upstream", kmeans_iters: int = 10, codebook_update: str = "gradient",
                 ema_decay: float = 0.99, ema_eps: float = 1e-5, dead_code_threshold: float = 0.0,
                 dead_code_every: int = 1, codebook_param: str = "plain", simvq_learn_codebook: bool = False,
                 **kwargs: Any) -> None:
        refuse_unknown_options(type(self), kwargs)
        super().__init__(n_e, e_dim, beta, remap=remap, unknown_index=unknown_index,
                         sane_index_shape=sane_index_shape, legacy=legacy)
        self.gradient = check_gradient(gradient)
        self.codebook_init = check_codebook_init(codebook_init)
        if int(kmeans_iters) < 0:
            raise ValueError(f"kmeans_iters must be a non-negative number of Lloyd iterations, got {kmeans_iters}")
        self.kmeans_iters = int(kmeans_iters)
        self.codebook_init_pending = self.codebook_init == "kmeans"
        self.search = check_search(search)
        self.use_norm = bool(use_norm)
        if search_chunk_size is not None and search_chunk_size <= 0:
            raise ValueError(f"search_chunk_size must be a positive number of rows or None, got {search_chunk_size}")
        self.search_chunk_size = search_chunk_size
        self.search_max_bytes = int(search_max_bytes)
        self.track_stats = bool(track_stats)
        self.stats = CodebookStats(n_e)
        self.setup_remedies(codebook_update, ema_decay, ema_eps, dead_code_threshold, dead_code_every, codebook_param,
                            simvq_learn_codebook)

    # --- statistics -----------------------------------------------------------------------------------------
    @property
    def last_stats(self) -> dict[str, Tensor]:
        """Statistics of the last forward: usage, used_codes, dead_codes, perplexity, quant_error (0-d tensors)."""
        return self.stats.last

    @property
    def code_counts(self) -> Tensor:
        """(n_e,) codes chosen since the last reset, this rank only."""
        return self.stats.code_counts

    def epoch_stats(self, reset: bool = True) -> dict[str, Tensor]:
        """Accumulated statistics since the last reset, summed over ranks (every rank must call it)."""
        return self.stats.compute(reset=reset)

    def reset_stats(self) -> None:
        self.stats.reset()

    # --- codebook initialisation --------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A codebook that comes from a state dict is trained (or chosen) already: never overwrite it by k-means.
        if prefix + "embedding.weight" in state_dict:
            self.codebook_init_pending = False
            if self.code_ema is not None and not any(k.startswith(prefix + "code_ema.") for k in state_dict):
                # A codebook without running counts (a plain run's or upstream's checkpoint): the state that goes
                # with it, as at construction (ema.py, "start"). The children load after this, from this dict.
                start = self.code_ema.start_state(self.norm(state_dict[prefix + "embedding.weight"]))
                state_dict.update({f"{prefix}code_ema.{k}": v for k, v in start.items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adopt_initial_codebook(self, source: torch.nn.Module) -> None:
        """Take a freshly built upstream quantizer's state (its initial draw) without cancelling a pending k-means
        init: the wrappers copy upstream's codebook so that a seed draws the same one, which is not a trained one."""
        pending = self.codebook_init_pending
        missing, unexpected = self.load_state_dict(source.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "codebook_transform.weight"]:  # SimVQ's W stays I: E = C
            raise RuntimeError(f"cannot adopt {type(source).__name__}'s codebook: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        self.codebook_init_pending = pending

    @torch.no_grad()
    def init_codebook_from(self, z: Tensor) -> None:
        """Set the codebook by k-means on encoder rows z (N, d): on rank 0, broadcast to every rank.

        The draws come from a generator of its own, seeded from the run's seed (``torch.initial_seed()``, which
        ``seed_everything`` sets), never from the global stream: after the init, crops, sampler seeds and dropout are
        those of the upstream-init run of the same seed, so init-vs-init pairs stay paired.
        """
        weight = self.embedding.weight
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        dtype = work_dtype(z, weight)
        codebook = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        failure: Optional[BaseException] = None
        if not distributed or torch.distributed.get_rank() == 0:
            start = time.perf_counter()
            generator = torch.Generator(device=z.device).manual_seed(kmeans_seed(torch.initial_seed()))
            try:
                codebook = kmeans_codebook(z.to(dtype), self.n_e, self.kmeans_iters, spherical=self.use_norm,
                                           generator=generator).to(weight.device)
            except Exception as exc:  # told to the other ranks below, then raised here
                failure = exc
            else:
                # One line in the run's log, so a reader can tell the init happened, on what, and what it cost.
                n = z.shape[0]
                how = (f"k-means++ and {self.kmeans_iters} Lloyd iterations" if n > self.n_e else
                       "one code per vector" + (f", {self.n_e - n} jittered copies" if n < self.n_e else ""))
                print(f"codebook_init kmeans: {self.n_e} codes from {n} encoder outputs of the first training "
                      f"batch ({how}{', spherical' if self.use_norm else ''}), {time.perf_counter() - start:.2f} s",
                      flush=True)
        if distributed:
            # Rank 0 says first whether it has a codebook: a failure there must stop every rank at once, not leave
            # the others waiting in the codebook's broadcast (with NCCL, until the collective timeout).
            ok = torch.tensor([0 if failure is not None else 1], dtype=torch.long, device=weight.device)
            torch.distributed.broadcast(ok, src=0)
            if int(ok.item()) == 0:
                if failure is not None:
                    raise failure
                raise RuntimeError("codebook_init kmeans failed on rank 0 (its log says why); this rank stops too")
            torch.distributed.broadcast(codebook, src=0)
        elif failure is not None:
            raise failure
        weight.copy_(codebook.to(weight.dtype))
        self.codebook_init_pending = False

    # --- collapse remedies: ema.py, restarts.py, simvq.py, composed here and nowhere else ---------------------
    def setup_remedies(self, codebook_update: str, ema_decay: float, ema_eps: float, dead_code_threshold: float,
                       dead_code_every: int, codebook_param: str, simvq_learn_codebook: bool) -> None:
        """Check the options (one ValueError each) and build only the state the chosen ones need."""
        self.codebook_update = check_codebook_update(codebook_update, ema_decay, ema_eps)
        self.dead_code_threshold, self.dead_code_every = check_restarts(dead_code_threshold, dead_code_every)
        self.codebook_param = check_codebook_param(codebook_param, bool(simvq_learn_codebook), self.remap,
                                                   self.codebook_update, self.dead_code_threshold)
        self.simvq_learn_codebook = bool(simvq_learn_codebook)
        self.codebook_updates = True  # plain attribute; codebook_updates_paused() clears it for a repeat forward
        ema = self.codebook_update == "ema"
        self.code_ema = (CodeEMA(self.n_e, self.e_dim, ema, ema_decay, ema_eps)
                         if ema or self.dead_code_threshold > 0 else None)
        weight = self.embedding.weight
        self.codebook_transform = (codebook_transform(self.e_dim, weight.device, weight.dtype)
                                   if self.codebook_param == "simvq" else None)
        if ema or (self.codebook_transform is not None and not self.simvq_learn_codebook):
            self.embedding.weight.requires_grad_(False)  # moved by the EMA, or held fixed under W (SimVQ's C)
        self.codebook_changed()

    @torch.no_grad()
    def codebook_changed(self) -> None:
        """Bring the remedies' state in line with a codebook just set (construction, a k-means init)."""
        if self.code_ema is not None:
            self.code_ema.reset(self.norm(self.embedding.weight))
        if self.codebook_transform is not None:
            reset_transform(self.codebook_transform)

    def effective_codebook(self) -> Tensor:
        """(K, d) the codebook that the search, the loss and the output use: C, or C W^T under SimVQ."""
        weight = self.embedding.weight
        if self.codebook_transform is None:
            return weight
        with torch.autocast(device_type=weight.device.type, enabled=False):  # full-precision codewords
            return self.codebook_transform(weight)

    @torch.no_grad()
    def update_codebook(self, idx: Tensor, x: Tensor) -> None:
        """After a training forward: running counts, the EMA codebook, dead-code restarts. idx (N,), x (N, d) in
        lookup space. Collective under torch.distributed (every rank runs it on every training forward)."""
        ema, weight = self.code_ema, self.embedding.weight
        ema.update(idx, x)
        if self.codebook_update == "ema":
            weight.copy_(ema.codebook(self.use_norm).to(weight.dtype))
        if self.dead_code_threshold > 0:
            codes = idx.new_zeros(0)
            step = int(ema.steps)
            if step % self.dead_code_every == 0:
                codes, rows = dead_code_restarts(ema.counts, self.dead_code_threshold, x,
                                                 restart_seed(torch.initial_seed(), step))
                weight[codes] = rows.to(weight.dtype)
                ema.restart(codes, rows, self.dead_code_threshold)
            self.stats.last = {**self.stats.last,
                               "restarted_codes": torch.tensor(float(codes.numel()), device=x.device)}

    # --- quantization ---------------------------------------------------------------------------------------
    def norm(self, x: Tensor) -> Tensor:
        """l2-normalise the last dimension in ``use_norm`` mode; identity otherwise."""
        return F.normalize(x, dim=-1) if self.use_norm else x

    def quantize_flat(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize rows. z: (N, d). Returns (output (N, d), codebook loss (0-d), indices (N,))."""
        if self.codebook_init_pending and self.training:
            self.init_codebook_from(z.detach())
            self.codebook_changed()
        codebook = self.effective_codebook()
        with torch.autocast(device_type=z.device.type, enabled=False):
            # The search runs in fp32 at least, even under autocast (fp16 distances mis-rank close codes); a float64
            # model keeps float64, as taming's search does.
            dt = work_dtype(z, codebook)
            idx = find_nearest(self.norm(z.detach().to(dt)), self.norm(codebook.detach().to(dt)),
                               self.search, chunk_rows=self.search_chunk_size, max_bytes=self.search_max_bytes)
        z_q = self.norm(F.embedding(idx, codebook))
        z_l = self.norm(z)
        commitment = torch.mean((z_q.detach() - z_l) ** 2)
        if self.codebook_update == "ema":  # the EMA moves the codebook: its term goes, the encoder's term stays
            loss = commitment if self.legacy else self.beta * commitment
        elif not self.legacy:
            loss = self.beta * commitment + torch.mean((z_q - z_l.detach()) ** 2)
        else:
            loss = commitment + self.beta * torch.mean((z_q - z_l.detach()) ** 2)
        if self.track_stats:
            self.stats.update(idx, z_l, z_q)
        # The rotation goes from the raw encoder output onto the (normalised) codeword, as the released code does.
        out = rotation_trick(z, z_q, self.gradient)
        if self.code_ema is not None and self.training and self.codebook_updates:
            self.update_codebook(idx, z_l.detach())
        return out, loss, idx

    def forward(self, z: Tensor, temp: Optional[float] = None, rescale_logits: bool = False,
                return_logits: bool = False) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        """z: (B, C, H, W) -> (z_q (B, C, H, W), loss, (None, None, indices)), as taming's ``VectorQuantizer2``.

        indices are (B*H*W, 1)-shaped like upstream's after remapping, (B*H*W,) otherwise, or (B, H, W) with
        ``sane_index_shape``.
        """
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits exist only for Gumbel-interface compatibility")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"expected z of shape (B, {self.e_dim}, H, W), got {tuple(z.shape)}")
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        out, loss, idx = self.quantize_flat(z.view(-1, self.e_dim))
        z_q = rearrange(out.view(z.shape), "b h w c -> b c h w").contiguous()

        if self.remap is not None:
            idx = self.remap_to_used(idx.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices: Tensor, shape: Optional[tuple[int, ...]]) -> Tensor:
        """Codewords for indices; shape (B, H, W, C) gives (B, C, H, W) as upstream. Normalised in use_norm mode;
        under SimVQ the effective codewords."""
        if self.codebook_transform is None:
            z_q = super().get_codebook_entry(indices, shape)
        else:  # SimVQ: rows of C W^T (remap is refused with simvq)
            z_q = F.embedding(indices, self.effective_codebook())
            if shape is not None:
                z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        if self.use_norm:
            z_q = F.normalize(z_q, dim=1 if shape is not None else -1)
        return z_q


class NormRotationQuantizer(RotationVectorQuantizer):
    """The shared quantizer behind enhancing-transformers' ``VectorQuantizer`` interface (ViT-VQGAN).

    Same argument names (``embed_dim, n_embed, beta, use_norm``), ``N(0, 1)`` codebook initialisation, loss term
    order (taming's ``legacy=False``), and return ``(z_q (B, T, C), loss, indices (B, T))``. With
    ``gradient="ste"`` it reproduces upstream's forward and backward.
    """

    def __init__(self, embed_dim: int, n_embed: int, beta: float = 0.25, use_norm: bool = True,
                 use_residual: bool = False, num_quantizers: Optional[int] = None, gradient: str = "rotation",
                 search_chunk_size: Optional[int] = None, track_stats: bool = True, search: str = "auto",
                 search_max_bytes: int = 64 * 2**20, codebook_init: str = "upstream", kmeans_iters: int = 10,
                 codebook_update: str = "gradient", ema_decay: float = 0.99, ema_eps: float = 1e-5,
                 dead_code_threshold: float = 0.0, dead_code_every: int = 1, codebook_param: str = "plain",
                 simvq_learn_codebook: bool = False, **kwargs: Any) -> None:
        refuse_unknown_options(type(self), kwargs)  # upstream's VectorQuantizer swallows unknown keys silently
        if use_residual:  # one lookup here; the stages are residual.py's subclass
            raise ValueError("NormRotationQuantizer does one codebook lookup: for use_residual=True (residual "
                             "stages) build adapters.quantizer.ResidualNormRotationQuantizer")
        super().__init__(n_embed, embed_dim, beta, legacy=False, gradient=gradient, use_norm=use_norm,
                         search_chunk_size=search_chunk_size, search_max_bytes=search_max_bytes,
                         track_stats=track_stats, search=search, codebook_init=codebook_init,
                         kmeans_iters=kmeans_iters, codebook_update=codebook_update, ema_decay=ema_decay,
                         ema_eps=ema_eps, dead_code_threshold=dead_code_threshold, dead_code_every=dead_code_every,
                         codebook_param=codebook_param, simvq_learn_codebook=simvq_learn_codebook)
        self.embedding.weight.data.normal_()
        self.codebook_changed()  # the remedies' state follows the N(0, 1) draw
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.use_residual = False
        self.num_quantizers = num_quantizers
        self.straight_through = True

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """z: (B, T, C) -> (z_q (B, T, C), loss, indices (B, T))."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"expected z with last dimension {self.embed_dim}, got {tuple(z.shape)}")
        out, loss, idx = self.quantize_flat(z.reshape(-1, self.embed_dim))
        return out.view(z.shape), loss, idx.view(*z.shape[:-1])
