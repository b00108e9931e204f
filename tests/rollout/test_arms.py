"""Pilot arms over real HTTP on loopback (rollout.arms): an OpenAI-compatible test server answering from the
tiny model (tests/fixtures/openai_server.py), servers that fail on purpose, the gate judging the result,
and the spec's `pilot.arms` validation. The MLflow scoring server arm is tested in
tests/flows/test_arms_served.py (real `mlflow models serve`)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from rollout.arms import ArmConfigError, build_arm, run_batch
from rollout.arms.inprocess import InProcessArm
from rollout.spec import ArmSpec, SpecError, parse_spec
from tests.fixtures.canned_server import Canned, canned_server
from tests.fixtures.flows import EXAMPLE, tiny_spec
from tests.fixtures.openai_server import openai_server

ROWS = [json.loads(line) for line in (EXAMPLE.parent / "support_chat.jsonl").read_text().splitlines() if line]
REQUESTS = [(r["id"], r) for r in ROWS]
KW = {"max_new_tokens": 4, "max_prompt_tokens": None}


def no_in_process() -> None:
    raise AssertionError("an endpoint arm must not load a model in-process")


def openai_arm(url: str, role: str = "treatment", **kw: object):  # noqa: ANN201
    return build_arm(ArmSpec(kind="openai", url=url, model="tiny-test", **kw), role, in_process=no_in_process)


@pytest.fixture(scope="module")
def ok_server(tiny_model_dir: Path) -> Iterator[str]:
    with openai_server("ok", model_dir=tiny_model_dir) as (url, _):
        yield url


@pytest.fixture(scope="module")
def dense_in_process(tiny_model_dir: Path) -> InProcessArm:
    from flows.common import model_arm
    from sparse_core import load_model

    model, tok = load_model(str(tiny_model_dir))
    return InProcessArm(model.eval(), tok, None, model_arm)


def test_openai_arm_scores_as_the_same_model_in_process(
    ok_server: str, dense_in_process: InProcessArm
) -> None:
    """Shadow step, in-process dense control vs the same weights behind /v1/completions: loglik from the
    server's echoed prompt log-probabilities equals the in-process score; without references the control's
    greedy answer is the reference and the served greedy answer matches it."""
    treatment = openai_arm(ok_server, max_concurrency=1)
    rows = run_batch(
        dense_in_process,
        treatment,
        REQUESTS[:6],
        kind="shadow",
        salt="s",
        traffic_pct=50,
        task="loglik",
        **KW,
    )
    assert [(r["request_id"], r["arm"]) for r in rows][:4] == [
        (REQUESTS[0][0], "control"),
        (REQUESTS[0][0], "treatment"),
        (REQUESTS[1][0], "treatment"),  # arms alternate which goes first
        (REQUESTS[1][0], "control"),
    ]
    by = {(r["request_id"], r["arm"]): r for r in rows}
    for rid, _ in REQUESTS[:6]:
        c, t = by[(rid, "control")], by[(rid, "treatment")]
        assert not c["error"] and not t["error"] and t["latency_ms"] > 0 and t["tokens"] > 0
        assert 0 < t["quality"] < 1 and t["quality"] == pytest.approx(c["quality"], rel=1e-4)

    unreferenced = [(rid, {**row, "reference": ""}) for rid, row in REQUESTS[6:10]]
    rows = run_batch(
        dense_in_process,
        treatment,
        unreferenced,
        kind="shadow",
        salt="s",
        traffic_pct=50,
        task="rouge_l",
        **KW,
    )
    assert len(rows) == 8 and not any(r["error"] for r in rows)
    assert all(r["quality"] == pytest.approx(1.0) for r in rows)  # same greedy text on both sides
    treatment.close()


def test_loglik_on_a_server_that_refuses_max_tokens_zero(
    tiny_model_dir: Path, dense_in_process: InProcessArm
) -> None:
    """A server that needs max_tokens >= 1 (HTTP 400 for 0) is asked once more with 1, from then on with 1;
    the generated token is not part of the reference, so the score is unchanged."""
    from rollout.arms.base import ArmRequest

    with openai_server("ok", model_dir=tiny_model_dir, refuse_zero_max_tokens=True) as (url, state):
        arm = openai_arm(url)
        answers = [
            arm.answer(ArmRequest(rid, r["prompt"], r["reference"]), "loglik", **KW)
            for rid, r in REQUESTS[:2]
        ]
        arm.close()
    assert [b["max_tokens"] for b in state.requests] == [0, 1, 1]
    for (rid, r), a in zip(REQUESTS[:2], answers, strict=True):
        local = dense_in_process.answer(ArmRequest(rid, r["prompt"], r["reference"]), "loglik", **KW)
        assert not a.error and a.quality == pytest.approx(local.quality, rel=1e-4)


def test_split_step_sends_each_request_to_its_assigned_arm_only(ok_server: str) -> None:
    from rollout.pilots import assign_arm

    control, treatment = openai_arm(ok_server, "control"), openai_arm(ok_server)
    with openai_server("error500") as (url, state):  # a control that would fail is never asked
        rows = run_batch(
            control,
            treatment,
            REQUESTS[:20],
            kind="split",
            salt="salt-9",
            traffic_pct=50,
            task="loglik",
            **KW,
        )
    assert sorted(r["request_id"] for r in rows) == sorted(rid for rid, _ in REQUESTS[:20])
    assert all(r["arm"] == assign_arm(r["request_id"], "salt-9", 50) for r in rows)
    assert {r["arm"] for r in rows} == {"control", "treatment"} and not any(r["error"] for r in rows)
    assert state.requests == [] and url
    control.close()
    treatment.close()


def _a_valid_batch_judged(rows: list[dict], requests: list) -> object:
    """The shadow batch passes its data check (so the pilot stores it) and `decide`'s verdict on it."""
    from rollout.gate import GateSettings, decide
    from rollout.observations_io import validate_observation_rows

    check = validate_observation_rows(
        rows, known_request_ids=[rid for rid, _ in requests], require_both_arms=True
    )
    assert check["passed"], check["failures"]
    spec = parse_spec(tiny_spec(Path("/models/tiny")))
    return decide(pd.DataFrame(rows), GateSettings.from_spec(spec), mode="paired", min_samples_per_arm=8)


