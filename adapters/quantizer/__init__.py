"""The shared rotation-trick quantizer: pure estimator functions, drop-in modules and codebook statistics."""
from .functional import GRADIENTS, check_gradient, reflect, rotate, rotation_trick, straight_through
from .kmeans import CODEBOOK_INITS, check_codebook_init, kmeans_codebook
from .modules import NormRotationQuantizer, RotationVectorQuantizer
from .search import (SEARCHES, check_search, find_nearest, fused_compile_count, fused_nearest_code,
                     nearest_code, work_dtype)
from .stats import CodebookStats, codebook_log_dict, perplexity_from_counts

__all__ = [
    "CODEBOOK_INITS", "check_codebook_init", "kmeans_codebook",
    "GRADIENTS", "check_gradient", "nearest_code", "SEARCHES", "check_search", "find_nearest", "fused_compile_count",
    "fused_nearest_code", "work_dtype", "reflect", "rotate", "rotation_trick", "straight_through",
    "RotationVectorQuantizer", "NormRotationQuantizer", "CodebookStats", "codebook_log_dict",
    "perplexity_from_counts",
]
