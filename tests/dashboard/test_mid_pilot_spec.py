"""A spec version added while pilot 1 runs (a routine traffic update): the use-case page said "Pilot 1
has ended" of the running pilot and showed only a hypothetical pilot 2's requirements (review s46 D2).
Real `add_usecase` for both versions, a real `pilots.start_pilot` pinned to v1."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.dashboard.apptest_helpers import new_app, open_page


def _requests(at: Any) -> dict[str, int]:
    df = next(d.value for d in at.dataframe if any("requests to GO" in c for c in d.value.columns))
    col = next(c for c in df.columns if c.startswith("requests to GO"))
    return dict(zip(df["step"], df[col], strict=True))


def test_the_running_pilots_plan_is_shown_after_a_new_spec_version(dash_env, tmp_path: Path) -> None:  # noqa: ANN001
    from rollout import pilots, queries
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase
    from tests.rollout.usecase_helpers import example_spec, write_spec, write_tiny_model

    v1 = {**example_spec(), "name": "chat", "model": str(write_tiny_model(tmp_path / "model", context=2048))}
    v2 = copy.deepcopy(v1)
    v2["traffic"]["requests_per_day"] = 300_000  # a traffic update only
    add_usecase(write_spec(tmp_path / "v1", v1), actor="test-owner")
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "chat"))
        mv = ModelVersion(use_case_id=uc.id, base_model_ref=v1["model"], plan={}, plan_hash="p", density=0.5)
        s.add(mv)
        s.flush()
        spec, _ = pilots.load_current_spec(s, uc)
        pilot = pilots.start_pilot(s, uc, mv, spec, actor="test")
        s.flush()
        go_alpha = pilot.go_alpha
    at = new_app()
    at.query_params["name"] = "chat"
    open_page(at, "use_case")
    before = _requests(at)  # pilot 1's plan, under v1 at its GO level

    add_usecase(write_spec(tmp_path / "v2", v2), actor="test-owner", new_version=True)
    uc = queries.read(queries.use_case, "chat")
    assert uc["spec_version"] == 2 and uc["planned_pilot"][0] == 2  # the current version plans pilot 2
    assert uc["running_pilot"]["spec_version"] == 1 and uc["running_pilot"]["planned_pilot"] == (1, go_alpha)

    open_page(at, "use_case")
    captions = "\n".join(c.value for c in at.caption)
    assert "has ended" not in captions  # pilot 1 runs
    assert "Pilot 1 is running under spec v1" in captions and "applies to pilot 2" in captions
    assert f"alpha {go_alpha:.3g}" in captions or f"alpha {go_alpha:.3g};" in captions
    assert _requests(at) == before  # the running pilot's requirements, not a hypothetical pilot 2's