@pytest.mark.parametrize("behaviour", ["error500", "hang"])
def test_failing_treatment_endpoint_is_error_evidence_and_a_guardrail_no_go(
    ok_server: str, behaviour: str
) -> None:
    """Every treatment request fails (HTTP 500, or no answer within the 0.25 s timeout): 36 error
    observations (quality of an empty answer), a valid batch, and the gate stops the pilot on the error
    guardrail, with no crash anywhere."""

    requests = REQUESTS[:36]
    control = openai_arm(ok_server, "control", max_concurrency=4)
    with openai_server(behaviour, hang_s=1.5) as (url, state):
        treatment = openai_arm(url, timeout_s=0.25, max_concurrency=6)
        rows = run_batch(
            control, treatment, requests, kind="shadow", salt="s", traffic_pct=50, task="loglik", **KW
        )
        treatment.close()
    control.close()
    treated = [r for r in rows if r["arm"] == "treatment"]
    assert len(treated) == 36 and len(state.requests) == 36
    assert all(r["error"] is True and r["quality"] == 0.0 and r["tokens"] == 0 for r in treated)
    assert not any(r["error"] for r in rows if r["arm"] == "control")
    if behaviour == "hang":
        assert min(r["latency_ms"] for r in treated) >= 250  # the client waited its timeout
    decision = _a_valid_batch_judged(rows, requests)
    assert decision.outcome == "NO-GO", decision.explanation
    breached = {g.name for g in decision.guardrails if g.breached}
    assert "treatment_error_rate" in breached, decision.guardrails
    assert decision.error_rate_treatment == 1.0 and decision.error_rate_control == 0.0


