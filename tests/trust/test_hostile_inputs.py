"""The hostile-input suite (issue 15): bad specs, datasets, observation files, accounts and CLI arguments,
through the real command line (typer's runner, in process), on SQLite and PostgreSQL. Every case must
exit 2, name the place (file, row or field) in its message, show no traceback, and leave the state
database byte-identical (every row of every table, before and after).

The cases run in one test per database (setting up a use case with a challenger once) and every
failing case is reported by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from tests.fixtures.flows import tiny_spec
from tests.fixtures.trust import password_of

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=False)
)


@dataclass
class Case:
    id: str
    args: Callable[[Path, dict[str, Any]], list[str]]  # (tmp dir, context) -> argv after `sparsepilot`
    place: str | Callable[[Path], str]  # what the message must name
    user: str | None = "olga"  # signs in with --password-stdin (None: no credentials given)
    password: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    audit: str = ""  # the one audit row this case may write (a failed sign-in is counted), else nothing


def _spec(tmp: Path, ctx: dict[str, Any], fname: str, text: str | None = None, /, **changes: Any) -> str:
    """A spec file: the tiny sample with `changes` (dotted keys) applied, or the given raw text."""
    path = tmp / f"{fname}.yaml"
    if text is None:
        spec = tiny_spec(ctx["model_dir"], "hostile-spec")
        for dotted, value in changes.items():
            node = spec
            *parents, last = dotted.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        text = yaml.safe_dump(spec, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _add(
    fname: str, text: str | None = None, /, **changes: Any
) -> Callable[[Path, dict[str, Any]], list[str]]:
    return lambda tmp, ctx: ["usecase", "add", _spec(tmp, ctx, fname, text, **changes)]


def _raw(name: str, data: bytes) -> Callable[[Path, dict[str, Any]], list[str]]:
    def make(tmp: Path, ctx: dict[str, Any]) -> list[str]:
        p = tmp / f"{name}.yaml"
        p.write_bytes(data)
        return ["usecase", "add", str(p)]

    return make


def _with_dataset(name: str, lines: list[str] | bytes) -> Callable[[Path, dict[str, Any]], list[str]]:
    def make(tmp: Path, ctx: dict[str, Any]) -> list[str]:
        ds = tmp / f"{name}.jsonl"
        if isinstance(lines, bytes):
            ds.write_bytes(lines)
        else:
            ds.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return ["usecase", "add", _spec(tmp, ctx, name, **{"dataset.path": str(ds)})]

    return make


def _with_model(name: str, config: str | None) -> Callable[[Path, dict[str, Any]], list[str]]:
    def make(tmp: Path, ctx: dict[str, Any]) -> list[str]:
        d = tmp / f"{name}-model"
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config)
        return ["usecase", "add", _spec(tmp, ctx, name, model=str(d))]

    return make


def _obs(name: str, body: str | bytes, suffix: str = ".jsonl") -> Callable[[Path, dict[str, Any]], list[str]]:
    def make(tmp: Path, ctx: dict[str, Any]) -> list[str]:
        p = tmp / f"{name}{suffix}"
        p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
        return ["pilot", ctx["name"], "--observations", str(p)]

    return make


def _row(**over: Any) -> str:
    r = {"request_id": "ID0", "arm": "control", "quality": 0.5, "latency_ms": 100.0, "error": False}
    r.update(over)
    return json.dumps(r)


def _pair(rid: str = "ID0", **over: Any) -> str:
    return _row(request_id=rid, **over) + "\n" + _row(request_id=rid, arm="treatment", **over)


def _csv(*lines: str) -> str:
    return "\n".join(["request_id,arm,quality,latency_ms,error", *lines]) + "\n"


def _loop(tmp: Path, ctx: dict[str, Any]) -> list[str]:
    p = tmp / "loop.yaml"
    p.symlink_to(tmp / "loop.yaml")
    return ["usecase", "add", str(p)]


def _dataset_loop(tmp: Path, ctx: dict[str, Any]) -> list[str]:
    ds = tmp / "ds-loop.jsonl"
    ds.symlink_to(tmp / "ds-loop.jsonl")
    return ["usecase", "add", _spec(tmp, ctx, "dsloop", **{"dataset.path": str(ds)})]


def _big(tmp: Path, ctx: dict[str, Any]) -> list[str]:
    p = tmp / "big.yaml"
    p.write_text("description: " + "x" * 300_000 + "\n")
    return ["usecase", "add", str(p)]


def _dir(tmp: Path, ctx: dict[str, Any]) -> list[str]:
    (tmp / "adir.yaml").mkdir()
    return ["usecase", "add", str(tmp / "adir.yaml")]


def _approve(decision: str, reason: str = "ok") -> Callable[[Path, dict[str, Any]], list[str]]:
    return lambda tmp, ctx: ["approve", ctx["name"], "--decision", decision, "--reason", reason]


HUGE_HASH = "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "B" * 43
VALID_LINE = '{"id": "q1", "prompt": "What is up?", "reference": "fine"}'
DEEP_JSON = "[" * 200_000 + "]" * 200_000
BIG_INT = "1" * 5000

SPEC_CASES = [
    Case("yaml-anchor-bomb", _add("bomb", BOMB), "expands to more than"),
    Case("yaml-20k-deep-list", _add("deep", "a: " + "[" * 20_000 + "]" * 20_000 + "\n"), "nested deeper"),
    Case("yaml-deep-mapping", _add("deepmap", "a: " + "{b: " * 60 + "1" + "}" * 60 + "\n"), "nested deeper"),
    Case("yaml-unhashable-key", _add("unhash", "? [1, 2]\n: x\n"), "a key must be a plain value"),
    Case("yaml-5000-digit-int", _add("bigint", f"seed: {BIG_INT}\n"), "bigint.yaml"),
    Case("yaml-duplicate-key", _add("dup", "name: a\nname: b\n"), "appears twice"),
    Case("yaml-syntax-error", _add("syntax", "name: [unclosed\n"), "line 2, column 1"),
    Case("yaml-not-a-mapping", _add("list", "- 1\n- 2\n"), "must be a YAML mapping"),
    Case("yaml-empty-file", _add("empty", ""), "the spec file is empty"),
    Case("yaml-invalid-utf8", _raw("utf8", b"name: \xff\xfe\n"), "not valid UTF-8 at byte"),
    Case("yaml-over-size-limit", _big, "at most 262144"),
    Case("spec-symlink-loop", _loop, "loop.yaml"),
    Case(
        "spec-credential-in-arm-url",
        _add("urlkey", **{"pilot": {"arms": {"treatment": {"kind": "mlflow", "url": "http://u:pw@h:5001"}}}}),
        "pilot.arms.treatment.url: holds user info",
    ),
    Case(
        "spec-key-in-arm-query",
        _add(
            "urlquery",
            **{
                "pilot": {
                    "arms": {"treatment": {"kind": "openai", "url": "http://h/v1?api_key=s", "model": "m"}}
                }
            },
        ),
        "the query parameter 'api_key', which looks like a credential",
    ),
    Case("spec-is-a-directory", _dir, "adir.yaml"),
    Case(
        "spec-missing-file",
        lambda tmp, ctx: ["usecase", "add", str(tmp / "nope.yaml")],
        "nope.yaml: file not found",
    ),
    Case("name-trailing-newline", _add("nl", name="abc-def\n"), "name: 'abc-def\\n' is not a slug"),
    Case("name-uppercase", _add("upper", name="Hostile"), "is not a slug"),
    Case("name-rich-markup", _add("markup", name="[bold]x[/]"), "'[bold]x[/]' is not a slug"),
    Case("owner-blank", _add("blank", owner="   "), "owner: must not be blank"),
    Case("owner-zero-width", _add("zw", owner="\u200b\u200b"), "owner: must not be blank"),
    Case(
        "seed-30-digits",
        _add("seed", **{"quality_budget.calibration.seed": 10**30}),
        "quality_budget.calibration.seed",
    ),
    Case(
        "requests-per-day-1e308",
        _add("rpd", **{"traffic.requests_per_day": 1e308}),
        "traffic.requests_per_day",
    ),
    Case(
        "requests-per-day-inf",
        _add("inf", **{"traffic.requests_per_day": float("inf")}),
        "traffic.requests_per_day",
    ),
    Case(
        "margin-negative",
        _add("margin", **{"gate.non_inferiority_margin": -0.1}),
        "gate.non_inferiority_margin",
    ),
    Case("alpha-too-large", _add("alpha", **{"gate.alpha": 0.7}), "gate.alpha"),
    Case("unknown-field-typo", _add("typo", ownr="x"), "ownr: unknown field"),
    Case("unknown-field-markup", _add("fieldmarkup", **{"[red]x[/]": 1}), "[red]x[/]: unknown field"),
    Case(
        "quantile-key-invalid",
        _add("q", **{"traffic.prompt_tokens": {"p100": 10}}),
        "traffic.prompt_tokens.p100",
    ),
    Case(
        "bucket-shares-not-1",
        _add("b", **{"traffic.prompt_tokens": [{"tokens": 10, "share": 0.5}]}),
        "sum to 1",
    ),
    Case(
        "ramp-not-increasing",
        _add(
            "ramp",
            **{
                "rollout.steps": [
                    {"traffic_pct": 50, "min_samples": 8},
                    {"traffic_pct": 10, "min_samples": 8},
                ]
            },
        ),
        "rollout.steps[1].traffic_pct",
    ),  # fmt: skip
    Case("cron-invalid", _add("cron", schedule={"cron": "61 * * * *"}), "schedule.cron"),
    Case(
        "timezone-unknown",
        _add("tz", schedule={"cron": "0 * * * *", "timezone": "Mars/Base"}),
        "schedule.timezone",
    ),
    Case("quality-bool-in-spec", _add("bool", **{"gate.alpha": True}), "gate.alpha"),
    Case("model-unknown-ref", _add("model", model="no-such-model"), "model: unknown model ref"),
    Case(
        "model-config-bad-value", _with_model("cfgval", '{"max_position_embeddings": "abc"}'), "config.json"
    ),
    Case("model-config-not-object", _with_model("cfglist", "[1, 2]"), "config.json"),
    Case("model-config-not-json", _with_model("cfgjson", "{nope"), "config.json"),
    Case(
        "model-config-huge-int",
        _with_model("cfgint", '{"max_position_embeddings": ' + BIG_INT + "}"),
        "config.json",
    ),
    Case("model-dir-no-config", _with_model("nocfg", None), "has no config.json"),
]
DATASET_CASES = [
    Case("dataset-missing", _add("dsmissing", **{"dataset.path": "/nonexistent/ds.jsonl"}), "ds.jsonl"),
    Case("dataset-symlink-loop", _dataset_loop, "ds-loop.jsonl"),
    Case("dataset-bad-json", _with_dataset("dsjson", [VALID_LINE, "{nope"]), "row 2"),
    Case("dataset-200k-deep-json", _with_dataset("dsdeep", [VALID_LINE, DEEP_JSON]), "row 2"),
    Case(
        "dataset-5000-digit-id",
        _with_dataset("dsbig", [VALID_LINE, '{"id": ' + BIG_INT + ', "prompt": "x"}']),
        "row 2",
    ),
    Case(
        "dataset-zero-width-prompt",
        _with_dataset("dszw", [VALID_LINE, '{"id": "q2", "prompt": "\\u200b", "reference": "r"}']),
        "prompt: is empty",
    ),  # fmt: skip
    Case("dataset-duplicate-id", _with_dataset("dsdup", [VALID_LINE, VALID_LINE]), "duplicate id 'q1'"),
    Case(
        "dataset-invalid-utf8", _with_dataset("dsutf", VALID_LINE.encode() + b'\n{"id": "\xff"}\n'), "row 2"
    ),
    Case("dataset-empty", _with_dataset("dsempty", []), "has no rows"),
    Case(
        "dataset-tags-wrong-type",
        _with_dataset("dstags", [VALID_LINE, '{"id": "q2", "prompt": "p", "reference": "r", "tags": 5}']),
        "tags",
    ),  # fmt: skip
    Case("dataset-not-object", _with_dataset("dsarr", [VALID_LINE, "[1, 2]"]), "row 2"),
]
OBS_CASES = [
    Case("obs-quality-true", _obs("qtrue", _pair(quality=True)), "qtrue.jsonl:1: field 'quality'"),
    Case("obs-number-underscore", _obs("under", _pair(quality="1_0e-1")), "under.jsonl:1: field 'quality'"),
    Case("obs-hex-number", _obs("hex", _pair(latency_ms="0x10")), "hex.jsonl:1: field 'latency_ms'"),
    Case(
        "obs-csv-field-over-128k",
        _obs("wide", _csv("ID0,control," + "9" * 140_000 + ",1,false"), ".csv"),
        "wide.csv:2",
    ),
    Case("obs-200k-deep-json", _obs("deep", DEEP_JSON), "deep.jsonl:1"),
    Case(
        "obs-5000-digit-int",
        _obs("bigint", _row(latency_ms=int(BIG_INT[:10])).replace(BIG_INT[:10], BIG_INT)),
        "bigint.jsonl:1",
    ),
    Case("obs-not-object", _obs("arr", "[1, 2]"), "arr.jsonl:1: must be a JSON object"),
    Case(
        "obs-missing-field",
        _obs("miss", '{"request_id": "ID0", "arm": "control"}'),
        "miss.jsonl:1: missing field",
    ),
    Case("obs-unknown-field", _obs("unk", _row(extra=1)), "unk.jsonl:1: unknown field(s) extra"),
    Case(
        "obs-request-id-too-long",
        _obs("longid", _row(request_id="r" * 300)),
        "longid.jsonl:1: field 'request_id'",
    ),
    Case("obs-nan-latency", _obs("nan", _pair(latency_ms=float("nan"))), "latency_ms"),
    Case("obs-unknown-request", _obs("unknownreq", _pair(rid="not-in-dataset")), "request_id: not a request"),
    Case("obs-bad-arm", _obs("arm", _row(arm="both")), "arm"),
    Case("obs-empty-file", _obs("empty", ""), "empty.jsonl: no observations"),
    Case("obs-unknown-extension", _obs("data", "x", ".xlsx"), "data.xlsx: unknown format"),
    Case(
        "obs-csv-missing-column",
        _obs("nocol", "request_id,arm\nID0,control\n", ".csv"),
        "missing column(s) quality",
    ),
    Case(
        "obs-csv-extra-values",
        _obs("extra", _csv("ID0,control,0.5,100,false,surplus"), ".csv"),
        "extra.csv:2",
    ),
    Case("obs-invalid-utf8", _obs("utf", b'{"request_id": "\xff"}\n'), "utf.jsonl: not valid UTF-8"),
    Case("obs-error-not-bool", _obs("err", _pair(error="maybe")), "err.jsonl:1: field 'error'"),
    Case("obs-tokens-fraction", _obs("tok", _pair(tokens=1.5)), "tok.jsonl:1: field 'tokens'"),
    Case("obs-shadow-one-arm", _obs("onearm", _row()), "arm"),
    Case("obs-markup-in-id", _obs("markup", _pair(rid="[bold]x[/]")), "[bold]x[/]"),
]
ACCOUNT_CASES = [
    Case(
        "accounts-two-fields",
        _approve("1"),
        "SPARSEPILOT_ACCOUNTS entry 1",
        user="alice",
        env={"SPARSEPILOT_ACCOUNTS": "alice:approver"},
    ),  # fmt: skip
    Case(
        "accounts-unknown-role",
        _approve("1"),
        "role 'admin'",
        user="alice",
        env={"SPARSEPILOT_ACCOUNTS": f"alice:admin:{HUGE_HASH}"},
    ),  # fmt: skip
    Case(
        "accounts-scrypt-2e30",
        _approve("1"),
        "MiB of scrypt memory",
        user="alice",
        env={"SPARSEPILOT_ACCOUNTS": f"alice:approver:{HUGE_HASH}"},
    ),  # fmt: skip
    Case(
        "accounts-file-bad-toml",
        _approve("1"),
        "bad.toml: not valid TOML",
        user="alice",
        env={"SPARSEPILOT_ACCOUNTS_FILE": "@tmp/bad.toml", "SPARSEPILOT_ACCOUNTS": ""},
    ),  # fmt: skip
    Case(
        "wrong-password",
        _approve("1"),
        "wrong account name or password",
        user="alice",
        password="nope",
        audit="auth.sign_in_failed",
    ),
    Case("viewer-adds-spec", _add("viewer"), "needs the operator role; 'victor' is a viewer", user="victor"),
    Case("operator-approves", _approve("1"), "needs the approver role; 'olga' is an operator", user="olga"),
    Case("viewer-imports", _obs("viewerimp", _pair()), "needs the operator role", user="victor"),
    Case("no-credentials", _approve("1"), "nobody is signed in", user=None),
    Case(
        "user-named-but-no-password",
        _approve("1"),
        "nobody is signed in",
        user=None,
        env={"SPARSEPILOT_USER": "alice"},
    ),
    Case(
        "unknown-user",
        _approve("1"),
        "wrong account name or password",
        user="mallory",
        password="x",
        audit="auth.sign_in_failed",
    ),
]
ARG_CASES = [
    Case("decision-2-pow-70", _approve(str(2**70)), "--decision", user="alice"),
    Case("decision-zero", _approve("0"), "--decision", user="alice"),
    Case("decision-not-a-number", _approve("abc"), "--decision", user="alice"),
    Case("decision-that-does-not-exist", _approve("999999"), "decision 999999 does not exist", user="alice"),
    Case("approve-blank-reason", _approve("@decision", "   "), "a reason is required", user="alice"),
    Case(
        "approve-invisible-reason",
        _approve("@decision", "\u200b\u200b"),
        "a reason is required",
        user="alice",
    ),
    Case(
        "approve-blank-letter-reason",
        _approve("@decision", "\u3164\u2800\u034f"),
        "a reason is required",
        user="alice",
    ),
    Case(
        "show-version-zero",
        lambda tmp, ctx: ["usecase", "show", ctx["name"], "--version", "0"],
        "--version",
        user=None,
    ),
    Case(
        "show-unknown-markup-name",
        lambda tmp, ctx: ["usecase", "show", "[bold]x[/]"],
        "'[bold]x[/]'",
        user=None,
    ),
    Case("pilot-batches-zero", lambda tmp, ctx: ["pilot", ctx["name"], "--batches", "0"], "--batches"),
    Case(
        "pilot-abort-no-reason",
        lambda tmp, ctx: ["pilot", ctx["name"], "--abort"],
        "--abort needs a --reason",
    ),
    Case(
        "pilot-unknown-use-case",
        lambda tmp, ctx: ["pilot", "no-such-case", "--batches", "1"],
        "unknown use case 'no-such-case'",
    ),
]
ALL_CASES = SPEC_CASES + DATASET_CASES + OBS_CASES + ACCOUNT_CASES + ARG_CASES


def test_the_suite_has_at_least_60_distinct_cases() -> None:
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60, len(ids)


def _dump(url: str) -> dict[str, list[tuple[str, ...]]]:
    from rollout.db.models import Base
    from rollout.db.session import get_engine

    with get_engine(url).connect() as conn:
        return {
            t.name: [
                tuple(repr(v) for v in row)
                for row in conn.execute(select(t).order_by(*t.primary_key.columns))
            ]
            for t in Base.metadata.sorted_tables
        }


def _use_case_with_challenger(flow_use_case) -> tuple[str, int]:  # noqa: ANN001
    """A use case with a calibrated challenger, its pilot running at the shadow step and an open
    decision (what imports and approvals act on)."""
    from rollout.db.models import CalibrationRun, Pilot
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        s.add(CalibrationRun(idempotency_key="hostile", use_case_id=pilot.use_case_id, spec_version=1,
                             status="succeeded", model_version_id=pilot.model_version_id))  # fmt: skip
    return name, did


@pytest.mark.slow
def test_hostile_inputs_exit_2_name_the_place_and_change_nothing(
    trust_db: str, flow_use_case, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparsepilot.cli import app

    name, did = _use_case_with_challenger(flow_use_case)
    ctx = {"model_dir": tiny_model_dir, "name": name}
    (tmp_path / "bad.toml").write_text("[accounts.alice\nrole = ")
    runner = CliRunner()
    failures: list[str] = []
    before = _dump(trust_db)  # each case's state after is the next one's before: one dump a case
    for case in ALL_CASES:
        work = tmp_path / case.id
        work.mkdir()
        argv = [a.replace("@decision", str(did)) for a in case.args(work, ctx)]
        env = {k: v.replace("@tmp", str(tmp_path)) for k, v in case.env.items()}
        stdin = None
        if case.user is not None:
            env["SPARSEPILOT_USER"] = case.user
            argv.append("--password-stdin")
            stdin = (case.password if case.password is not None else password_of(case.user)) + "\n"
        result = runner.invoke(app, argv, input=stdin, env=env)
        out = result.output
        place = case.place if isinstance(case.place, str) else case.place(work)
        problems = []
        if result.exit_code != 2:
            problems.append(f"exit {result.exit_code}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"crashed: {type(result.exception).__name__}: {str(result.exception)[:200]}")
        if "Traceback" in out:
            problems.append("traceback in the output")
        if place not in out:
            problems.append(f"message does not name {place!r}")
        after = now = _dump(trust_db)
        if case.audit:  # exactly one new audit row of that action, and it holds no password
            added = after["audit_log"][len(before["audit_log"]) :]
            after = {**after, "audit_log": after["audit_log"][: len(before["audit_log"])]}
            details = [v for row in added for v in row if v.startswith("{")]
            if (
                len(added) != 1
                or repr(case.audit) not in added[0]
                or any(repr(case.password) in d or repr(password_of(case.user or "")) in d for d in details)
            ):
                problems.append(f"expected one {case.audit} audit row without the password: {added}")
        if after != before:
            problems.append("the state DB changed")
        before = now
        if problems:
            failures.append(f"{case.id}: {'; '.join(problems)}\n    output: {out.strip()[:400]!r}")
    assert not failures, f"{len(failures)} of {len(ALL_CASES)} hostile cases failed:\n" + "\n".join(failures)
