"""Nearest-code search: the index of the closest codebook row for each encoder row, three ways.

=============  ===================================================================================================
``blocked``    taming's ``(|z|^2 + |c|^2) - 2 z c^T`` over row blocks (``functional.nearest_code``): a BLAS matmul
               per block, whose (rows x K) distance block is written and re-read. Same indices as upstream's full
               N x K matrix, bit for bit; memory O(rows_per_block * K).
``fused``      ``argmin_k sum_j (z_j - c_kj)^2`` compiled by ``torch.compile`` (inductor: C++/OpenMP on CPU,
               Triton on CUDA) into one kernel that keeps a running minimum per row (of distance and index packed
               in one int64) while it walks the codebook: no N x K matrix is ever written; memory O(N + K) beyond
               the inputs (dense copies of z and c^T, the indices). Compiled once per (d, device, dtype): N and
               K are unbacked symbols, so no batch size, codebook size or step recompiles.
``auto``       ``fused`` where it can be compiled (a C++ compiler on CPU, Triton on CUDA), else ``blocked``, with
               one warning per device type saying why.
=============  ===================================================================================================

Precision (u = 2^-24, float32's unit roundoff; gamma_m = m u / (1 - m u); D(k) = |z - c_k|^2 exactly):

* fused: |D_f(k) - D(k)| <= gamma_{d+2} D(k) (per coordinate a rounded difference and a rounded square, then d - 1
  rounded additions of non-negative terms; an FMA only removes roundings). So the fused index a and the exact
  nearest k* satisfy D(a) - D(k*) <= gamma_{d+2} (D(a) + D(k*)): the exact nearest code, except where the two
  nearest distances tie within a relative ~2 (d + 2) u (6e-7 at d = 3, 4e-6 at d = 32).
* blocked: |D_b(k) - D(k)| <= gamma_{d+2} (|z| + |c_k|)^2 (the squared norms and the dot product each carry
  gamma_d of their size, then two roundings): relative to the norms, not to the distance, so codes far from the
  origin compared with their spacing lose digits to cancellation that the fused difference never has.
* fused index a != blocked index b: |D(a) - D(b)| <= gamma_{d+2} ((|z| + |c_a|)^2 + (|z| + |c_b|)^2), a near-tie
  (tests/test_quantizer_search.py checks both bounds against distances recomputed in float64).

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

from .functional import nearest_code

SEARCHES: tuple[str, ...] = ("auto", "fused", "blocked")

# Graphs compiled for the fused search in this process (each is one (d, device, dtype)); a test asserts that a new
# batch size or codebook size does not add one.
_COMPILES = [0]
# One compiled callable per d: dynamo keeps its compiled graphs (and its recompile limit, 8) per code object, so
# each d gets a code object of its own and a test suite or a process with many codebook dims never hits the limit.
_COMPILED: dict[int, Callable[[Tensor, Tensor], Tensor]] = {}
# (device type, d, dtype) whose first compiled call has succeeded: later calls are not wrapped in the fallback.
_WORKING: set[tuple[str, int, torch.dtype]] = set()
# Device type -> why the fused search cannot run there, once a compile has failed (auto then stays blocked).
_BROKEN: dict[str, str] = {}
# Device types for which auto has already said why it falls back.
_WARNED: set[str] = set()


def check_search(search: str) -> str:
    """Return ``search`` if it names a search, else raise one ValueError listing the valid names."""
    if search not in SEARCHES:
        raise ValueError(f"unknown nearest-code search {search!r}: choose one of {', '.join(SEARCHES)}")
    return search


def fused_compile_count() -> int:
    """Graphs the fused search has compiled in this process (one per d, device and dtype when all is well)."""
    return _COMPILES[0]


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
    """argmin_k sum_j (z_j - c_kj)^2 for z (N, d) and c^T (d, K) -> (N,) int64: what the fused search compiles.

    Unrolled over d (static): inductor fuses the whole expression into one reduction over K. A ``.sum`` over d would
    be a reduction of its own, written out as an N x K buffer for d > 8. Rows of c^T are contiguous in K, so each term
    is one vector load.
    """
    dist = (z[:, 0, None] - ct[0]) ** 2
    for j in range(1, ct.shape[0]):
        dist = dist + (z[:, j, None] - ct[j]) ** 2
    # argmin as the min of one int64 key per code, (distance bits << 31) | k: for floats >= 0 the bit patterns order
    # as the values do, and equal distances fall to the lowest index, as argmin's. On CPU this is 4x faster than
    # inductor's vectorised argmin, which carries values, int64 indices and NaN tests through every step. The bits
    # are read unsigned, so a NaN of either sign sorts after +inf; k < 2^31.
    bits = dist.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    code = torch.arange(ct.shape[1], device=ct.device, dtype=torch.int64)
    return ((bits << 31) | code).amin(dim=1) & 0x7FFFFFFF


def _fused_for(d: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The compiled search for rows of dimension d: (N, d), (d, K) -> (N,) int64."""
    if d not in _COMPILED:
        code = _search_expression.__code__.replace(co_name=f"fused_nearest_code_d{d}")
        fn = types.FunctionType(code, _search_expression.__globals__, code.co_name)
        _COMPILED[d] = torch.compile(fn, backend=_counting_inductor, dynamic=False, fullgraph=True)
    return _COMPILED[d]


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