def test_malformed_and_refused_answers_are_error_observations(ok_server: str) -> None:
    from rollout.arms.base import ArmRequest

    rid, row = REQUESTS[0]
    req = ArmRequest(rid, row["prompt"], row["reference"])
    with openai_server("malformed") as (url, _):
        arm = openai_arm(url)
        for task in ("loglik", "contains"):
            a = arm.answer(req, task, **KW)
            assert a.error and a.quality == 0.0 and a.latency_ms > 0 and "malformed JSON" in a.output
        arm.close()
    # the server went away after the arm was built: refused connections are observations too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (building an arm checks reachability, see the next test: use the client directly)
    from rollout.arms.openai import OpenAIArm

    arm = OpenAIArm(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2, connect_timeout_s=1)
    a = arm.answer(req, "exact_match", **KW)
    assert a.error and a.quality == 0.0 and "ConnectError" in a.output
    arm.close()


def test_misconfigured_arms_fail_before_any_request_naming_the_arm(
    ok_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout.arms.base import ArmRequest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ArmConfigError, match=r"pilot\.arms\.treatment: cannot reach http://127\.0\.0\.1"):
        openai_arm(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ArmConfigError, match=r"does not serve model 'other'.*tiny-test"):
        build_arm(ArmSpec(kind="openai", url=ok_server, model="other"), "control", in_process=no_in_process)

    monkeypatch.delenv("SP_TEST_KEY", raising=False)
    with openai_server("ok", api_key="s3cret") as (url, _):
        with pytest.raises(ArmConfigError, match="'SP_TEST_KEY', which is not set"):
            openai_arm(url, api_key_env="SP_TEST_KEY")
        monkeypatch.setenv("SP_TEST_KEY", "wrong")
        with pytest.raises(ArmConfigError, match="refused the credentials"):
            openai_arm(url, api_key_env="SP_TEST_KEY")
        with pytest.raises(ArmConfigError, match="refused the credentials"):
            openai_arm(url)
    with openai_server("no-logprobs") as (url, _):
        arm = openai_arm(url)
        rid, row = REQUESTS[0]
        with pytest.raises(
            ArmConfigError, match=r"pilot\.arms\.treatment: .*no prompt log-probabilities.*text task"
        ):
            arm.answer(ArmRequest(rid, row["prompt"], row["reference"]), "loglik", **KW)
        arm.close()


