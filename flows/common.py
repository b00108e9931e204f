"""Shared plumbing of the flows: the task decorator, the use case's context (spec, dataset), a per-process
model cache, and MLflow run helpers. Kept small: the domain lives in rollout, the model work in
sparse_core."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from rollout.redact import redact, redact_log_records, redacted_exception
from rollout.settings import configure_environment

_MODEL_LOCK = threading.RLock()
_MODELS: dict[str, tuple[Any, Any]] = {}


def flow_task(name: str, *, retries: int = 2) -> Any:
    """The flows' task decorator: never cached (every task reads or writes state, and its idempotency
    key, not Prefect's cache, makes a retry safe), retried `retries` times one second apart, except
    where a retry cannot help (`_worth_retrying`). An error's text reaches Prefect redacted
    (`secrets_redacted`)."""
    as_task = task(
        cache_policy=NO_CACHE,
        name=name,
        retries=retries,
        retry_delay_seconds=1,
        retry_condition_fn=_worth_retrying,
    )
    return lambda fn: as_task(secrets_redacted(fn))


def sparsepilot_flow(name: str) -> Callable[[Callable[..., Any]], Any]:
    """The flows' flow decorator: Prefect's ``@flow`` (printed lines logged), its logs and its error's
    text redacted (`secrets_redacted`), and in a flow run that `sparsepilot serve`'s runner started in a
    process of its own, the serve's log file joined (`flows.quiet.join_served_log_file`): as the flow's
    module is imported, which the runner's process does before the run begins, so Prefect's first records
    of the run ("Beginning flow run ...") reach the file too, and again as the run starts (a process
    whose environment named the file only after the import)."""
    from flows.quiet import join_served_log_file

    join_served_log_file()
    return lambda fn: flow(name=name, log_prints=True)(secrets_redacted(_in_served_log_file(fn)))


def _in_served_log_file(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from flows.quiet import join_served_log_file

        join_served_log_file()
        return fn(*args, **kwargs)

    return run


def secrets_redacted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as a flow's or task's body that hands Prefect no secret: Prefect's log handlers redact every
    record (`redact_prefect_logs`; in a worker's flow-run process too, which has no CLI set-up), and an
    error whose text holds one (MLflow's "API request to http://user:password@host/... failed") is
    raised again with its text redacted (`rollout.redact.redacted_exception`, same type), the original
    as its cause. Prefect stores the text of the error a run raised as the run's state message, in its
    database and UI, and pickles the error as the flow's result, which keeps no cause."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        redact_prefect_logs()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            clean = redacted_exception(exc)
            if clean is None:
                raise
            raise clean from exc

    return run


# What `redact_prefect_logs` last saw: the logger dict's size, the names of its `prefect` placeholders
# (a logger not made yet), and each logger it looked at with the handlers it held then.
_LOG_SETUP_SEEN: tuple[int, frozenset[str], tuple[tuple[logging.Logger, tuple[logging.Handler, ...]], ...]]
_LOG_SETUP_SEEN = (-1, frozenset(), ())
_LOG_SETUP_LOCK = threading.Lock()


def redact_prefect_logs() -> None:
    """Every handler of Prefect's logging set-up redacts what it writes (`rollout.redact.RedactingFilter`):
    the console handler on the root logger, the API log handler of the flow- and task-run loggers (the
    Prefect UI's logs), and any other handler on a `prefect` logger. Idempotent, and run at the start of
    every flow and task run, after whatever set Prefect's logging up again (a worker's flow-run process
    has no CLI set-up; a Prefect set-up run again replaces the handlers). It walks the logger tree once,
    and again only when the logging set-up changed since (a logger made, a handler added or replaced on
    one it looked at); the check costs microseconds, the walk a fraction of a millisecond per start
    (hundreds of loggers once torch, transformers and MLflow are imported). The logger tree is read as one
    copy (`_loggers_now`), and one thread walks at a time."""
    global _LOG_SETUP_SEEN
    if not _log_setup_changed(_LOG_SETUP_SEEN):
        return
    with _LOG_SETUP_LOCK:
        entries = list(_loggers_now().items())
        prefect = [(n, lg) for n, lg in entries if n == "prefect" or n.startswith("prefect.")]
        loggers = [logging.getLogger()] + [lg for _, lg in prefect if isinstance(lg, logging.Logger)]
        held = tuple((lg, tuple(lg.handlers)) for lg in loggers)
        redact_log_records(h for _, hs in held for h in hs if type(h).__module__.startswith("prefect."))
        placeholders = frozenset(n for n, lg in prefect if not isinstance(lg, logging.Logger))
        _LOG_SETUP_SEEN = (len(entries), placeholders, held)


def _log_setup_changed(seen: tuple[int, frozenset[str], tuple[Any, ...]]) -> bool:
    """Whether a logger was made (the dict grew, or a placeholder became a logger) or a handler was added,
    removed or replaced on a logger `seen` holds, since `redact_prefect_logs` walked."""
    size, placeholders, held = seen
    logger_dict = logging.Logger.manager.loggerDict
    return (
        len(logger_dict) != size
        or any(isinstance(logger_dict.get(n), logging.Logger) for n in placeholders)
        or any(tuple(lg.handlers) != hs for lg, hs in held)
    )


def _loggers_now() -> dict[str, Any]:
    """The process's loggers by name: a copy of logging's logger tree, taken under `logging`'s own lock,
    the lock `logging.getLogger` adds a logger under. Other threads create loggers while a flow starts
    (Prefect's events worker imports `websockets` in its own threads); a walk of the live dict, even
    `list(loggerDict.items())`, is no snapshot: a garbage collection in its middle runs finalisers,
    another thread takes over there, and the walk failed the flow run with "dictionary changed size
    during iteration"."""
    with logging._lock:  # logging's own lock of its logger tree (private: there is no public way to hold it)
        return dict(logging.Logger.manager.loggerDict)


def _worth_retrying(_task: Any, _task_run: Any, state: Any) -> bool:
    """Not when the use case belongs to another run (rollout.leases: a lease another run took over, or
    holds): a retry would be refused the same way, and a calibration task would start computing again;
    nor for a refused observations file (the same file is refused again), nor for a pilot whose state
    refuses the step (a look on a pilot aborted or promoted meanwhile: the state will not change back),
    nor on a setting SparsePilot cannot use (`SettingsError`: a bad SPARSEPILOT_DEVICE), which a second
    later is as bad, nor for an approval's effect another finisher claimed (`ClaimRefused`: the claimant
    is carrying it out; a second later it still is, or it is done), nor for a promotion held while a rollback
    of the serving champion waits for a person (`PromotionHeld`: a person decides that, not a second)."""
    from rollout.approvals import ClaimRefused, PromotionHeld
    from rollout.leases import LeaseLost, UseCaseBusy
    from rollout.observations_io import ObservationImportError
    from rollout.pilots import PilotStateError
    from rollout.settings import SettingsError

    refused = LeaseLost | UseCaseBusy | ObservationImportError | PilotStateError | SettingsError
    return not isinstance(getattr(state, "data", None), refused | ClaimRefused | PromotionHeld)


def this_run() -> str | None:
    """This flow run's id, or None outside a flow run."""
    from prefect.runtime import flow_run

    return flow_run.get_id() or None


def flow_run_is_live(flow_run_id: str) -> bool:
    """False once Prefect has the run in a final state (completed, failed, crashed, cancelled): a lease
    it held is free. True while it runs, and whenever Prefect cannot say (then the lease lapses)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - an unknown run, or no API: wait for the lease to lapse instead
        return True
    return state is None or not state.is_final()


@contextmanager
def use_case_lease(use_case: str, what: str) -> Iterator[str]:
    """`rollout.leases.holding` as a flow run takes it: named by this flow run, a holder Prefect ended
    seen gone at once (`flow_run_is_live`), and what a dead holder left running in Prefect marked Crashed
    (flows.crashed_holder). Outside a flow run (`pilot --observations`'s import, run in the CLI's process)
    the same, the lease named by the process alone. Raises UseCaseBusy, naming the holder."""
    from flows.crashed_holder import crash_left_running
    from rollout import leases

    run = this_run()
    with leases.holding(
        use_case,
        what,
        flow_run_id=run,
        run_is_live=flow_run_is_live,
        on_take_over=lambda taken: crash_left_running(taken, leases.work_description(what, run)),
    ) as token:
        yield token


def under_lease(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flow that changes a use case's state works under its lease (rollout.leases): one run at a time
    per use case, re-entrant for a cycle's subflows; another run meanwhile is refused with
    rollout.leases.UseCaseBusy, naming the holder. Put it under ``@flow``; the flow's first parameter
    (or ``use_case=``) names the use case. Before the lease, the flow's preflight: the MLflow store at
    MLflow's head (`rollout.mlflow_store.ensure_store`, ~40 ms when it is), so no migration runs in the
    middle of the flow's work and a half-migrated store is refused before any of it."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run_under_lease(*args: Any, **kwargs: Any) -> Any:
            from rollout.mlflow_store import ensure_store

            ensure_store()
            use_case = kwargs["use_case"] if "use_case" in kwargs else args[0]
            with use_case_lease(use_case, what):
                return fn(*args, **kwargs)

        return run_under_lease

    return wrap


@dataclass(frozen=True)
class UseCaseContext:
    name: str
    use_case_id: int
    spec: Any  # rollout.spec.UseCaseSpec
    spec_version: int
    spec_hash: str
    dataset_path: Path
    rows: list[dict[str, Any]] = field(repr=False)
    spec_dir: Path | None = None

    @property
    def task(self) -> str:
        return self.spec.dataset.task

    def split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(calibration rows, held-apart rows): calibration never reads the held-apart rows; the
        evaluation scores them and a pilot on dataset traffic draws them (rollout.dataset_split)."""
        from rollout.dataset_split import split_rows

        return split_rows(self.rows)

    def traffic(self, salt: str) -> Any:
        """The pilot's traffic source (rollout.traffic): each request at most once per pilot, none of them
        a prompt calibration read."""
        from rollout.traffic import source_for

        return source_for(self.spec, rows=self.rows, salt=salt, spec_dir=self.spec_dir)


def load_context(name: str, version: int | None = None) -> UseCaseContext:
    """Spec of the current version (or of `version`: the monitor's is its promoted pilot's) and its
    validated dataset rows (id, prompt, reference, tags). The rows come from the content-addressed copy
    stored at `usecase add`, re-checked against its sha256, so a flow never runs on a dataset that changed
    since it was validated."""
    from rollout.usecases import dataset_rows, load_spec_version

    configure_environment()
    loaded = load_spec_version(name, version)
    rows = [
        {"id": r.id, "prompt": r.prompt, "reference": r.reference, "tags": list(r.tags)}
        for r in dataset_rows(loaded)
    ]
    return UseCaseContext(
        name,
        loaded.use_case_id,
        loaded.spec,
        loaded.version,
        loaded.spec_hash,
        loaded.dataset_path,
        rows,
        loaded.source_dir,
    )


def get_model(ref: str) -> tuple[Any, Any]:
    """(model, tokenizer) loaded once per process: the main job reuses it across use cases. Loaded again
    when the weights at `ref` changed since (a fine-tune updated in place: their fingerprint, cheap once
    computed, is checked on every call), so a flow keyed by the weights it finds on disk never runs on
    the old ones (review T6). Callers that sparsify it must unsparsify before returning (see
    `dense_model`)."""
    from sparse_core.fingerprint import weights_fingerprint

    with _MODEL_LOCK:
        cached = _MODELS.get(ref)
        if cached is not None and cached[0].config.weights_fingerprint != weights_fingerprint(ref):
            del _MODELS[ref], cached  # the old weights go before the new ones load
        if ref not in _MODELS:
            from sparse_core import load_model

            model, tok = load_model(ref, device=pick_device())
            model.eval()
            _MODELS[ref] = (model, tok)
        return _MODELS[ref]


def pick_device() -> str:
    """Where the flows load the model: SPARSEPILOT_DEVICE (auto, cpu or cuda) if set, else auto, by the
    benchmarks' rule (CUDA when torch sees it, else the CPU; `cuda` without one is refused). A value
    it cannot use is a `SettingsError` that names the variable (`error: ...`, exit 2 at the CLI, which
    checks it before a flow starts), not a failure deep inside a model load."""
    import os

    from rollout.settings import SettingsError
    from sparse_core.bench.common import bench_device

    wanted = os.environ.get("SPARSEPILOT_DEVICE") or "auto"
    try:
        return bench_device(wanted).type
    except ValueError as exc:
        raise SettingsError(f"SPARSEPILOT_DEVICE={wanted!r}: {exc}") from None


def require_prefect_api(timeout_s: float = 10.0) -> None:
    """PREFECT_API_URL, when set (the Prefect server the flows report to), answering before a flow
    starts: one GET of its /health. A server that does not answer (a closed port, a wrong host, a
    timeout) is a `SettingsError` naming the variable (`error: ...`, exit 2 at the CLI), not Prefect's
    three chained tracebacks once the flow starts. Any HTTP answer, an auth refusal included, is left
    to Prefect; without the variable the flows start their own temporary server, which ends with this
    process (`flows.temporary_server`: a command killed with SIGKILL leaves no server behind)."""
    import os
    import re

    import httpx

    from rollout.settings import SettingsError

    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        from flows.temporary_server import bind_to_this_process

        bind_to_this_process()
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise SettingsError(f"PREFECT_API_URL={url}: not an http(s) URL of a Prefect API ({exc})") from None
    except httpx.TransportError as exc:
        why = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or type(exc).__name__
        raise SettingsError(
            f"PREFECT_API_URL={url}: the Prefect server does not answer ({why[:1].lower()}{why[1:]})"
        ) from None


@contextmanager
def model_arm(model: Any, plan: Any | None) -> Iterator[Any]:
    """The model as one arm: sparsified by `plan` inside the block (treatment) or dense (control);
    always dense again afterwards, so the cached model is never left sparse."""
    from sparse_core import sparsified

    with _MODEL_LOCK:
        if plan is None:
            yield model
            return
        with sparsified(model, plan):
            yield model


def stable_key(*parts: Any) -> str:
    """A short deterministic key for idempotency columns (<= 128 chars)."""
    raw = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    rid = flow_run.get_id()
    return str(rid) if rid else None


def log_run(
    use_case: str,
    *,
    run_name: str,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    json_artifacts: dict[str, Any] | None = None,
    files: list[str] | None = None,
) -> str:
    """One MLflow run in the use case's experiment (rollout.tracking); returns its run id. Non-finite
    metrics are dropped from `metrics` with a tag naming them, never logged as NaN."""
    import math

    import mlflow

    from rollout import tracking

    fr = flow_run_id()
    all_tags = {**(tags or {}), **({"prefect.flow_run_id": fr} if fr else {})}
    clean = {k: float(v) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))}
    dropped = sorted(set(metrics or {}) - set(clean))
    if dropped:
        all_tags["sparsepilot.metrics_not_finite"] = ",".join(dropped)
    with tracking.start_run(use_case, run_name=run_name, tags=all_tags) as run:
        if params:
            tracking.log_params(params)
        if clean:
            tracking.log_metrics(clean)
        for name, obj in (json_artifacts or {}).items():
            tracking.log_json(obj, name)
        for path in files or []:
            mlflow.log_artifact(path)
        return run.info.run_id


