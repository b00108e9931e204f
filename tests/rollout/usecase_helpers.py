"""Helpers for the use-case tests: small valid specs in a temp dir, and DB snapshots to prove that a
rejected input wrote nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from rollout.db.models import Base
from rollout.db.session import get_engine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "usecases"


def example_spec(name: str = "support-chat") -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def write_spec(
    directory: Path,
    spec: dict[str, Any] | None = None,
    *,
    rows: list[dict[str, Any]] | None = None,
    raw_rows: bytes | None = None,
    filename: str = "usecase.yaml",
    with_dataset: bool = True,
) -> Path:
    """A spec (default: the support-chat example) with its dataset next to it. ``rows`` replaces the
    dataset (default: the first 12 rows of the example's), ``raw_rows`` writes bytes as they are."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = spec if spec is not None else example_spec()
    dataset = directory / str(spec.get("dataset", {}).get("path", "data.jsonl"))
    if not with_dataset:
        pass
    elif raw_rows is not None:
        dataset.write_bytes(raw_rows)
    else:
        if rows is None:
            src = EXAMPLES / "support_chat.jsonl"
            rows = [json.loads(line) for line in src.read_text().splitlines()[:12]]
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / filename
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def copy_example(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = example_spec(name)
    shutil.copy(EXAMPLES / spec["dataset"]["path"], directory / spec["dataset"]["path"])
    path = directory / f"{name}.yaml"
    shutil.copy(EXAMPLES / f"{name}.yaml", path)
    return path


def snapshot(url: str, home: Path | None = None) -> dict[str, Any]:
    """Every row of every table (plus the stored dataset files): equal before/after means nothing
    was written."""
    out: dict[str, Any] = {}
    with get_engine(url).connect() as conn:
        for table in Base.metadata.sorted_tables:
            out[table.name] = [
                tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns))
            ]
    if home is not None:
        ds = home / "datasets"
        out["_files"] = sorted(p.name for p in ds.iterdir()) if ds.is_dir() else []
    return out


def write_tiny_model(directory: Path, context: int = 256) -> Path:
    """A local Hugging Face model directory as far as `resolve_model_ref` looks (config.json) with a
    whitespace tokenizer.json, so token counts are exact and easy to reason about (1 word = 1 token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "max_position_embeddings": context, "architectures": ["LlamaForCausalLM"]}
        )
    )
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def add_calibrated(
    tmp_path: Path, name: str, plan: Any, *, density: float | None, metrics: dict[str, Any], key: str
) -> tuple[int, int]:
    """`name` added (the example spec on a config-only model), and a calibration of it recorded as the
    calibrate flow writes one: its plan's `ModelVersion` and a succeeded `CalibrationRun` under `key`
    with `metrics`. Returns (use case id, model version id)."""
    from rollout.db.models import CalibrationRun, ModelVersion
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from rollout.usecases import add_usecase

    spec = {**example_spec(), "name": name, "model": str(write_tiny_model(tmp_path / "model", context=2048))}
    add_usecase(write_spec(tmp_path / name, spec), actor="test-owner")
    with session_scope() as s:
        uc = get_use_case(s, name)
        mv = ModelVersion(
            use_case_id=uc.id,
            base_model_ref=spec["model"],
            plan=plan.to_dict(),
            plan_hash=plan.content_hash(),
            density=density,
        )
        s.add(mv)
        s.flush()
        s.add(
            CalibrationRun(
                idempotency_key=key,
                use_case_id=uc.id,
                spec_version=1,
                status="succeeded",
                model_version_id=mv.id,
                metrics=metrics,
            )
        )
        return uc.id, mv.id
