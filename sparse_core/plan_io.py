"""Plan artifacts: what `sparse_core.plan.save_plan/load_plan` write (plan.json + safetensors), plus
the checks an artifact that travels between machines needs:

- the gate-weights digest is stamped into the plan *before* saving, so `content_hash()` is the same
  in memory, on disk and after loading (it is what the registry versions plans by);
- the content hash is written next to the plan and verified on load (a hand-edited plan.json that
  changes behaviour without changing its recorded hash is refused);
- the model a plan was made for (layers, heads, KV heads, head dim) is stamped in and checked on
  load, including the learned gate's tensor shapes, so a plan for another model is a clear error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sparse_core.plan import (
    HASH_FILE,
    TENSORS_FILE,
    PlanError,
    SparsePlan,
    load_tensors,
    model_shape,
    plan_file,
    read_plan_json,
    validate_plan_for,
)
from sparse_core.plan import save_plan as _save_plan


def stamp_tensors_digest(plan: SparsePlan) -> SparsePlan:
    """Record the sha256 of the plan's tensors as save_plan will write them (deterministic bytes)."""
    if plan.tensors:
        from safetensors.torch import save

        blob = save({k: v.detach().contiguous().cpu() for k, v in plan.tensors.items()})
        plan.metadata["gate_weights"] = {
            "file": TENSORS_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "keys": sorted(plan.tensors),
        }
    return plan


def stamp_model(plan: SparsePlan, config: Any) -> SparsePlan:
    plan.metadata["model_shape"] = model_shape(config)
    if getattr(config, "model_type", None):
        plan.metadata["model_type"] = str(config.model_type)
    if isinstance(getattr(config, "weights_fingerprint", None), str):
        plan.metadata["model_fingerprint"] = config.weights_fingerprint
    name = getattr(config, "_name_or_path", None)
    if name:
        plan.metadata.setdefault("model_ref", str(name))
    return plan


def save(plan: SparsePlan, directory: str | Path, *, config: Any = None) -> tuple[Path, str]:
    """Save the plan (stamped with the model shape when `config` is given); returns (path, hash)."""
    if config is not None:
        plan.validate_for(config)
        stamp_model(plan, config)
    stamp_tensors_digest(plan)
    path = _save_plan(plan, directory)  # writes HASH_FILE beside it
    return path, plan.content_hash()


def load(directory: str | Path, *, config: Any = None) -> SparsePlan:
    """Load and verify a plan; with `config`, refuse a plan made for a different model. The recorded
    content hash (plan.sha256, which `save_plan` writes with every plan, the registry's artifacts too) is
    checked before the tensors are read, and it must be there: without it an edited plan.json could not
    be told from the saved one. Every refusal is a PlanError naming the file."""
    file = plan_file(directory)
    plan = read_plan_json(file)
    hfile = file.parent / HASH_FILE
    if not hfile.is_file():
        raise PlanError(
            f"{file}: no {HASH_FILE} beside it (every saved plan has one; without it an "
            "edited plan.json cannot be told from the saved one)"
        )
    try:
        recorded = json.loads(hfile.read_text())["content_hash"]
        if not isinstance(recorded, str):
            raise TypeError(recorded)
    except (ValueError, KeyError, TypeError, OSError):
        raise PlanError(f"{hfile}: unreadable content hash record") from None
    actual = plan.content_hash()
    if recorded != actual:
        raise PlanError(
            f"{file}: content hash {actual[:12]} does not match the recorded {recorded[:12]} "
            "(the plan was edited or corrupted after it was saved)"
        )
    load_tensors(plan, file)
    if config is not None:
        validate_plan_for(plan, config, file)
        try:
            check_tensors_fit(plan, config)
        except PlanError as exc:
            raise PlanError(f"{file}: {exc}") from None
    return plan


def check_tensors_fit(plan: SparsePlan, config: Any) -> None:
    """Every estimator the plan names must be registered, and the weights each learned one reads must
    fit the model (the estimator's registry check: layers, heads, head dim)."""
    from sparse_core.estimators import available_estimators, get_weights_check

    named = {plan.estimator} | {ov["estimator"] for ov in plan.layer_overrides.values() if "estimator" in ov}
    known = available_estimators()
    unknown = sorted(named - set(known))
    if unknown:
        raise PlanError(f"unknown estimator(s) {unknown}; available: {known}")
    for name in (n for n in known if n in named):
        check = get_weights_check(name)
        if check is not None:
            check(plan, config)


__all__ = ["HASH_FILE", "check_tensors_fit", "load", "save", "stamp_model", "stamp_tensors_digest"]
