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
    FORMAT_VERSION,
    PLAN_FILE,
    TENSORS_FILE,
    PlanError,
    SparsePlan,
    load_plan,
    model_shape,
)
from sparse_core.plan import save_plan as _save_plan

HASH_FILE = "plan.sha256"


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
    path = _save_plan(plan, directory)
    digest = plan.content_hash()
    (Path(directory) / HASH_FILE).write_text(
        json.dumps({"content_hash": digest, "format_version": FORMAT_VERSION}) + "\n"
    )
    return path, digest


def load(directory: str | Path, *, config: Any = None) -> SparsePlan:
    """Load and verify a plan; with `config`, refuse a plan made for a different model."""
    directory = Path(directory)
    plan = load_plan(directory, config=config)
    base = directory if directory.is_dir() else directory.parent
    hfile = base / HASH_FILE
    if hfile.is_file():
        try:
            recorded = json.loads(hfile.read_text())["content_hash"]
        except (ValueError, KeyError, TypeError):
            raise PlanError(f"{hfile}: unreadable content hash record") from None
        actual = plan.content_hash()
        if recorded != actual:
            raise PlanError(
                f"{base / PLAN_FILE}: content hash {actual[:12]} does not match the recorded {recorded[:12]} "
                "(the plan was edited or corrupted after it was saved)"
            )
    if config is not None:
        check_tensors_fit(plan, config)
    return plan


def _uses(plan: SparsePlan, name: str) -> bool:
    return plan.estimator == name or any(ov.get("estimator") == name for ov in plan.layer_overrides.values())


def check_tensors_fit(plan: SparsePlan, config: Any) -> None:
    """A gate / gate_v2 plan's tensors must match the model's layers, heads and head dim."""
    if _uses(plan, "gate_v2"):
        from sparse_core.estimators.learned_gate import GateShape
        from sparse_core.estimators.learned_gate_v2 import BlockGateV2

        have2 = BlockGateV2.shape_of(plan.tensors or {})
        if have2 is None:
            raise PlanError("plan uses the 'gate_v2' estimator but carries no gate_v2 weights")
        need2 = GateShape.from_config(config, have2.gate_dim)
        if have2 != need2:
            raise PlanError(
                f"plan's gate_v2 weights are for a different model: layers/heads/kv heads/head dim "
                f"{have2.num_layers}/{have2.num_heads}/{have2.num_kv_heads}/{have2.head_dim} vs model "
                f"{need2.num_layers}/{need2.num_heads}/{need2.num_kv_heads}/{need2.head_dim}"
            )
    if not _uses(plan, "gate"):
        return
    from sparse_core.estimators.learned_gate import BlockGate, GateShape

    if not plan.tensors:
        raise PlanError("plan uses the 'gate' estimator but carries no gate weights")
    have = BlockGate.shape_of(plan.tensors)
    need = GateShape.from_config(config, have.gate_dim if have else None)
    if have != need:
        raise PlanError(
            f"plan's gate weights are for a different model: layers/heads/kv heads/head dim "
            f"{have.num_layers}/{have.num_heads}/{have.num_kv_heads}/{have.head_dim} vs model "
            f"{need.num_layers}/{need.num_heads}/{need.num_kv_heads}/{need.head_dim}"
        )


__all__ = ["HASH_FILE", "check_tensors_fit", "load", "save", "stamp_model", "stamp_tensors_digest"]
