"""use-case add/list/show on SQLite and PostgreSQL, through the CLI: every bad input from the issue
exits non-zero, names the file/row/field, and leaves the DB exactly as it was."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rollout.db import migrate
from rollout.db.session import get_engine
from rollout.usecases import dataset_rows, list_usecases, load_spec_version, show_usecase
from sparsepilot.cli import app
from tests.fixtures.trust import password_of

from .usecase_helpers import copy_example, example_spec, snapshot, write_spec, write_tiny_model

runner = CliRunner()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, sp_home, trust_accounts: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001
    if request.param == "postgres":
        url = request.getfixturevalue("pg_migrated_url")
        monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", url)
    else:
        url = sp_home.database_url
    # `usecase add` needs a signed-in operator: olga, with her password on stdin (see cli())
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", trust_accounts)
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    yield url
    get_engine(url).dispose()


def cli(*args: str):  # noqa: ANN201
    if args[:2] == ("usecase", "add"):
        return runner.invoke(app, [*args, "--password-stdin"], input=password_of("olga") + "\n")
    return runner.invoke(app, list(args))


def add_ok(path: Path, *extra: str) -> dict:
    res = cli("usecase", "add", str(path), "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_portfolio_add_list_show(state_url: str, sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    names = ["longdoc-summaries", "docs-qa", "support-chat"]
    for name in names:
        out = add_ok(copy_example(tmp_path / name, name))
        assert (out["name"], out["status"], out["version"]) == (name, "created", 1)
    listed = json.loads(cli("usecase", "list", "--json").stdout)
    assert [r["name"] for r in listed] == sorted(names)
    assert {r["name"]: r["requests"] for r in listed} == {
        "docs-qa": 72,
        "longdoc-summaries": 65,
        "support-chat": 72,
    }
    shown = json.loads(cli("usecase", "show", "docs-qa", "--json").stdout)
    assert shown["spec"]["dataset"]["task"] == "loglik"
    assert [a["action"] for a in shown["audit"]] == ["usecase.add"]
    assert shown["validation"]["ok"] is True
    # the stored dataset is an immutable copy: the flows read it even if the source changes later
    loaded = load_spec_version("docs-qa")
    assert loaded.dataset_path.parent == sp_home.home / "datasets"
    rows = dataset_rows(loaded)
    assert len(rows) == 72 and rows[0].reference


def test_add_warns_when_a_guardrail_cannot_catch_a_breach_in_the_planned_rows(
    state_url: str, tmp_path: Path
) -> None:
    """support-chat: error ceiling 0.01 and latency exceedance 0.05, steps of at most 24 treatment rows.
    The spec is valid (registered), and `usecase add` says what its ceilings can detect."""
    res = cli("usecase", "add", str(copy_example(tmp_path / "w", "support-chat")))
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert (
        "warning: gate.guardrails.max_error_rate: 0.01 — a breach at 2.5x (2.5%) is stopped with 95% power "
        "only after ~1,083 treatment rows (no test can before ~793); this pilot's steps plan at most 24 "
        "(rollout.steps[1].min_samples)"
    ) in out
    assert "warning: gate.guardrails.max_latency_exceedance: 0.05 — a breach at 2.5x (12.5%)" in out
    assert json.loads(cli("usecase", "show", "support-chat", "--json").stdout)["validation"]["warnings"]


def test_add_and_show_say_what_a_decision_takes(state_url: str, tmp_path: Path) -> None:
    """longdoc-summaries: 16 distinct requests kept apart from calibration (of 65 rows) and looks of one
    batch of 8 cannot reach any step's GO; `usecase add` warns before the first request, `usecase show`
    has the plan per step."""
    res = cli("usecase", "add", str(copy_example(tmp_path / "w", "longdoc-summaries")))
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    shown = json.loads(cli("usecase", "show", "longdoc-summaries", "--json").stdout)
    plan = shown["pilot_plan"]
    assert [s["label"] for s in plan["steps"]] == ["shadow", "split 10%", "split 50%"]
    assert (
        plan["distinct_requests"] == 16 and plan["dataset_rows"] == 65 and plan["requests_to_approval"] > 65
    )
    assert (
        "warning: dataset.path: 16 distinct requests kept apart from calibration, but the pilot needs "
        f"~{plan['requests_to_approval']:,}" in out
    )
    assert "warning: gate.max_looks: 10 looks per step at one batch of 8 per look reach 80 requests" in out
    assert shown["validation"]["warnings"][-2:] == plan["warnings"]
    text = " ".join(cli("usecase", "show", "longdoc-summaries").stdout.split())
    assert (
        "What a decision takes" in text
        and f"split 10% (rollout.steps[0]) │ {plan['steps'][1]['requests']:,}" in text
    )
    # no pilot yet: the plan is for the use case's first, its GO at 0.61 alpha (rollout.gate.spending)
    assert (plan["pilot_number"], round(plan["go_alpha"], 4)) == (1, 0.0304)
    assert "pilot 1, its GO held to alpha 0.0304" in text
    assert shown["pilots"] == [] and shown["alpha_budget"]["spent"] == 0.0
    assert "No pilot yet; the first pilot's GO will be held to 0.0304." in text
    # after promotion: how fast the monitor reacts, per check (rollout.pilot_plan.plan_monitor)
    assert [m["check"] for m in plan["monitor"]] == [
        "treatment_error_rate",
        "treatment_latency_over_slo",
        "quality_loss",
    ]
    assert "After promotion, the monitor (one batch of 8 per look (at the schedule '0 2 * * *', ~1" in text
    assert "treatment_error_rate: a rate of 0.05 (limit 0.02) raises an alarm in half the simulated" in text
    assert "(184 rows; ~23.0 days at its schedule), 90% by 56 (448 rows; ~56.0 days)" in text
    assert shown["monitor"] is None  # nothing promoted: no line on when the monitor last looked


def test_a_dataset_that_repeats_prompts_plans_on_its_distinct_ones(state_url: str, tmp_path: Path) -> None:
    """Rows repeating a prompt (under new ids) are a warning naming the lines, and the plan counts the
    kept-apart requests each prompt once, as the pilot will draw them (rollout.dataset_split)."""
    from rollout.dataset_split import split_rows

    spec = copy_example(tmp_path / "w", "longdoc-summaries")
    data = spec.parent / example_spec("longdoc-summaries")["dataset"]["path"]
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows += [{**r, "id": f"again-{i}"} for i, r in enumerate(rows[:40])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    distinct = len(split_rows(rows)[1])
    assert distinct < round(0.25 * len(rows))  # some repeats landed among the kept-apart rows
    res = cli("usecase", "add", str(spec))
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "prompt: 40 row(s) repeat an earlier row's prompt (line 66 repeats line 1," in out
    assert f"warning: dataset.path: {distinct} distinct requests kept apart from calibration" in out
    shown = json.loads(cli("usecase", "show", "longdoc-summaries", "--json").stdout)
    assert shown["pilot_plan"]["distinct_requests"] == distinct and shown["pilot_plan"]["dataset_rows"] == 105


def test_versioning(state_url: str, sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    spec = example_spec()
    path = write_spec(tmp_path / "v", spec)
    assert add_ok(path)["status"] == "created"
    before = snapshot(state_url, sp_home.home)

    # identical content (even reformatted) is a no-op that writes nothing
    path.write_text("# same spec, other formatting\n" + json.dumps(spec))
    assert add_ok(path)["status"] == "unchanged"
    assert snapshot(state_url, sp_home.home) == before

    # changed content without --new-version: refused, nothing written
    spec2 = {**spec, "traffic": {**spec["traffic"], "requests_per_day": 300000}}
    path2 = write_spec(tmp_path / "v", spec2, filename="usecase-v2.yaml")
    res = cli("usecase", "add", str(path2))
    assert res.exit_code == 2
    assert "usecase-v2.yaml: name: use case 'support-chat' already exists" in res.stderr
    assert "traffic.requests_per_day" in res.stderr and "--new-version" in res.stderr
    assert snapshot(state_url, sp_home.home) == before

    out = add_ok(path2, "--new-version")
    assert (out["status"], out["version"], out["changed_fields"]) == (
        "new_version",
        2,
        ["traffic.requests_per_day"],
    )
    # a changed dataset is a changed use case too
    rows = [json.loads(x) for x in (tmp_path / "v" / "support_chat.jsonl").read_text().splitlines()][:10]
    path3 = write_spec(tmp_path / "v3", spec2, rows=rows)
    out3 = add_ok(path3, "--new-version")
    assert (out3["version"], out3["changed_fields"]) == (3, ["dataset (file content)"])
    # back to version 1's content: version 1 becomes current again, no duplicate version
    path.write_text(json.dumps(spec))
    out4 = add_ok(path, "--new-version")
    assert (out4["status"], out4["version"]) == ("reverted", 1)

    info = show_usecase("support-chat")
    assert [v["version"] for v in info["versions"]] == [1, 2, 3]
    assert info["current_version"] == 1
    assert [a["action"] for a in reversed(info["audit"])] == [
        "usecase.add",
        "usecase.new_version",
        "usecase.new_version",
        "usecase.revert_version",
    ]
    # old versions stay readable
    old = show_usecase("support-chat", version=2)
    assert old["spec"]["traffic"]["requests_per_day"] == 300000
    assert load_spec_version("support-chat", 3).spec.traffic.requests_per_day == 300000
    assert len(dataset_rows(load_spec_version("support-chat", 3))) == 10
    assert [r["version"] for r in list_usecases()] == [1]


def _rows(n: int = 6) -> list[dict]:
    # 130 words (tokens of the tiny model's tokenizer) each: calibration needs a 128-token window from
    # its calibration part and from its held-out part (one prompt each, with this few rows)
    detail = " please" * 126
    return [
        {"id": f"r{i}", "prompt": f"Customer question number {i}?{detail}", "reference": "abs"}
        for i in range(n)
    ]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (spec path, fragments the error message must contain)."""
    base = example_spec()
    cases: dict[str, tuple[Path, list[str]]] = {}

    def spec_with(fn) -> dict:  # noqa: ANN001
        d = json.loads(json.dumps(base))
        fn(d)
        return d

    d = tmp / "missing-field"
    cases["missing field"] = (
        write_spec(d, spec_with(lambda s: s.pop("owner"))),
        ["usecase.yaml: owner: required field is missing"],
    )
    d = tmp / "mistyped-field"
    cases["mistyped field"] = (
        write_spec(d, spec_with(lambda s: s.update(onwer=s.pop("owner")))),
        ["usecase.yaml: onwer: unknown field (did you mean 'owner'?)"],
    )
    d = tmp / "negative-traffic"
    cases["negative traffic"] = (
        write_spec(d, spec_with(lambda s: s["traffic"].update(requests_per_day=-1))),
        ["usecase.yaml: traffic.requests_per_day: input should be greater than 0"],
    )
    d = tmp / "steps"
    cases["steps not increasing"] = (
        write_spec(d, spec_with(lambda s: s["rollout"]["steps"][1].update(traffic_pct=10))),
        ["usecase.yaml: rollout.steps[1].traffic_pct: must be greater than step 0 (10)"],
    )
    d = tmp / "model"
    cases["unknown model ref"] = (
        write_spec(d, spec_with(lambda s: s.update(model="no-such-model-7b"))),
        ["usecase.yaml: model:", "no-such-model-7b"],
    )
    d = tmp / "dataset-path"
    p = write_spec(
        d, spec_with(lambda s: s["dataset"].update(path="nowhere/missing.jsonl")), with_dataset=False
    )
    cases["dataset path missing"] = (
        p,
        ["usecase.yaml: dataset.path: 'nowhere/missing.jsonl' does not exist"],
    )
    d = tmp / "dataset-dir"
    p = write_spec(d, spec_with(lambda s: s["dataset"].update(path="rows")), with_dataset=False)
    (d / "rows").mkdir()  # review X, X6: it was said not to exist
    cases["dataset path a directory"] = (p, ["usecase.yaml: dataset.path: 'rows' is a directory, not a file"])
    rows = _rows()
    rows[4]["id"] = "r1"
    cases["duplicate id"] = (
        write_spec(tmp / "dup", rows=rows),
        ["support_chat.jsonl: rows 2, 5: id: duplicate id 'r1'"],
    )
    rows = _rows()
    rows[2]["prompt"] = "   "
    cases["empty prompt"] = (
        write_spec(tmp / "empty", rows=rows),
        ["support_chat.jsonl: row 3 (id 'r2'): prompt: is empty"],
    )
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in _rows(3)) + b'{"id": "r3", "prompt": "caf\xe9"}\n'
    cases["invalid UTF-8"] = (
        write_spec(tmp / "utf8", raw_rows=raw),
        ["support_chat.jsonl: row 4: line: invalid UTF-8"],
    )
    cases["dataset gzip-compressed"] = (  # it was one "invalid UTF-8" line per row
        write_spec(tmp / "gz", raw_rows=gzip.compress(raw)),
        ["support_chat.jsonl: dataset: the file is compressed (gzip): decompress it first"],
    )
    rows = _rows()
    rows[1]["prompt"] = "word " * 9000  # 45k characters: over 8192 tokens even by the bound
    cases["prompt longer than context"] = (
        write_spec(tmp / "long", rows=rows),
        ["support_chat.jsonl: row 2 (id 'r1'): prompt: longer than the model's context"],
    )
    rows = _rows()
    rows[0].pop("reference")
    cases["reference missing"] = (
        write_spec(tmp / "ref", rows=rows),
        ["support_chat.jsonl: row 1 (id 'r0'): reference: missing, but the task (contains) needs references"],
    )
    # datasets calibration can never use (review W3): its calibrate failed after minutes, with a traceback
    cases["one row"] = (
        write_spec(tmp / "one-row", spec_with(lambda s: s.update(name="one-row")), rows=_rows(1)),
        ["support_chat.jsonl: dataset: calibration needs at least 2 distinct non-blank prompts (one is held"],
    )
    # review W5: one prompt under 40 ids calibrated "budget met" on held-out windows of its own calibration
    # text, and left nothing apart to evaluate on; a dataset that can never be calibrated honestly
    one_prompt = _rows(1)[0]["prompt"]
    cases["one prompt repeated"] = (
        write_spec(
            tmp / "one-prompt",
            spec_with(lambda s: s.update(name="one-prompt")),
            rows=[{"id": f"r{i}", "prompt": one_prompt, "reference": "abs"} for i in range(40)],
        ),
        ["support_chat.jsonl: dataset: calibration needs at least 2 distinct non-blank prompts", "it has 1"],
    )
    cases["prompts too short to calibrate on"] = (
        write_spec(
            tmp / "short",
            spec_with(lambda s: s.update(name="short-prompts")),
            rows=[{"id": f"r{i}", "prompt": f"hi {i}", "reference": "a"} for i in range(40)],
        ),
        ["support_chat.jsonl: dataset: prompts too short to calibrate on: calibration needs at least 128"],
    )
    cases["existing name"] = (
        write_spec(tmp / "exists", spec_with(lambda s: s.update(owner="someone-else@example.com"))),
        ["usecase.yaml: name: use case 'support-chat' already exists", "owner", "--new-version"],
    )
    cases["a split step at 100%"] = (  # planning it raised a plain ValueError: a traceback, exit 1
        write_spec(tmp / "pct100", spec_with(lambda s: s["rollout"]["steps"][-1].update(traffic_pct=100))),
        ["usecase.yaml: rollout.steps[1].traffic_pct: 100: a split step must be below 100"],
    )

    def log_source(path: str) -> Any:
        return lambda s: s["rollout"].update(traffic_source={"kind": "request-log", "path": path})

    cases["request log missing"] = (
        write_spec(tmp / "log-missing", spec_with(log_source("no_such_log.csv"))),
        ["usecase.yaml: rollout.traffic_source.path: ", "no_such_log.csv: request log not found"],
    )
    d = tmp / "log-dir"
    (d / "logs.jsonl").mkdir(parents=True)  # an export's folder of pages: it was "request log not found"
    cases["request log a directory"] = (
        write_spec(d, spec_with(log_source("logs.jsonl"))),
        ["logs.jsonl: is a directory, not a file (a request log is one .jsonl or .csv file)"],
    )
    d = tmp / "log-latin1"
    d.mkdir(parents=True)
    (d / "export.csv").write_bytes("id,prompt\nq1,Je voudrais un caf\xe9\nq2,hello\n".encode("latin-1"))
    cases["request log in Latin-1"] = (
        write_spec(d, spec_with(log_source("export.csv"))),
        [
            "usecase.yaml: rollout.traffic_source.path: 1 bad line(s) in the request log:",
            "export.csv:2: not valid UTF-8",
        ],
    )
    d = tmp / "log-rows"
    d.mkdir(parents=True)
    lines = [
        '{"id": "q1", "prompt": "ok"}',
        '{"id": "q2", "prompt": "\\u200b"}',
        '{"id": 1' + "0" * 5000 + "}",
    ]
    (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    cases["request log with bad rows"] = (
        write_spec(d, spec_with(log_source("log.jsonl"))),
        [
            "2 bad line(s)",
            "log.jsonl:2: field 'prompt': a non-empty string",
            "log.jsonl:3: JSON value cannot",
        ],
    )
    return cases


def test_a_request_log_is_read_once_at_add_and_counted(state_url: str, tmp_path: Path) -> None:
    spec = example_spec()
    spec["rollout"]["traffic_source"] = {"kind": "request-log", "path": "logs/requests.jsonl"}
    path = write_spec(tmp_path, spec)
    (tmp_path / "logs").mkdir()
    prompts = ["reset my password", "reset  my password", "where is my invoice?"]
    rows = [json.dumps({"id": f"q{i}", "prompt": p}) for i, p in enumerate(prompts)]
    (tmp_path / "logs" / "requests.jsonl").write_text("\n".join(rows) + "\n")
    stats = add_ok(path)["validation"]["stats"]
    assert (stats["request_log_requests"], stats["request_log_distinct_prompts"]) == (3, 2)


def test_a_dataset_changed_while_it_is_added_is_stored_as_validated(
    sp_home,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """`usecase add` read the dataset three times (to validate, to hash, to copy): another writer changing
    the file after the validation stored rows nobody validated, under a hash that matched them. The file
    is read once: the bytes validated are the bytes hashed and stored. The other writer is simulated by
    rewriting the file as soon as the validation returns."""
    from rollout import usecases

    path = write_spec(tmp_path / "w")
    dataset = tmp_path / "w" / "support_chat.jsonl"
    validated = dataset.read_bytes()
    validate = usecases.validate_dataset

    def then_another_writer(*args: Any, **kwargs: Any) -> Any:
        result = validate(*args, **kwargs)
        dataset.write_bytes(b'{"id": "x", "prompt": ""}\n')  # an empty prompt: it would fail validation
        return result

    monkeypatch.setattr(usecases, "validate_dataset", then_another_writer)
    added = usecases.add_usecase(path, actor="olga")
    loaded = load_spec_version(added.name)
    assert loaded.dataset_path.read_bytes() == validated
    assert loaded.dataset_sha256 == hashlib.sha256(validated).hexdigest()
    assert len(dataset_rows(loaded)) == 12


def test_a_stored_dataset_is_read_once_and_a_changed_one_refused(
    sp_home,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """`dataset_rows` hashed the stored copy and then read it again to parse it: a writer between the two
    reads handed the flows rows that no hash checked. The bytes are read once, hashed and parsed; a copy
    changed since `usecase add` is refused by name."""
    from rollout import usecases, validation

    loaded = load_spec_version(usecases.add_usecase(write_spec(tmp_path / "w"), actor="olga").name)
    stored = loaded.dataset_path.read_bytes()
    parse = validation.read_dataset

    def another_writer_first(path: Any, data: Any = None) -> Any:
        loaded.dataset_path.write_bytes(b'{"id": "x", "prompt": "p", "reference": "r"}\n')
        return parse(path, data)

    monkeypatch.setattr(validation, "read_dataset", another_writer_first)
    assert len(dataset_rows(loaded)) == 12  # the rows of the bytes hashed, not of the file rewritten
    monkeypatch.undo()
    with pytest.raises(usecases.UseCaseError, match="changed since it was validated"):
        dataset_rows(loaded)  # the copy now differs from its hash
    loaded.dataset_path.write_bytes(stored)
    assert len(dataset_rows(loaded)) == 12


def test_bad_inputs_are_rejected_and_write_nothing(state_url: str, sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    add_ok(write_spec(tmp_path / "good"))  # the DB is not empty: an accidental write would show
    before = snapshot(state_url, sp_home.home)
    for name, (path, fragments) in _bad_inputs(tmp_path / "bad").items():
        res = cli("usecase", "add", str(path))
        assert res.exit_code == 2, (name, res.output)
        for fragment in fragments:
            assert fragment in res.stderr, (name, fragment, res.stderr)
        assert snapshot(state_url, sp_home.home) == before, name


def test_prompt_length_uses_the_models_tokenizer(state_url: str, sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    model = write_tiny_model(tmp_path / "tiny-model", context=256)
    spec = example_spec()
    spec["model"] = str(model)
    spec["traffic"] = {"requests_per_day": 100, "prompt_tokens": {"p50": 100}, "output_tokens": {"p50": 16}}
    spec["quality_budget"]["calibration"]["max_seq_len"] = 256
    rows = _rows()
    rows[3]["prompt"] = "word " * 241  # 241 tokens > 256 - 16; the chars bound would say 402
    before = snapshot(state_url, sp_home.home)
    res = cli("usecase", "add", str(write_spec(tmp_path / "a", spec, rows=rows)))
    assert res.exit_code == 2
    assert (
        "row 4 (id 'r3'): prompt: longer than the model's context: up to 241 tokens, the limit is 240"
        in res.stderr
    )
    assert "counted by tokenizer" in res.stderr
    assert snapshot(state_url, sp_home.home) == before
    rows[3]["prompt"] = "word " * 240  # fits exactly (the chars bound would have refused it)
    out = add_ok(write_spec(tmp_path / "b", spec, rows=rows))
    assert out["validation"]["stats"]["prompt_tokens_max"] == 240


def test_traffic_must_fit_the_models_context(state_url: str, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny-model", context=256)
    spec = example_spec()
    spec["model"] = str(model)  # support-chat's traffic reaches 480 + 96 tokens
    res = cli("usecase", "add", str(write_spec(tmp_path / "a", spec)))
    assert res.exit_code == 2
    expected = (
        "traffic.prompt_tokens: the longest prompt (480) plus output (96) tokens exceed the model's context"
    )
    assert f"{expected} (256)" in res.stderr


def test_commands_refuse_an_uninitialised_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
    res = cli("usecase", "list")
    assert res.exit_code == 2 and "run `sparsepilot init` first" in res.stderr
    res = cli("init", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["revision"] == migrate.current_revision()
    assert cli("usecase", "list", "--json").stdout.strip() == "[]"
    res = cli("usecase", "show", "nope")
    assert res.exit_code == 2 and "unknown use case 'nope'" in res.stderr


def test_init_refuses_owner_and_app_urls_of_different_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init migrates the owner URL's database and grants on it; an app URL naming another database (or
    left unset beside a PostgreSQL owner URL) used to be reported "up to date" and left untouched."""
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEPILOT_OWNER_DATABASE_URL", f"sqlite:///{tmp_path / 'owner.db'}")
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    res = cli("init")
    assert res.exit_code == 2 and "name different databases" in res.stderr
    assert not (tmp_path / "owner.db").exists() and not (tmp_path / "app.db").exists()  # nothing made


def test_a_db_one_migration_behind_is_refused_by_name_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New code on a state DB one revision behind (a worker upgraded before `sparsepilot init` ran): the
    pipeline commands only checked that some revision existed, then failed with a raw "no such column"
    traceback; the dashboard opened its pages on it. Both now name the two revisions and the command."""
    from tests.dashboard.apptest_helpers import new_app

    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "behind"))
    monkeypatch.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
    head = migrate.head_revision()
    previous = f"{int(head) - 1:04d}"
    migrate.upgrade(revision=previous)
    for command in (["calibrate", "some-use-case"], ["evaluate", "some-use-case"], ["usecase", "list"]):
        res = cli(*command)
        assert res.exit_code == 2, (command, res.output)
        assert f"is at revision {previous}, head is {head}: run `sparsepilot init` first" in res.stderr
        assert "Traceback" not in res.output + res.stderr
    at = new_app()
    assert f"is at revision {previous}; this SparsePilot needs {head}" in at.error[0].value


@pytest.mark.postgres
def test_init_on_postgres(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", pg_url)
    res = cli("init", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["database_url"].startswith("postgresql+psycopg://") and out["revision_before"] is None
    assert cli("init", "--json").exit_code == 0  # idempotent
    get_engine(pg_url).dispose()


def test_a_bare_model_dir_name_is_resolved_beside_the_spec_never_in_the_cwd(
    state_url: str, sp_home: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model: tiny-model` naming a directory beside the spec was looked up in the working directory of
    `usecase add` and stored as it was, so calibrating from anywhere else failed (review O1)."""
    spec = example_spec()
    spec["model"] = "tiny-model"
    spec["traffic"] = {"requests_per_day": 100, "prompt_tokens": {"p50": 100}, "output_tokens": {"p50": 16}}
    spec["quality_budget"]["calibration"]["max_seq_len"] = 256
    beside = write_spec(tmp_path / "spec", spec, rows=_rows())
    write_tiny_model(beside.parent / "tiny-model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = add_ok(beside)
    stored = json.loads(cli("usecase", "show", out["name"], "--json").stdout)["spec"]["model"]
    assert stored == str((beside.parent / "tiny-model").resolve())
    # a directory of that name in the working directory only is not taken, and nothing is written
    spec["name"] = "cwd-model"
    lonely = write_spec(tmp_path / "lonely", spec, rows=_rows())
    write_tiny_model(elsewhere / "tiny-model")
    before = snapshot(state_url, sp_home.home)
    res = cli("usecase", "add", str(lonely))
    assert res.exit_code == 2, res.output
    assert f"model: unknown model ref {str(lonely.parent / 'tiny-model')!r}" in res.stderr
    assert snapshot(state_url, sp_home.home) == before