def catch_up_logs(log: Callable[..., Any], *args: Any) -> Any:
    """Run `log` (logging to MLflow what an earlier run stored and could not log), but never let it stop
    the work that follows: with MLflow down it would fail every run before its gate look or monitor look
    (the fail-safe) was taken. A failure is a warning; the next run tries again."""
    from rollout.leases import LeaseLost

    try:
        return log(*args)
    except LeaseLost:  # another run took the use case over: this one must stop, not carry on
        raise
    except Exception as exc:  # noqa: BLE001 - best effort by design
        logging.getLogger("sparsepilot.flows").warning(
            "could not log earlier runs to MLflow now (%s: %s); the next run tries again",
            type(exc).__name__,
            redact(str(exc))[:200],
        )
        return None


def mark_not_recorded(mlflow_run_id: str | None, exc: BaseException) -> None:
    """Tag an MLflow run whose results the state DB then refused or failed to record (a run that lost
    its use case's lease, say): the experiment keeps it, and says why no model version or evaluation
    refers to it (tag `sparsepilot.not_recorded`). Best effort: the flow fails with `exc` either way."""
    if mlflow_run_id is None:
        return
    from rollout import tracking

    try:
        why = redact(f"the state DB did not record this run: {type(exc).__name__}: {exc}")
        tracking.client().set_tag(mlflow_run_id, "sparsepilot.not_recorded", why[:5000])
    except Exception as tag_exc:  # MLflow out of reach too: the flow's own error says what happened
        logging.getLogger("sparsepilot.flows").warning(
            "could not tag MLflow run %s: %s", mlflow_run_id, redact(tag_exc)
        )


