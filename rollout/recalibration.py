"""What a calibration reads of a spec version, and when a challenger's calibration no longer stands for
the current version (pure). The calibrate flow reads the spec's `model`, its `quality_budget` (budget,
estimator, calibration settings, task bound, decode budget), `dataset.task` (the task bound's scoring)
and the dataset's rows (their content: the split kept apart from calibration is by row id). A new spec
version that changes any of them leaves the challenger calibrated for another version: it is not
piloted (`pilot NAME` refuses, the scheduled cycle calibrates again first: `rollout.runs.not_calibrated`),
a pilot of it still running is stopped once the calibration under the new version succeeds
(`rollout.runs.stop_uncalibrated_pilot`), and a GO of it is not approved
(`rollout.approvals.promotion_not_calibrated`). The calibration run's key names what a calibration reads
(`calibration_inputs`), so a version that changes nothing of it reuses the calibration before it.
Anything else (schedule, traffic, cost, the gate, the rollout's steps, the arms, the dataset's path to
the same content) changes how a pilot runs or is judged, never the plan."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DATASET_CONTENT = "dataset (file content)"  # a new version's dataset whose rows differ, by sha256
CALIBRATION_INPUTS = ("model", "quality_budget", "dataset.task", DATASET_CONTENT)
SCHEDULE = "schedule"


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths whose values differ between two spec dicts, sorted."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, path)
        elif a != b:
            out.append(path)
    return out


def spec_changes(
    old: dict[str, Any], old_sha: str | None, new: dict[str, Any], new_sha: str | None
) -> list[str]:
    """What changed from one spec version to another: its fields, and its dataset's content."""
    return changed_fields(old, new) + ([DATASET_CONTENT] if old_sha != new_sha else [])


def _under(field: str, roots: Iterable[str]) -> bool:
    return any(field == root or field.startswith(root + ".") for root in roots)


def calibration_changes(changed: Iterable[str]) -> list[str]:
    """The changed fields a calibration reads (`CALIBRATION_INPUTS`)."""
    return [f for f in changed if _under(f, CALIBRATION_INPUTS)]


def _without_none(value: Any) -> Any:
    """`value` with the None entries of its dicts left out: an absent field and a field holding None are
    one (`changed_fields` reads both as None)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def calibration_inputs(spec: dict[str, Any], dataset_sha: str | None) -> dict[str, Any]:
    """What a calibration reads of a stored spec version (`CALIBRATION_INPUTS`), by field, the dataset by
    its content's sha256: two versions that `calibration_changes` finds no change between give equal
    dicts. What the calibration run's idempotency key names (flows.calibrate), so a version that changes
    only what calibration does not read (a schedule, a cost) reuses the calibration of the one before."""
    out: dict[str, Any] = {DATASET_CONTENT: dataset_sha}
    for root in CALIBRATION_INPUTS:
        if root == DATASET_CONTENT:
            continue
        value: Any = spec
        for part in root.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[root] = _without_none(value)
    return out


@dataclass(frozen=True)
class NotCalibrated:
    """The challenger was calibrated under spec version `calibrated_under`, and the current `version`
    changed `fields` that calibration reads: its plan answers another budget (or model, or data)."""

    use_case: str
    version: int
    calibrated_under: int
    fields: tuple[str, ...]

    @property
    def why(self) -> str:
        return (
            f"the challenger was calibrated under spec v{self.calibrated_under}, and v{self.version} changed "
            f"{', '.join(self.fields)}"
        )

    @property
    def command(self) -> str:
        return f"sparsepilot calibrate {self.use_case}"

    def __str__(self) -> str:
        return f"spec v{self.version} is not calibrated: run `{self.command}` ({self.why})"


def new_version_notes(use_case: str, changed: Iterable[str], *, ended: bool = False) -> list[str]:
    """What a new spec version's changes mean, for the person who added it (`usecase add --new-version`):
    calibration inputs changed (no pilot of the current plan starts; the next scheduled cycle calibrates
    again, except in an ended phase, `ended`, where a person starts again), a schedule changed (what
    serves the schedules reads it when it starts)."""
    changed = list(changed)
    notes = []
    calibration = calibration_changes(changed)
    calibrate = f"`sparsepilot calibrate {use_case}`"
    if calibration and ended:
        notes.append(
            f"calibration fields changed ({', '.join(calibration)}): the current plan is not piloted under "
            f"this version; {calibrate} calibrates it"
        )
    elif calibration:
        notes.append(
            f"calibration fields changed ({', '.join(calibration)}): the current plan is not piloted under "
            f"this version; the next scheduled cycle calibrates again (then evaluates) before it pilots, or "
            f"run {calibrate}; a pilot of the current plan running now is stopped when that calibration "
            "succeeds, and a GO of it waiting for approval is not approved"
        )
    if any(_under(f, (SCHEDULE,)) for f in changed):
        notes.append(
            "schedule changed: restart `sparsepilot serve` (or re-run deploy-flows for a work pool); a "
            "running serve keeps the schedule it started with"
        )
    return notes
