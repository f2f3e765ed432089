"""The shared rotation-trick quantizer: pure estimator functions, drop-in modules and codebook statistics."""
from .ema import CODEBOOK_UPDATES, CodeEMA
from .functional import GRADIENTS, check_gradient, reflect, rotate, rotation_trick, straight_through
from .kmeans import CODEBOOK_INITS, check_codebook_init, kmeans_codebook
from .modules import NormRotationQuantizer, RotationVectorQuantizer, codebook_updates_paused
from .residual import ROTATION_SCOPES, ResidualNormRotationQuantizer, check_rotation_scope
from .search import (SEARCHES, check_search, find_nearest, fused_compile_count, fused_nearest_code,
                     nearest_code, work_dtype)
from .simvq import CODEBOOK_PARAMS
from .stats import CodebookStats, codebook_log_dict, perplexity_from_counts

__all__ = [
    "CODEBOOK_INITS", "check_codebook_init", "kmeans_codebook", "CODEBOOK_UPDATES", "CODEBOOK_PARAMS", "CodeEMA",
    "codebook_updates_paused",
    "GRADIENTS", "check_gradient", "nearest_code", "SEARCHES", "check_search", "find_nearest", "fused_compile_count",
    "fused_nearest_code", "work_dtype", "reflect", "rotate", "rotation_trick", "straight_through",
    "RotationVectorQuantizer", "NormRotationQuantizer", "ResidualNormRotationQuantizer", "ROTATION_SCOPES",
    "check_rotation_scope", "CodebookStats", "codebook_log_dict",
    "perplexity_from_counts",
]