def _say_why_once(device_type: str, reason: str) -> None:
    if device_type not in _WARNED:
        _WARNED.add(device_type)
        warnings.warn(f"search: auto uses the blocked nearest-code search on {device_type}: {reason}; set "
                      "search: blocked to silence this", RuntimeWarning, stacklevel=4)


def fused_nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for each row of z, by the compiled search; no N x K matrix.

    z: (N, d); codebook: (K, d). Returns (N,) int64 on z's device. Computes in float32 (float64 if either input is
    float64). The first call for a (d, device, dtype) compiles (see the README for how long); later calls of any N
    or K reuse that kernel.
    """
    _check_shapes(z, codebook)
    if codebook.shape[0] >= 2**31:
        raise ValueError(f"the fused search packs code indices in 31 bits; a codebook of {codebook.shape[0]} rows "
                         "needs search: blocked")
    n = z.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    work = _work_dtype(z, codebook)
    # Fresh dense copies made outside inference mode and without autograd: the compiled graph's guards (strides,
    # dtype, dispatch keys) then hold for every call, validation under inference_mode included. They cost O(N d + K d).
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        zc = z.detach().to(work, memory_format=torch.contiguous_format, copy=True)
        ct = codebook.detach().t().to(work, memory_format=torch.contiguous_format, copy=True)
        # Unbacked sizes: no guard on N or K at all, not even the 0/1 specialisation that marks as dynamic keep.
        torch._dynamo.decorators.mark_unbacked(zc, 0)
        torch._dynamo.decorators.mark_unbacked(ct, 1)
        return _fused_for(z.shape[1])(zc, ct)


def _work_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    """float64 if either input is, else float32 (half-precision distances mis-rank close codes)."""
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def _check_shapes(z: Tensor, codebook: Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1] or codebook.shape[0] == 0:
        raise ValueError(f"nearest-code search expects z (N, d) and a non-empty codebook (K, d), got "
                         f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook on {codebook.device}: move both to one device")


def find_nearest(z: Tensor, codebook: Tensor, search: str = "auto", chunk_rows: Optional[int] = None,
                 max_bytes: int = 64 * 2**20) -> Tensor:
    """Index of the nearest codebook row for each row of z, by the named search (see the module docstring).

    z: (N, d); codebook: (K, d). Returns (N,) int64. ``chunk_rows`` / ``max_bytes`` bound the blocked search's
    blocks and are ignored by the fused one.
    """
    check_search(search)
    if search == "blocked":
        return nearest_code(z, codebook, chunk_rows=chunk_rows, max_bytes=max_bytes)
    _check_shapes(z, codebook)
    if _is_compiling():  # inside a caller's torch.compile: the plain expression, which that compile fuses
        work = _work_dtype(z, codebook)
        return _search_expression(z.detach().to(work), codebook.detach().t().to(work))
    device = z.device.type
    reason = _BROKEN.get(device) or fused_search_unavailable(z.device)
    if reason is not None:
        if search == "fused":
            raise RuntimeError(f"search: fused cannot run on {device}: {reason}; use search: auto (falls back to "
                               "blocked) or search: blocked")
        _say_why_once(device, reason)
        return nearest_code(z, codebook, chunk_rows=chunk_rows, max_bytes=max_bytes)
    key = (device, z.shape[1], _work_dtype(z, codebook))
    if key in _WORKING or z.shape[0] == 0:
        return fused_nearest_code(z, codebook)
    try:  # the first call for this key compiles; a broken tool chain shows up here
        idx = fused_nearest_code(z, codebook)
    except Exception as err:
        why = f"torch.compile failed ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]})"
        if search == "fused":
            raise RuntimeError(f"search: fused cannot run on {device}: {why}; use search: auto (falls back to "
                               "blocked) or search: blocked") from err
        _BROKEN[device] = why
        _say_why_once(device, why)
        return nearest_code(z, codebook, chunk_rows=chunk_rows, max_bytes=max_bytes)
    _WORKING.add(key)
    return idx