_PLANS: dict[str, Any] = {}


def remember_plan(plan: Any) -> None:
    """Keep a freshly calibrated plan (with its tensors, e.g. learned gate weights) for this process."""
    _PLANS[plan.content_hash()] = plan


def version_plan(plan_dict: dict[str, Any], mlflow_model: str | None, mlflow_version: str | None) -> Any:
    """The SparsePlan of a model version. The DB keeps the plan's JSON; a plan whose estimator needs
    tensors (learned gate weights) is taken from this process's cache or from the registered MLflow
    version's `plan` artifact."""
    from sparse_core import SparsePlan, load_plan

    plan = SparsePlan.from_dict(plan_dict, source="model version plan")
    if not plan.metadata.get("gate_weights") or plan.tensors:
        return plan
    cached = _PLANS.get(plan.content_hash())
    if cached is not None:
        return cached
    if not (mlflow_model and mlflow_version):
        raise RuntimeError(
            "the plan needs its gate weights, but the model version is not registered in MLflow"
        )
    import mlflow

    from rollout import tracking

    tracking.configure()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mlflow_model}/{mlflow_version}"))
    found = [p.parent for p in local.rglob("plan.json")]
    if not found:
        raise RuntimeError(f"models:/{mlflow_model}/{mlflow_version} has no plan artifact")
    loaded = load_plan(found[0])
    _PLANS[loaded.content_hash()] = loaded
    return loaded
