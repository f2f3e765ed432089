"""Nearest-code search: the index of the closest codebook row for each encoder row, three ways.

=============  ===================================================================================================
``blocked``    taming's ``(|z|^2 + |c|^2) - 2 z c^T`` over row blocks (:func:`nearest_code`): a BLAS matmul per
               block, whose (rows x K) distance block is written and re-read. Same indices as upstream's full
               N x K matrix, bit for bit, for float32 and float64 inputs; memory O(rows_per_block * K).
``fused``      ``argmin_k sum_j (z_j - c_kj)^2`` compiled by ``torch.compile`` (inductor: C++/OpenMP on CPU,
               Triton on CUDA) into one kernel that keeps a running minimum per row (in float32: distance and index
               packed in one int64) while it walks the codebook: no N x K matrix is ever written; memory O(N + K)
               beyond the inputs (dense copies of z and c^T, the indices). Compiled once per (device, dtype, d): N
               and K are unbacked symbols, so no batch size, codebook size or step recompiles.
``auto``       ``fused`` where it can be compiled (a C++ compiler on CPU, Triton on CUDA), else ``blocked``, with
               one warning saying why. A compile that fails falls back for its own (device, dtype, d) only.
=============  ===================================================================================================

What both searches share (so that they differ only at near-ties, below):

* dtype: both compute in float64 if z or the codebook is float64, else in float32 (float16 and bfloat16 inputs,
  and a float16 z with a float32 codebook, are upcast: half-precision distances mis-rank close codes).
* a codebook row with a NaN or an infinity is an error (``UserError``, one line): such a codebook is a corrupted
  run, and the two searches would rank it differently (the blocked argmin picks a NaN distance, the fused minimum
  skips it). Inside a caller's ``torch.compile`` the check, which needs the data, is left out; the compiled fused
  expression then never picks a non-finite row unless all are.
* a row of z with a NaN or an infinity gets code 0 (argmin's answer for an all-NaN row).

Precision (u = 2^-24 in float32, 2^-53 in float64; gamma_m = m u / (1 - m u); D(k) = |z - c_k|^2 exactly):

* fused: |D_f(k) - D(k)| <= gamma_{d+2} D(k) (per coordinate a rounded difference and a rounded square, then d - 1
  rounded additions of non-negative terms; an FMA only removes roundings). So the fused index a and the exact
  nearest k* satisfy D(a) - D(k*) <= gamma_{d+2} (D(a) + D(k*)): the exact nearest code, except where the two
  nearest distances tie within a relative ~2 (d + 2) u (6e-7 at d = 3, 4e-6 at d = 32 in float32).
* blocked: |D_b(k) - D(k)| <= gamma_{d+2} (|z| + |c_k|)^2 (the squared norms and the dot product each carry
  gamma_d of their size, then two roundings): relative to the norms, not to the distance, so codes far from the
  origin compared with their spacing lose digits to cancellation that the fused difference never has.
* fused index a != blocked index b: |D(a) - D(b)| <= gamma_{d+2} ((|z| + |c_a|)^2 + (|z| + |c_b|)^2), a near-tie
  (tests/test_quantizer_search.py checks both bounds against distances recomputed in float64), for finite inputs
  whose distances do not overflow.

TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) void the blocked bound (u = 2^-11 in the dot product); the
fused search does no matmul and keeps full float32.
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from adapters.runtime.errors import UserError

SEARCHES: tuple[str, ...] = ("auto", "fused", "blocked")

# (device type, work dtype, d): what the fused search's compiled state is kept per. One key's failure never
# changes what another key does.
SearchKey = tuple[str, torch.dtype, int]

# Graphs compiled for the fused search in this process (each is one (device, dtype, d)); a test asserts that a new
# batch size or codebook size does not add one.
_COMPILES = [0]
# One compiled callable per (d, dtype): dynamo keeps its compiled graphs (and its recompile limit, 8) per code
# object, so each gets a code object of its own and a test suite or a process with many codebook dims never hits it.
_COMPILED: dict[tuple[int, torch.dtype], Callable[[Tensor, Tensor], Tensor]] = {}
# Keys whose first compiled call has succeeded: later calls are not wrapped in the fallback.
_WORKING: set[SearchKey] = set()
# Key -> why its compile failed (auto then stays blocked for that key only; fused says why).
_FAILED: dict[SearchKey, str] = {}
# What auto has already said why it falls back for: a device type (no compiler) or a key (a failed compile).
_WARNED: set[object] = set()


def check_search(search: str) -> str:
    """Return ``search`` if it names a search, else raise one ValueError listing the valid names."""
    if search not in SEARCHES:
        raise ValueError(f"unknown nearest-code search {search!r}: choose one of {', '.join(SEARCHES)}")
    return search


def fused_compile_count() -> int:
    """Graphs the fused search has compiled in this process (one per device, dtype and d when all is well)."""
    return _COMPILES[0]


def work_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    """The dtype both searches compute distances in: float64 if either input is, else float32."""
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def _check_inputs(z: Tensor, codebook: Tensor, finite: bool = True) -> None:
    """z (N, d) and a non-empty codebook (K, d) on one device; with ``finite``, every codeword finite (one sync)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1] or codebook.shape[0] == 0:
        raise ValueError(f"nearest-code search expects z (N, d) and a non-empty codebook (K, d), got "
                         f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook on {codebook.device}: move both to one device")
    if finite and codebook.is_floating_point():
        bad = ~torch.isfinite(codebook.detach()).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise UserError(f"nearest-code search: {len(rows)} of {codebook.shape[0]} codebook rows are not finite "
                            f"(NaN or inf; rows {shown}): the codebook is corrupted, as after a diverged run. "
                            f"Resume from an earlier checkpoint (and lower the learning rate), or reinitialise it")


def _code_zero_where_not_finite(z: Tensor, idx: Tensor) -> Tensor:
    """idx with code 0 for the rows of z (N, d) holding a NaN or an infinity: one answer for both searches."""
    return torch.where(torch.isfinite(z).all(dim=1), idx, torch.zeros_like(idx))


# ---------------------------------------------------------------------------------------------------------------
# blocked
# ---------------------------------------------------------------------------------------------------------------
def nearest_code(z: Tensor, codebook: Tensor, chunk_rows: Optional[int] = None,
                 max_bytes: int = 64 * 2**20) -> Tensor:
    """Index of the nearest codebook row for each row of z, in bounded memory (the ``blocked`` search).

    z: (N, d); codebook: (K, d). Returns (N,) int64. Evaluates taming's distance expression
    (|z|^2 + |c|^2) - 2 z c^T with the same rounding, so indices match the full N x K matrix, but over blocks of
    ``chunk_rows`` rows (default: as many as fit ``max_bytes`` per block of the work dtype; two blocks live at once),
    so the peak is O(chunk_rows * K), not O(N K). Computes in :func:`work_dtype`; a non-finite codebook row is a
    ``UserError``; a non-finite row of z gets code 0.
    """
    _check_inputs(z, codebook)
    return _blocked(z, codebook, chunk_rows, max_bytes)


def _blocked(z: Tensor, codebook: Tensor, chunk_rows: Optional[int], max_bytes: int) -> Tensor:
    """nearest_code without the input checks: (N, d), (K, d) -> (N,) int64."""
    work = work_dtype(z, codebook)
    n, k = z.shape[0], codebook.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, max_bytes // (torch.finfo(work).bits // 8 * max(k, 1)))
    if chunk_rows <= 0:
        raise ValueError(f"search chunk size must be a positive number of rows, got {chunk_rows}")
    # Autocast off: under it einsum would run in half precision whatever the work dtype.
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        cb = codebook.detach().to(work)
        cb_sq = torch.sum(cb ** 2, dim=1)
        cb_t = cb.t()
        out = torch.empty(n, dtype=torch.long, device=z.device)
        for start in range(0, n, chunk_rows):
            zc = z[start:start + chunk_rows].detach().to(work)  # per block: the upcast copy stays bounded too
            d = torch.sum(zc ** 2, dim=1, keepdim=True) + cb_sq
            d.sub_(torch.einsum("bd,dn->bn", zc, cb_t).mul_(2))
            out[start:start + chunk_rows] = torch.argmin(d, dim=1)
        return _code_zero_where_not_finite(z.detach(), out)


# ---------------------------------------------------------------------------------------------------------------
# fused
# ---------------------------------------------------------------------------------------------------------------
def _counting_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """torch.compile's inductor backend, counting the graphs it is handed (the compile-count hook)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    _COMPILES[0] += 1
    # Inductor stores an intermediate to memory once a pointwise expression reads more than ~8-12 buffers or has
    # more than 30-50 ops (to bound recomputation); the search's d-term sum would then be written out as an N x K
    # matrix for d > 8. Nothing here is recomputed, so those limits are lifted for this graph (where they exist).
    patches = {name: 1 << 20 for name in ("realize_acc_reads_threshold", "realize_opcount_threshold")
               if hasattr(inductor_config, name)}
    return compile_fx(gm, example_inputs, config_patches=patches)


def _search_expression(z: Tensor, ct: Tensor) -> Tensor:
    """argmin_k sum_j (z_j - c_kj)^2 for z (N, d) and c^T (d, K), both float32 or both float64 -> (N,) int64: what
    the fused search compiles.

    Unrolled over d (static): inductor fuses the whole expression into one reduction over K. A ``.sum`` over d would
    be a reduction of its own, written out as an N x K buffer for d > 8. Rows of c^T are contiguous in K, so each term
    is one vector load.
    """
    dist = (z[:, 0, None] - ct[0]) ** 2
    for j in range(1, ct.shape[0]):
        dist = dist + (z[:, j, None] - ct[j]) ** 2
    if dist.dtype == torch.float64:
        # 64 distance bits and an index do not fit one int64 key: inductor's own argmin (lowest index on ties).
        return dist.argmin(dim=1)
    # argmin as the min of one int64 key per code, (distance bits << 31) | k: for floats >= 0 the bit patterns order
    # as the values do, and equal distances fall to the lowest index, as argmin's. On CPU this is 4x faster than
    # inductor's vectorised argmin, which carries values, int64 indices and NaN tests through every step. The bits
    # are read unsigned, so a NaN of either sign sorts after +inf; k < 2^31.
    bits = dist.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    code = torch.arange(ct.shape[1], device=ct.device, dtype=torch.int64)
    return ((bits << 31) | code).amin(dim=1) & 0x7FFFFFFF


def _fused_for(d: int, dtype: torch.dtype) -> Callable[[Tensor, Tensor], Tensor]:
    """The compiled search for rows of dimension d in ``dtype``: (N, d), (d, K) -> (N,) int64."""
    if (d, dtype) not in _COMPILED:
        name = f"fused_nearest_code_d{d}_{str(dtype).rpartition('.')[2]}"
        code = _search_expression.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _search_expression.__globals__, name)
        _COMPILED[d, dtype] = torch.compile(fn, backend=_counting_inductor, dynamic=False, fullgraph=True)
    return _COMPILED[d, dtype]


def _is_compiling() -> bool:
    """True inside a caller's torch.compile trace."""
    compiler = getattr(torch, "compiler", None)
    return bool(getattr(compiler, "is_compiling", lambda: False)())


def fused_search_unavailable(device: torch.device) -> Optional[str]:
    """Why the fused search cannot be compiled for ``device``, or None when it can (checked without compiling)."""
    return _unavailable(device.type)


@functools.lru_cache(maxsize=None)  # asked on every forward; the answer is the process's
def _unavailable(device_type: str) -> Optional[str]:
    decorators = getattr(getattr(torch, "_dynamo", None), "decorators", None)
    if not hasattr(decorators, "mark_unbacked"):
        return f"torch {torch.__version__} lacks torch._dynamo.decorators.mark_unbacked (no shape-generic compile)"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:  # inductor raises its own InvalidCxxCompiler, or fails to import
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            return f"no working C++ compiler for torch.compile (install g++ or set CXX; inductor says: {detail})"
        return None
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "this torch has no Triton support"
        return None if has_triton() else "Triton is not installed, or does not support this GPU (it needs sm_70+)"
    return f"the fused search is compiled for cpu and cuda only, not {device_type}"


def _say_why_once(what: object, where: str, reason: str) -> None:
    """auto's one warning per ``what`` (a device type, or a search key) that it searches blocked ``where``."""
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"search: auto uses the blocked nearest-code search {where}: {reason}; set search: blocked to "
                      "silence this", RuntimeWarning, stacklevel=4)


