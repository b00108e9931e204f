"""sparse_core: retrofit block-sparse attention onto existing transformers LLMs.

Public names are imported lazily so `import sparse_core` stays cheap (no torch until needed)."""

from __future__ import annotations

import importlib
from typing import Any

from sparse_core.plan import LayerParams, ModelRefError, PlanError, SparsePlan, load_plan, save_plan

_LAZY: dict[str, str] = {
    # calibration and evaluation (issue 3)
    "calibrate": "sparse_core.calibration",
    "Budget": "sparse_core.calibration",
    "CalibrationLimits": "sparse_core.calibration",
    "CalibrationReport": "sparse_core.calibration",
    "evaluate": "sparse_core.evaluation",
    "EvalSuite": "sparse_core.evaluation",
    "EvaluationReport": "sparse_core.evaluation",
    "score_request": "sparse_core.tasks",
    # what calibration needs of its texts (checked when a use case is added)
    "texts_shortfall": "sparse_core.corpus",
    "split_texts": "sparse_core.corpus",
    # loading
    "load_model": "sparse_core.loading",
    "resolve_model_ref": "sparse_core.loading",
    "ModelRefInfo": "sparse_core.loading",
    "BUILTIN_MODELS": "sparse_core.loading",
    # retrofit
    "sparsify": "sparse_core.retrofit",
    "unsparsify": "sparse_core.retrofit",
    "sparsified": "sparse_core.retrofit",
    "is_sparsified": "sparse_core.retrofit",
    "sparse_stats": "sparse_core.retrofit",
    "SparseStats": "sparse_core.retrofit",
    "decode_stats": "sparse_core.retrofit",
    "DecodePlan": "sparse_core.decode.plan",
    "PagedCache": "sparse_core.decode.cache",
    "paged_cache_kwargs": "sparse_core.decode.cache",
    # functional API
    "sparse_attention": "sparse_core.kernels",
    "AttentionInfo": "sparse_core.kernels",
    "available_kernels": "sparse_core.kernels",
    # estimators and selection
    "EstimatorContext": "sparse_core.estimators",
    "register_estimator": "sparse_core.estimators",
    "get_estimator": "sparse_core.estimators",
    "available_estimators": "sparse_core.estimators",
    "BlockSelection": "sparse_core.selection",
    "select_blocks": "sparse_core.selection",
}

__all__ = ["LayerParams", "ModelRefError", "PlanError", "SparsePlan", "load_plan", "save_plan", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
