"""Sparse decode: page summaries beside the KV cache, page selection per KV head, the decode kernel
(sparse_core.kernels.decode), the plan's `decode` section, calibration and speed measurement of
decode. docs/sparse_core.md, "Sparse decode"."""

from sparse_core.decode.plan import DECODE_ESTIMATORS, DecodeLayerParams, DecodePlan

__all__ = ["DECODE_ESTIMATORS", "DecodeLayerParams", "DecodePlan"]