def _describe(key: SearchKey) -> str:
    device, dtype, d = key
    return f"on {device} for {str(dtype).rpartition('.')[2]} rows of dimension {d}"


def fused_nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for each row of z, by the compiled search; no N x K matrix.

    z: (N, d); codebook: (K, d). Returns (N,) int64 on z's device. Computes in :func:`work_dtype`; a non-finite
    codebook row is a ``UserError``; a non-finite row of z gets code 0. The first call for a (device, dtype, d)
    compiles (see the README for how long); later calls of any N or K reuse that kernel.
    """
    _check_inputs(z, codebook)
    return _fused(z, codebook)


def _fused(z: Tensor, codebook: Tensor) -> Tensor:
    """fused_nearest_code without the input checks: (N, d), (K, d) -> (N,) int64."""
    if codebook.shape[0] >= 2**31:
        raise ValueError(f"the fused search packs code indices in 31 bits; a codebook of {codebook.shape[0]} rows "
                         "needs search: blocked")
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    work = work_dtype(z, codebook)
    # Fresh dense copies made outside inference mode and without autograd: the compiled graph's guards (strides,
    # dtype, dispatch keys) then hold for every call, validation under inference_mode included. They cost O(N d + K d).
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        zc = z.detach().to(work, memory_format=torch.contiguous_format, copy=True)
        ct = codebook.detach().t().to(work, memory_format=torch.contiguous_format, copy=True)
        # Unbacked sizes: no guard on N or K at all, not even the 0/1 specialisation that marks as dynamic keep.
        torch._dynamo.decorators.mark_unbacked(zc, 0)
        torch._dynamo.decorators.mark_unbacked(ct, 1)
        idx = _fused_for(z.shape[1], work)(zc, ct)
        return _code_zero_where_not_finite(zc, idx)


# ---------------------------------------------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------------------------------------------
def find_nearest(z: Tensor, codebook: Tensor, search: str = "auto", chunk_rows: Optional[int] = None,
                 max_bytes: int = 64 * 2**20) -> Tensor:
    """Index of the nearest codebook row for each row of z, by the named search (see the module docstring).

    z: (N, d); codebook: (K, d). Returns (N,) int64. ``chunk_rows`` / ``max_bytes`` bound the blocked search's
    blocks and are ignored by the fused one. A non-finite codebook row is a ``UserError`` whichever the search.
    """
    check_search(search)
    compiling = _is_compiling()
    _check_inputs(z, codebook, finite=not compiling)  # the finiteness check needs the data: not in a trace
    if search == "blocked":
        return _blocked(z, codebook, chunk_rows, max_bytes)
    work = work_dtype(z, codebook)
    if compiling:  # inside a caller's torch.compile: the plain expression, which that compile fuses
        idx = _search_expression(z.detach().to(work), codebook.detach().t().to(work))
        return _code_zero_where_not_finite(z.detach(), idx)
    device = z.device.type
    key: SearchKey = (device, work, z.shape[1])
    unavailable = fused_search_unavailable(z.device)  # the machine's (no compiler): every key on this device
    reason = unavailable or _FAILED.get(key)
    if reason is not None:
        where = f"on {device}" if unavailable else _describe(key)
        if search == "fused":
            raise RuntimeError(f"search: fused cannot run {where}: {reason}; use search: auto (falls back to "
                               "blocked) or search: blocked")
        _say_why_once(device if unavailable else key, where, reason)
        return _blocked(z, codebook, chunk_rows, max_bytes)
    if key in _WORKING or z.shape[0] == 0:
        return _fused(z, codebook)
    try:  # the first call for this key compiles; a broken tool chain (or an unsupported case) shows up here
        idx = _fused(z, codebook)
    except Exception as err:
        why = f"torch.compile failed ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]})"
        if search == "fused":
            raise RuntimeError(f"search: fused cannot run {_describe(key)}: {why}; use search: auto (falls back to "
                               "blocked) or search: blocked") from err
        _FAILED[key] = why  # this key only: other dtypes, dimensions and devices keep compiling
        _say_why_once(key, _describe(key), why)
        return _blocked(z, codebook, chunk_rows, max_bytes)
    _WORKING.add(key)
    return idx