def test_the_bearer_token_comes_from_the_named_variable(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout.arms.base import ArmRequest

    monkeypatch.setenv("SP_TEST_KEY", "s3cret")
    with openai_server("ok", model_dir=tiny_model_dir, api_key="s3cret") as (url, state):
        arm = openai_arm(url, api_key_env="SP_TEST_KEY")
        rid, row = REQUESTS[0]
        a = arm.answer(ArmRequest(rid, row["prompt"], row["reference"]), "contains", **KW)
        arm.close()
    assert not a.error and a.tokens > 0 and state.requests[0]["max_tokens"] == 4


def test_reference_tokens_are_those_past_the_prompt() -> None:
    from rollout.arms.openai import reference_logprobs

    # "Q: a" + " bc": tokens "Q", ":", " a", " b", "c" at offsets 0, 1, 2, 4, 6 (prompt is 4 chars)
    assert reference_logprobs([0, 1, 2, 4, 6], [None, -1.0, -2.0, -3.0, -4.0], 4, 7) == [-3.0, -4.0]
    # a token straddling the boundary carries reference text; a token generated past the end does not
    assert reference_logprobs([0, 3, 7], [None, -1.5, -9.0], 4, 7) == [-1.5]
    with pytest.raises(ValueError, match="no log-probability"):
        reference_logprobs([0, 4], [None, None], 4, 7)


def test_spec_pilot_arms_are_validated_and_default_in_process() -> None:
    base = tiny_spec(Path("/models/tiny"))
    spec = parse_spec(base)
    assert spec.pilot.arms.control.kind == spec.pilot.arms.treatment.kind == "in-process"
    assert "pilot" not in spec.to_dict()  # the default leaves existing specs' content hashes as they were

    ok = parse_spec(
        {
            **base,
            "pilot": {
                "arms": {
                    "control": {"kind": "mlflow", "url": "http://127.0.0.1:5001"},
                    "treatment": {
                        "kind": "openai",
                        "url": "https://llm.internal:8000/v1",
                        "model": "smollm2-sparse",
                        "api_key_env": "LLM_GATEWAY_KEY",
                        "timeout_s": 30,
                        "max_concurrency": 8,
                    },
                }
            },
        }
    )
    assert ok.pilot.arms.treatment.api_key_env == "LLM_GATEWAY_KEY" and ok.to_dict()["pilot"]
    assert ok.content_hash() != spec.content_hash()

    bad = {
        "treatment": ({"kind": "openai", "url": "http://h:1/v1"}, "needs model"),
        "control": ({"kind": "mlflow"}, "needs url: http"),
    }
    for role, (arm, message) in bad.items():
        with pytest.raises(SpecError, match=rf"pilot\.arms\.{role}: .*{message}"):
            parse_spec({**base, "pilot": {"arms": {role: arm}}})
    with pytest.raises(SpecError, match=r"pilot\.arms\.treatment: api_key_env must be the NAME"):
        parse_spec(
            {
                **base,
                "pilot": {
                    "arms": {
                        "treatment": {
                            "kind": "openai",
                            "url": "http://h/v1",
                            "model": "m",
                            "api_key_env": "sk-1",
                        }
                    }
                },
            }
        )
    with pytest.raises(SpecError, match=r"pilot\.arms\.control: an in-process arm takes no url"):
        parse_spec({**base, "pilot": {"arms": {"control": {"url": "http://h"}}}})
    with pytest.raises(SpecError, match=r"pilot\.arms\.control\.timeout_s"):
        parse_spec({**base, "pilot": {"arms": {"control": {"timeout_s": 0}}}})
    with pytest.raises(SpecError, match=r"pilot\.arms\.control\.kind"):
        parse_spec({**base, "pilot": {"arms": {"control": {"kind": "grpc"}}}})


def test_a_nan_score_is_the_arm_failing_the_request_not_a_lost_batch(
    tiny_model_dir: Path, dense_in_process: InProcessArm
) -> None:
    """A treatment model that breaks numerically on some requests (here: the input embedding of the token
    " of" is NaN, so every prompt holding it gets NaN logits and a NaN loglik) gives error observations
    with quality 0 on exactly those requests. Before, the NaN scores failed the batch's data check and the
    pilot dropped the whole batch: the evidence against the broken arm never reached the gate."""
    import copy

    import torch

    from flows.common import model_arm

    tok = dense_in_process.tokenizer
    broken = copy.deepcopy(dense_in_process.model)
    emb = broken.get_input_embeddings()
    weight = emb.weight.detach().clone()
    of = tok(" of", add_special_tokens=False)["input_ids"]
    assert len(of) == 1
    weight[of[0]] = float("nan")
    emb.weight = torch.nn.Parameter(weight)  # the input side only (the tiny model ties its embeddings)
    treatment = InProcessArm(broken, tok, None, model_arm)

    requests = REQUESTS[:24]
    rows = run_batch(
        dense_in_process, treatment, requests, kind="shadow", salt="s", traffic_pct=50, task="loglik", **KW
    )
    breaks = {rid for rid, r in requests if of[0] in tok(r["prompt"], add_special_tokens=False)["input_ids"]}
    assert 0 < len(breaks) < len(requests)
    treated = {r["request_id"]: r for r in rows if r["arm"] == "treatment"}
    assert {rid for rid, r in treated.items() if r["error"]} == breaks
    assert all(treated[rid]["quality"] == 0.0 for rid in breaks)
    assert not any(r["error"] for r in rows if r["arm"] == "control")
    assert _a_valid_batch_judged(rows, requests).outcome == "NO-GO"


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -0.25, 1.5, None, True])
def test_only_a_score_in_0_1_is_an_answer(score: object) -> None:
    from rollout.arms.base import ArmAnswer, usable

    kept = ArmAnswer(0.4, 12.0, 7, False, "text")
    assert usable(kept, "rouge_l", "ref") is kept
    out = usable(ArmAnswer(score, 12.0, 7, False, "text"), "loglik", "ref")  # type: ignore[arg-type]
    assert out.error and out.quality == 0.0 and out.latency_ms == 12.0 and out.tokens == 0
    assert "not a number in [0, 1]" in out.output


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_batch_whose_run_lost_its_use_case_stops_before_its_next_request(
    ok_server: str, trust_db: str, concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that is taken over while it answers a batch (paused past its lease, say) stops before its
    next request, on one thread or several (each request carries the run's lease), instead of loading
    the arms for answers it could not store."""
    import datetime as dt
    import threading
    import time

    from sqlalchemy import select

    from rollout import leases
    from rollout.db.models import UseCase, UseCaseLease, utcnow
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = UseCase(name="answering", owner="o", criticality="low")
        s.add(uc)
        s.flush()
        s.add(UseCaseLease(use_case_id=uc.id))

    def take_over() -> None:  # another run, from a thread with no lease of its own
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == "answering"))
            lease = s.get(UseCaseLease, uc.id)
            lease.holder, lease.work = "next", "cycle (flow run r-7) pid 7 on host-e"
            lease.acquired_at, lease.expires_at = utcnow(), utcnow() + dt.timedelta(seconds=300)

    class TakenOverOnThirdCall:  # the real treatment arm; its third request is when the run is taken over
        def __init__(self, arm, token: list[str]) -> None:  # noqa: ANN001
            self.arm, self.token, self.calls = arm, token, 0
            self.label, self.max_concurrency = arm.label, arm.max_concurrency
            self.lock = threading.Lock()

        def answer(self, request, task, **kw):  # noqa: ANN001, ANN003, ANN201
            with self.lock:
                self.calls += 1
                if self.calls == 3:
                    worker = threading.Thread(target=take_over)
                    worker.start()
                    worker.join()
                    deadline = time.monotonic() + 30
                    while self.token[0] not in leases._LOST and time.monotonic() < deadline:  # noqa: SLF001
                        time.sleep(0.01)
            return self.arm.answer(request, task, **kw)

        def close(self) -> None:
            self.arm.close()

    control = openai_arm(ok_server, "control", max_concurrency=concurrency)
    token: list[str] = []
    treatment = TakenOverOnThirdCall(openai_arm(ok_server, max_concurrency=concurrency), token)
    with leases.holding("answering", "pilot", renew_every=0.05) as held:
        token.append(held)
        with pytest.raises(leases.LeaseLost, match=r"cycle \(flow run r-7\)"):
            run_batch(
                control,
                treatment,
                REQUESTS[:24],
                kind="shadow",
                salt="s",
                traffic_pct=100,
                task="loglik",
                **KW,
            )
    assert treatment.calls <= 3 + concurrency  # the requests in flight when it was lost, and no more
    control.close()
    treatment.close()


MODELS = '{"object": "list", "data": [{"id": "m"}]}'


@pytest.mark.parametrize(
    ("kind", "path", "routes", "message"),
    [
        (  # a url without /v1: vLLM serves only /v1/..., 404 elsewhere
            "openai",
            "",
            {"GET /v1/models": Canned(200, MODELS)},
            r"GET http://127\.0\.0\.1:\d+/models answered HTTP 404: no OpenAI-compatible API at this url: "
            r"url is the API base, /v1 included",
        ),
        (  # an http url behind a gateway that redirects to https
            "openai",
            "/v1",
            {"GET /v1/models": Canned(302, "", {"Location": "https://llm.example/v1/models"})},
            r"answered HTTP 302 to https://llm\.example/v1/models: the server redirects",
        ),
        (
            "openai",
            "/v1",
            {"GET /v1/models": Canned(503, "overloaded")},
            r"answered HTTP 503: the server fails",
        ),
        (  # MLflow's scoring server answers /ping with 404 when its model failed to load
            "mlflow",
            "",
            {"GET /ping": Canned(404, "\n")},
            r"GET http://127\.0\.0\.1:\d+/ping answered HTTP 404: the scoring server is up but its model is "
            r"not loaded",
        ),
        ("mlflow", "", {"GET /ping": Canned(500, "")}, r"answered HTTP 500: the scoring server is up but"),
    ],
)
def test_an_endpoint_that_cannot_serve_is_configuration_not_evidence(
    kind: str, path: str, routes: dict, message: str
) -> None:
    """The pre-batch check stops the pilot naming the arm, before any request: every request to such an
    endpoint would fail, and its failures stored as evidence would stop the challenger (or blame the
    control) for a typo in a url."""
    with canned_server(routes) as (root, seen):
        spec = ArmSpec(kind=kind, url=root + path, model="m" if kind == "openai" else None)
        with pytest.raises(ArmConfigError, match=rf"^pilot\.arms\.treatment: .*{message}"):
            build_arm(spec, "treatment", in_process=no_in_process)
    assert not [r for r in seen if r.startswith("POST")]


@pytest.mark.parametrize(
    "routes",
    [
        {"GET /v1/models": Canned(200, "<html>a gateway's page</html>", {"Content-Type": "text/html"})},
        {"GET /v1/models": Canned(405, "")},  # a server that does not list its models
    ],
)
def test_a_server_that_does_not_list_its_models_still_passes_the_check(routes: dict) -> None:
    with canned_server(routes) as (root, _):
        arm = build_arm(
            ArmSpec(kind="openai", url=root + "/v1", model="m"), "control", in_process=no_in_process
        )
        arm.close()


def test_timeout_s_bounds_the_whole_request_not_each_read() -> None:
    """A server that sends its headers at once and then a byte every 0.1 s never leaves a read waiting
    0.5 s, but its answer takes ~3 s in all: the request is cut off once 0.5 s have passed, an error
    observation with the latency the client waited."""
    import time

    import sparse_core.tasks  # noqa: F401 - imported before the clock starts (scoring a failure loads it)
    from rollout.arms.base import ArmRequest

    answer = json.dumps({"choices": [{"text": "print"}]})
    routes = {"GET /v1/models": Canned(200, MODELS), "POST /v1/completions": Canned(200, answer, drip_s=0.1)}
    with canned_server(routes) as (root, _):
        arm = build_arm(
            ArmSpec(kind="openai", url=root + "/v1", model="m", timeout_s=0.5), "treatment", in_process=None
        )
        t0 = time.perf_counter()
        a = arm.answer(ArmRequest("r1", "Which built-in prints text?", "print"), "contains", **KW)
        took = time.perf_counter() - t0
        arm.close()
    assert a.error and a.quality == 0.0 and "timed out after 0.5s" in a.output, a
    assert 0.5 <= took < 1.2 and 500 <= a.latency_ms < 1200


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ('{"choices": [{"text": "print"}], "usage": {"total_tokens": ' + "9" * 5000 + "}}", "malformed JSON"),
        ("[" * 200_000 + "]" * 200_000, "malformed JSON"),  # nested past the decoder's recursion limit
    ],
)
def test_a_body_json_cannot_read_is_an_error_observation_not_a_crash(body: str, what: str) -> None:
    from rollout.arms.base import ArmRequest

    routes = {"GET /v1/models": Canned(200, MODELS), "POST /v1/completions": Canned(200, body)}
    with canned_server(routes) as (root, _):
        arm = build_arm(ArmSpec(kind="openai", url=root + "/v1", model="m"), "treatment", in_process=None)
        a = arm.answer(ArmRequest("r1", "Which built-in prints text?", "print"), "contains", **KW)
        arm.close()
    assert a.error and a.quality == 0.0 and what in a.output and len(a.output) < 400


@pytest.mark.parametrize(
    "usage",
    ["Infinity", "NaN", "1e15", "-3", '{"prompt_tokens": "5", "completion_tokens": 3}'],
)
def test_an_absurd_usage_count_is_no_count_and_costs_no_batch(usage: str) -> None:
    """The server's token count is its account, not evidence: one that is not a count in [0, 1e9] is 0.
    Kept, 1e15 failed the batch's data check (the batch dropped and its requests drawn again); Infinity
    raised out of run_batch."""
    from rollout.observations_io import validate_observation_rows

    usage_json = usage if usage.startswith("{") else '{"total_tokens": ' + usage + "}"
    body = '{"choices": [{"text": "print"}], "usage": ' + usage_json + "}"
    routes = {"GET /v1/models": Canned(200, MODELS), "POST /v1/completions": Canned(200, body)}
    requests = [(f"r{i}", {"prompt": f"q{i}", "reference": "print"}) for i in range(3)]
    with canned_server(routes) as (root, _):
        control, treatment = (
            build_arm(ArmSpec(kind="openai", url=root + "/v1", model="m"), role, in_process=None)
            for role in ("control", "treatment")
        )
        rows = run_batch(
            control, treatment, requests, kind="shadow", salt="s", traffic_pct=0, task="contains", **KW
        )
        control.close()
        treatment.close()
    assert [(r["error"], r["quality"], r["tokens"]) for r in rows] == [(False, 1.0, 0)] * 6
    check = validate_observation_rows(
        rows, known_request_ids=[r for r, _ in requests], require_both_arms=True
    )
    assert check["passed"], check["failures"]


def test_an_infinite_text_offset_is_an_error_observation() -> None:
    from rollout.arms.base import ArmRequest

    logprobs = '{"text_offset": [0, Infinity], "token_logprobs": [null, -1.0]}'
    body = '{"choices": [{"text": "x", "logprobs": ' + logprobs + "}]}"
    routes = {"GET /v1/models": Canned(200, MODELS), "POST /v1/completions": Canned(200, body)}
    with canned_server(routes) as (root, _):
        arm = build_arm(ArmSpec(kind="openai", url=root + "/v1", model="m"), "treatment", in_process=None)
        a = arm.answer(ArmRequest("r1", "Which built-in prints text?", "print"), "loglik", **KW)
        arm.close()
    assert a.error and a.quality == 0.0 and "malformed prompt log-probabilities" in a.output


@pytest.mark.parametrize(("value", "error"), [(2.5, True), (1e-3, True), (1e-9, False), (-0.5, False)])
def test_an_mlflow_log_likelihood_above_0_is_an_error_not_a_perfect_score(value: float, error: bool) -> None:
    """A mean log-likelihood above 0 (a probability above 1) is a broken server: an error observation, as
    the openai arm's is, not quality 1. Above 0 by float rounding only, it is 0."""
    import math

    from rollout.arms.base import ArmRequest

    routes = {
        "GET /ping": Canned(200, "\n"),
        "POST /invocations": Canned(200, json.dumps({"predictions": [value]})),
    }
    with canned_server(routes) as (root, _):
        arm = build_arm(ArmSpec(kind="mlflow", url=root), "treatment", in_process=None)
        a = arm.answer(ArmRequest("r1", "Which built-in prints text?", "print"), "loglik", **KW)
        arm.close()
    assert a.error is error
    if error:
        assert a.quality == 0.0 and "log-likelihood above 0" in a.output
    else:
        assert a.quality == pytest.approx(min(1.0, math.exp(value)))
