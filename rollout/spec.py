"""The use-case spec: one YAML file per business use case, validated strictly so that a typo never
silently becomes a default. Every error names the file and the field path
(``examples/usecases/x.yaml: rollout.steps[2].traffic_pct: must be greater than step 1 (25)``).

docs/usecase-spec.md documents every field."""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import math
import os
import re
import reprlib
import unicodedata
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rollout.redact import SECRET_KEY, redact
from sparse_core.errors import SparsePilotError

_SLUG = re.compile(r"^[a-z][a-z0-9-]{1,62}[a-z0-9]$")
# a name ending like a secret's key ("forgot-password", "reset-token"): "NAME: no active pilot" would be
# read as a secret and its next word masked in every message (rollout.redact)
SECRET_LIKE_NAME = re.compile(rf"{SECRET_KEY}$")
_QUANTILE_KEY = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
# Input bounds: a spec is a short hand-written file. These stop anchor/alias bombs, deeply nested
# documents and huge files before they cost memory or time (and before any error message shows them).
MAX_SPEC_BYTES = 256 * 1024
MAX_YAML_DEPTH = 50
MAX_YAML_NODES = 20_000  # after alias expansion
MAX_AMOUNT = 1e12  # any count, rate, price or duration in a spec stays below this
MIN_UTILISATION = 0.01  # cost.utilisation: the smallest share of paid GPU time serving requests


class SpecError(SparsePilotError, ValueError):
    """A spec that cannot be used. ``problems`` holds (field path, message) pairs, all of them."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            "\n".join(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in problems)
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


PositiveInt = Annotated[int, Field(gt=0, le=int(MAX_AMOUNT))]
PositiveFloat = Annotated[float, Field(gt=0, le=MAX_AMOUNT, allow_inf_nan=False)]


# letters and symbols that draw nothing: Hangul fillers, the blank Braille pattern, halfwidth filler
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_visible_text(text: str) -> bool:
    """True when ``text`` has a character one can see: whitespace, zero-width and other format
    characters (U+200B, U+FEFF, ...), combining marks on nothing (U+034F) and blank letters (U+3164
    HANGUL FILLER, U+2800 BRAILLE PATTERN BLANK, ...) alone do not make a name, an owner, a reason or a
    prompt."""
    return any(
        not ch.isspace()
        and ch not in _BLANK
        and unicodedata.category(ch) not in ("Cf", "Cc", "Zs", "Mn", "Me")
        for ch in text
    )


def no_nul(v: str) -> str:
    """A path or model ref holds no NUL byte (no file system takes one; os.path raised on it)."""
    if "\x00" in v:
        raise ValueError("must not contain a NUL byte (\\x00)")
    return v


def control_characters(text: str, allowed: str = "") -> list[str]:
    """The control characters (C0, DEL, C1: Unicode category Cc) in ``text`` other than ``allowed``,
    each once, as escapes ('\\x1b'). Text a spec stores is printed to other users' terminals (`usecase
    list`), where an ESC sequence would clear or recolour the screen."""
    found = dict.fromkeys(ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in allowed)
    return [ascii(ch)[1:-1] for ch in found]


def _no_control_characters(v: str, allowed: str, what: str) -> str:
    bad = control_characters(v, allowed)
    if bad:
        raise ValueError(f"must not contain control characters ({', '.join(bad)}); {what}")
    return v


class DatasetSpec(_Strict):
    path: str = Field(
        description="JSONL file (id, prompt, optional reference, optional tags), relative to the spec"
    )
    task: Literal["exact_match", "contains", "rouge_l", "loglik"]
    references_required: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return no_nul(v)


class LengthShare(_Strict):
    tokens: PositiveInt
    share: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class TokenDistribution(_Strict):
    """Token lengths, either as quantiles (``{p50: 5000, p90: 7000}``) or as an explicit mix
    (``[{tokens: 4096, share: 0.6}, ...]``). Both become a mix: see `mix()`."""

    quantiles: dict[str, PositiveInt] | None = None
    buckets: list[LengthShare] | None = None

    def mix(self) -> list[tuple[int, float]]:
        """(tokens, share) pairs summing to 1. Quantile q_i stands for the probability mass between
        the midpoints to its neighbouring quantile levels (0 and 1 at the ends)."""
        if self.buckets is not None:
            total = sum(b.share for b in self.buckets)
            return [(b.tokens, b.share / total) for b in self.buckets]
        assert self.quantiles is not None
        points = sorted((_quantile_level(k), v) for k, v in self.quantiles.items())
        levels = [q for q, _ in points]
        bounds = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:], strict=False)] + [1.0]
        return [(v, bounds[i + 1] - bounds[i]) for i, (_, v) in enumerate(points)]

    def mean(self) -> float:
        return sum(t * s for t, s in self.mix())

    def max(self) -> int:
        return max(t for t, _ in self.mix())


class TrafficSpec(_Strict):
    requests_per_day: PositiveFloat
    prompt_tokens: TokenDistribution
    output_tokens: TokenDistribution


class CalibrationSettings(_Strict):
    max_texts: PositiveInt = 16
    max_seq_len: PositiveInt = 2048
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    # what the allocation's eps bounds per head (sparse_core CalibrationLimits.drop_measure): the dense
    # attention mass a selection drops, or the relative attention-output error it causes
    drop_measure: Literal["mass", "output"] = "mass"
    # judge the budget on one-sided bounds at this confidence, not the held-out means; None: the means
    confidence: Annotated[float, Field(gt=0, lt=1)] | None = None
    # the bound's unit (sparse_core.prefill_bound): a block of 256 scored positions, or a held-out window
    bound_unit: Literal["block", "window"] = "block"
    # with a learned estimator: the last N calibration windows are kept apart from its training and
    # every candidate's sensitivities come from them (sparse_core CalibrationLimits.sensitivity_windows);
    # 0: every calibration window serves both
    sensitivity_windows: Annotated[int, Field(ge=0, le=64)] = 0
    # with quality_budget.task_delta: how many of the calibration split's rows (with a reference) the task
    # bound scores per search step, at most; None: all of them (a valid bound needs ~5 / task_delta rows)
    task_rows: PositiveInt | None = None

    @model_validator(mode="after")
    def _windows_left_to_train_on(self) -> CalibrationSettings:
        if not self.sensitivity_windows:
            return self
        from sparse_core import prefill_bound as pb  # torch-free

        held = pb.heldout_windows(self.max_texts, self.holdout_fraction)
        calib = self.max_texts - held
        if calib <= self.sensitivity_windows:
            raise ValueError(
                f"calibration.sensitivity_windows {self.sensitivity_windows}: max_texts {self.max_texts} "
                f"less the {held} held out (holdout_fraction {self.holdout_fraction:g}) leaves {calib} "
                "calibration window(s), and a learned estimator needs at least one of its own beyond "
                "those kept apart (raise max_texts or lower sensitivity_windows)"
            )
        return self

    @model_validator(mode="after")
    def _enough_heldout_for_the_bound(self) -> CalibrationSettings:
        # refused here, at `usecase add`, not minutes into a calibration; the windows' real count and
        # length are checked again when calibration has packed them (prompts may give fewer)
        if self.confidence is None:
            if self.bound_unit != "block":
                raise ValueError(
                    "calibration.bound_unit needs calibration.confidence (the bound it is the unit of)"
                )
            return self
        from sparse_core import prefill_bound as pb  # torch-free

        held = pb.heldout_windows(self.max_texts, self.holdout_fraction)
        lens = [self.max_seq_len] * held
        why = pb.heldout_shortfall(
            self.confidence, lens, pb.FIDELITY_FRACTION, self.bound_unit, pb.SEARCH_STEPS
        )
        if why is not None:
            raise ValueError(
                f"calibration.{why} (max_texts {self.max_texts} x holdout_fraction "
                f"{self.holdout_fraction:g} holds out {held} window(s) of up to {self.max_seq_len} tokens)"
            )
        return self


class DecodeCalibration(_Strict):
    """Sparse decode (a plan `decode` section), calibrated on continuations the dense model generates
    after `prompt_tokens`-token prompts from the dataset; absent: decode stays dense."""

    estimator: Annotated[str, Field(min_length=1, max_length=64)] = "quest"
    prompt_tokens: Annotated[int, Field(ge=256, le=131072)] = 2048
    new_tokens: Annotated[int, Field(ge=8, le=512)] = 64
    n_prompts: Annotated[int, Field(ge=1, le=64)] = 2
    page_size: Annotated[int, Field(ge=8, le=256)] = 16
    # judge the decode budget on one-sided bounds at this confidence, not the means; None: the means
    confidence: Annotated[float, Field(gt=0, lt=1)] | None = None
    # with confidence: windows beyond the judged prompts the candidates' sensitivities come from
    sensitivity_prompts: Annotated[int, Field(ge=1, le=16)] = 2
    # with confidence and a scorer decode calibration trains (page_gate): those windows come after its
    # training windows instead of being them (sparse_core DecodeLimits.sensitivity_apart)
    sensitivity_apart: bool = False
    # paired runs of the whole model's decode at prompt_tokens, dense and with the plan: decode stays
    # dense there unless they show it faster (sparse_core DecodeLimits.whole_model_repeats); 0: none
    whole_model_repeats: Annotated[int, Field(ge=0, le=64)] = 4

    @field_validator("whole_model_repeats")
    @classmethod
    def _an_interval_needs_two_runs(cls, v: int) -> int:
        if v == 1:
            raise ValueError("one run gives no interval: 0 (no whole-model check) or at least 2")
        return v

    @field_validator("estimator")
    @classmethod
    def _decode_estimator(cls, v: str) -> str:
        from sparse_core.decode.plan import DECODE_ESTIMATORS  # torch-free

        if v not in DECODE_ESTIMATORS:
            raise ValueError(f"unknown decode estimator {v!r}; choose from {list(DECODE_ESTIMATORS)}")
        return v

    @model_validator(mode="after")
    def _enough_prompts_for_the_bound(self) -> DecodeCalibration:
        # refused here, at `usecase add`, not minutes into a calibration
        if self.confidence is not None:
            from sparse_core.decode.bound import check_prompts  # torch-free

            check_prompts(self.confidence, self.n_prompts)
        return self

    @model_validator(mode="after")
    def _apart_from_a_trained_scorer(self) -> DecodeCalibration:
        if not self.sensitivity_apart:
            return self
        from sparse_core.decode.plan import TRAINED_BY_DECODE_CALIBRATION  # torch-free

        if self.confidence is None:
            raise ValueError(
                "decode.sensitivity_apart needs decode.confidence (only a bound reads sensitivity windows)"
            )
        if self.estimator not in TRAINED_BY_DECODE_CALIBRATION:
            raise ValueError(
                f"decode.sensitivity_apart keeps the sensitivity windows apart from the training of a "
                f"scorer decode calibration trains ({', '.join(TRAINED_BY_DECODE_CALIBRATION)}); "
                f"{self.estimator!r} trains on none"
            )
        return self


class QualityBudget(_Strict):
    kl: PositiveFloat = 0.01
    agree: Annotated[float, Field(gt=0, le=1)] = 0.99
    nll_delta: PositiveFloat = 0.01
    # largest drop of the task's mean score (dense - sparse) on the calibration split; None = no bound
    task_delta: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # a registered estimator that can be deployed, or candidates a+b (a per-layer choice)
    estimator: Annotated[str, Field(min_length=1, max_length=200)] = "pooled"
    calibration: CalibrationSettings = CalibrationSettings()
    decode: DecodeCalibration | None = None

    @field_validator("estimator")
    @classmethod
    def _registered_estimator(cls, v: str) -> str:
        from sparse_core.estimators import DEPLOYABLE_KINDS, parse_estimator_spec  # torch-free

        names = "+".join(parse_estimator_spec(v, DEPLOYABLE_KINDS))
        if names != v:
            raise ValueError(f"write the estimator as {names!r}")
        return v


class LatencySLO(_Strict):
    p95: PositiveFloat


class CostSpec(_Strict):
    gpu_usd_per_hour: PositiveFloat
    # at least 1% of paid time busy: below that the paid hours (busy hours / utilisation) say nothing a
    # cost review could use, and a vanishing share overflows them (docs/roi.md)
    utilisation: Annotated[float, Field(ge=MIN_UTILISATION, le=1, allow_inf_nan=False)]
    pilot_one_off_usd: Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]


class ShadowSpec(_Strict):
    min_samples: PositiveInt


class RampStep(_Strict):
    traffic_pct: Annotated[float, Field(gt=0, lt=100, allow_inf_nan=False)]
    min_samples: PositiveInt

    @field_validator("traffic_pct", mode="wrap")
    @classmethod
    def _a_split_keeps_a_control_arm(cls, v: Any, handler: Any) -> float:
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= 100:
            raise ValueError(
                f"{v:g}: a split step must be below 100 (a split step needs a control arm to compare "
                "against; 100% is the promotion, not a step)"
            )
        return handler(v)


class TrafficSourceSpec(_Strict):
    """Where the pilot's requests come from (rollout.traffic): the dataset, or a request log."""

    kind: Literal["dataset", "request-log"] = "dataset"
    path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None  # request-log: .jsonl / .csv

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return v if v is None else no_nul(v)


class RolloutSpec(_Strict):
    shadow: ShadowSpec
    steps: Annotated[list[RampStep], Field(min_length=1)]
    batch_size: PositiveInt = 10
    traffic_source: TrafficSourceSpec = TrafficSourceSpec()


class Guardrails(_Strict):
    max_error_rate: Annotated[float, Field(gt=0, lt=1)] = 0.01
    max_error_rate_increase: Annotated[float, Field(gt=0, lt=1)] = 0.01
    p95_latency_ms: PositiveFloat | None = None
    # share of sparse-arm requests allowed over the latency SLO (p95 -> 0.05)
    max_latency_exceedance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    min_samples: PositiveInt = 30  # sparse-arm rows before a guardrail can be judged (capped by each step's)


class GateSpec(_Strict):
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    # use_case: the use case's pilots share alpha (pilot k's GO at alpha 6/(pi^2 k^2), rollout.gate.spending);
    # pilot: each pilot's GO at alpha on its own
    alpha_spending: Literal["use_case", "pilot"] = "use_case"
    non_inferiority_margin: Annotated[float, Field(gt=0, lt=1)]
    planned_effect: Annotated[float, Field(gt=-1, lt=1, allow_inf_nan=False)] = 0.0
    score_type: Literal["bounded", "binary"] = "bounded"  # planning: 0/1 scores or anywhere in [0, 1]
    planned_sd: Annotated[float, Field(gt=0, le=1)] | None = None  # planning; None = by score_type
    guardrails: Guardrails = Guardrails()
    max_duration_days: PositiveFloat = 14
    max_looks: PositiveInt = 20  # per pilot step


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        return validate_cron(v)

    @field_validator("timezone")
    @classmethod
    def _valid_tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')"
            ) from exc
        return v


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# an arm's timeouts: at most a day (a socket refuses ~1e10 s; "no timeout" is a day, not 10^12 s)
MAX_TIMEOUT_S = 86_400
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]


class ArmSpec(_Strict):
    """One pilot arm (docs/serving.md): the model in the flow's own process, or a served endpoint."""

    kind: Literal["in-process", "mlflow", "openai"] = "in-process"
    url: Annotated[str, Field(max_length=2000)] | None = None  # mlflow: server root; openai: API base (/v1)
    model: Annotated[str, Field(min_length=1, max_length=500)] | None = None  # openai: served model name
    api_key_env: str | None = None  # NAME of the environment variable holding a bearer token, never the token
    timeout_s: Timeout = 60.0  # per request, in all (rollout.arms.http)
    connect_timeout_s: Timeout = 5.0
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 4  # requests in flight to this arm

    @model_validator(mode="after")
    def _endpoint(self) -> ArmSpec:
        if self.kind == "in-process":
            extra = [f for f in ("url", "model", "api_key_env") if getattr(self, f) is not None]
            if extra:
                raise ValueError(
                    f"an in-process arm takes no {', '.join(extra)} (set kind: mlflow or openai)"
                )
            return self
        if not self.url or not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(
                f"a {self.kind} arm needs url: http(s)://host:port (got {redact(self.url or '')!r})"
            )
        why = url_problem(self.url)
        if why:
            raise ValueError(f"url {redact(self.url)!r} cannot be used: {why}")
        if self.kind == "openai" and not self.model:
            raise ValueError("an openai arm needs model: the name the server serves (its /v1/models id)")
        if self.kind == "mlflow" and self.model is not None:
            raise ValueError("an mlflow arm serves one model at its url; remove model")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(
                f"api_key_env must be the NAME of an environment variable (got {self.api_key_env!r}); "
                "never put the key itself in the spec"
            )
        return self


def url_problem(url: str) -> str | None:
    """Why an endpoint url that looks like http(s)://host... cannot be used by the arm's HTTP client
    (httpx), or None: refused when the spec is read, not as a raw exception when the pilot builds the arm."""
    import httpx

    if re.search(r"\s", url):
        return "it holds whitespace"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        return str(exc)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return f"port {parsed.port} is not in 1-65535"
    return None


_SECRET_QUERY_KEY = re.compile(r"key|token|secret|passw|pwd|auth|signature|sig$|credential", re.IGNORECASE)


def url_credentials(url: str) -> str | None:
    """What in an endpoint url looks like a credential (user info, a secret-looking query parameter), or
    None. A spec version is stored for good and shown to every viewer, so a key belongs in the
    environment variable `api_key_env` names, never in the url."""
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            return "user info (user:password@host)"
    except ValueError:  # a malformed port or bracket: not a credential question
        return None
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY_KEY.search(key):
            return f"the query parameter {key!r}"
    return None


class PilotArms(_Strict):
    control: ArmSpec = ArmSpec()  # the model that serves today (dense / champion)
    treatment: ArmSpec = ArmSpec()  # the sparse challenger


class PilotSpec(_Strict):
    arms: PilotArms = PilotArms()


class UseCaseSpec(_Strict):
    name: str = Field(description="slug: lowercase letters, digits and '-', 3-64 characters")
    owner: Annotated[str, Field(min_length=1, max_length=200)]
    criticality: Literal["low", "medium", "high"]
    description: Annotated[str, Field(max_length=2000)] = ""
    model: Annotated[str, Field(min_length=1, max_length=500)]
    dataset: DatasetSpec
    traffic: TrafficSpec
    quality_budget: QualityBudget = QualityBudget()
    latency_slo_ms: LatencySLO
    cost: CostSpec
    rollout: RolloutSpec
    gate: GateSpec
    rollback: Literal["auto", "manual"] = "manual"
    schedule: ScheduleSpec | None = None
    pilot: PilotSpec = PilotSpec()  # where the pilot's arms run (docs/serving.md)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.fullmatch(v):  # fullmatch: "$" would let a trailing newline through
            raise ValueError(
                f"{v!r} is not a slug: use 3-64 lowercase letters, digits and '-', starting with a letter"
            )
        if SECRET_LIKE_NAME.search(v):
            raise ValueError(
                f"{v!r} ends in a word that names a secret: messages say '{v}: ...', which reads as a "
                "secret's key and value, and the value would be masked (rollout.redact); choose another "
                "ending"
            )
        return v

    @field_validator("owner", "model")
    @classmethod
    def _visible(cls, v: str) -> str:
        if not has_visible_text(v):
            raise ValueError("must not be blank (spaces or invisible characters only)")
        return v

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        return no_nul(v)

    @field_validator("owner")
    @classmethod
    def _owner_is_a_line(cls, v: str) -> str:
        return _no_control_characters(v, "", "an owner is one line of text")

    @field_validator("description")
    @classmethod
    def _description_is_text(cls, v: str) -> str:
        return _no_control_characters(v, "\n\t", "line breaks and tabs are the only ones allowed")

    def dataset_path(self, spec_dir: Path | str) -> Path:
        """The dataset file, resolved against the directory of the spec that named it (realpath:
        a symlink loop gives a path that does not exist instead of an exception)."""
        p = Path(self.dataset.path).expanduser()
        return p if p.is_absolute() else Path(os.path.realpath(Path(spec_dir) / p))

    def with_model_resolved(self, spec_dir: Path | str) -> UseCaseSpec:
        """A model ref that is not a built-in name (``smollm2-135m``) is a path: a relative one
        (``./models/x``, ``models/x.gguf``, or a bare ``model`` naming a directory beside the spec) is
        resolved against the spec's directory, as ``dataset.path`` is, and stored absolute, so the stored
        spec works from any working directory (never against the working directory of ``usecase add``)."""
        from sparse_core import BUILTIN_MODELS  # torch-free: names only

        ref = self.model.strip()
        p = Path(ref).expanduser()
        if ref in BUILTIN_MODELS or p.is_absolute():
            return self
        return self.model_copy(update={"model": os.path.realpath(Path(spec_dir) / p)})

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON data. Fields added after specs were first stored (`_ADDED_LATER`) are left
        out while they hold their default, so an existing spec keeps its content hash (and version)."""
        d = self.model_dump(mode="json", exclude_none=False)
        for (*parents, name), default in _ADDED_LATER.items():
            holder = d
            for key in parents:
                holder = holder[key] if holder is not None else None
            if holder is not None and holder[name] == default:  # an absent optional section: nothing
                del holder[name]
        return d

    def content_hash(self, extra: str = "") -> str:
        """sha256 of the canonical JSON (formatting, comments and key order do not matter), plus
        ``extra`` (the dataset's own sha256 when stored, so a changed dataset is a changed use case)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((canonical + "\n" + extra).encode()).hexdigest()


# Fields added after specs were first stored, by path, with the JSON form of their default.
_ADDED_LATER: dict[tuple[str, ...], Any] = {
    ("pilot",): PilotSpec().model_dump(mode="json"),  # in-process arms
    ("quality_budget", "calibration", "drop_measure"): "mass",
    ("quality_budget", "decode", "confidence"): None,
    ("quality_budget", "decode", "sensitivity_prompts"): 2,
    ("quality_budget", "calibration", "confidence"): None,
    ("quality_budget", "calibration", "bound_unit"): "block",
    ("quality_budget", "calibration", "sensitivity_windows"): 0,
    ("quality_budget", "calibration", "task_rows"): None,
    ("quality_budget", "decode", "sensitivity_apart"): False,
    ("gate", "alpha_spending"): "use_case",
}


def validate_cron(expr: str) -> str:
    """Five-field cron (minute hour day-of-month month day-of-week), as Prefect schedules accept."""
    from cronsim import CronSim, CronSimError

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {expr!r} must have 5 fields (minute hour day month weekday), got {len(fields)}"
        )
    if any(f.upper() in {"R", "H"} for f in fields):
        raise ValueError(f"cron {expr!r}: random/hashed fields are not supported")
    try:
        CronSim(expr, dt.datetime(2026, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"cron {expr!r} is invalid: {exc}") from exc
    return " ".join(fields)


def _quantile_level(key: str) -> float:
    return float(_QUANTILE_KEY.match(key).group(1)) / 100  # type: ignore[union-attr]


def spec_warnings(spec: UseCaseSpec) -> list[tuple[str, str]]:
    """What is valid but will not do what the owner probably expects, as (field, message): a guardrail
    ceiling whose breach at DETECT_FACTOR x the ceiling the gate cannot stop with DETECT_POWER within the
    rows the pilot's steps plan (the largest `min_samples` of the shadow step and the ramp steps; the
    guardrails judge each step's own treatment rows). Exact (`rollout.gate.power`), not simulated."""
    from rollout.gate.power import DETECT_FACTOR, DETECT_POWER, neyman_pearson_rows, rows_to_detect

    steps = [("rollout.shadow", spec.rollout.shadow.min_samples)]
    steps += [(f"rollout.steps[{i}]", s.min_samples) for i, s in enumerate(spec.rollout.steps)]
    where, planned = max(steps, key=lambda s: s[1])
    guard = spec.gate.guardrails
    out = []
    for name, ceiling in (
        ("max_error_rate", guard.max_error_rate),
        ("max_latency_exceedance", guard.max_latency_exceedance),
    ):
        breach = DETECT_FACTOR * ceiling
        if breach >= 1:  # no rate can be that far above the ceiling
            continue
        need = rows_to_detect(ceiling, DETECT_FACTOR, DETECT_POWER, spec.gate.alpha)
        if need is not None and need <= planned:
            continue
        floor = neyman_pearson_rows(ceiling, DETECT_FACTOR, DETECT_POWER, spec.gate.alpha)
        after = f"~{need:,}" if need is not None else "more than 1,000,000"
        out.append(
            (
                f"gate.guardrails.{name}",
                f"{ceiling:g} — a breach at {DETECT_FACTOR:g}x ({100 * breach:.3g}%) is stopped with "
                f"{DETECT_POWER:.0%} power only after {after} treatment rows (no test can before "
                f"~{floor:,}); this pilot's steps plan at most {planned} ({where}.min_samples)",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Loading


def _yaml_kind(data: Any) -> str:
    """What a YAML document is, in YAML's words, not Python's ('a list', not 'list')."""
    if isinstance(data, list):
        return "a list"
    if isinstance(data, bool):
        return f"a boolean ({str(data).lower()})"
    if isinstance(data, int | float):
        return f"a number ({data!r})"
    if isinstance(data, str):
        return "a string" + (f" ({data!r})" if len(data) <= 40 else "")
    return f"a {type(data).__name__} value"


def parse_spec(data: Any, source: str = "<spec>") -> UseCaseSpec:
    """Validate an already-parsed mapping. Raises SpecError listing every problem."""
    if data is None:  # an empty file, or one of comments only (review U6: it said "got NoneType")
        raise SpecError(
            source, [("", "the spec file is empty (no YAML document); a spec is a mapping of fields")]
        )
    if not isinstance(data, dict):
        raise SpecError(
            source, [("", f"the spec must be a YAML mapping (name: value lines), got {_yaml_kind(data)}")]
        )
    data = _normalise_distributions(data)
    try:
        spec = UseCaseSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_describe(err) for err in exc.errors()]) from None
    problems = list(_cross_checks(spec))
    if problems:
        raise SpecError(source, problems)
    return spec


def load_spec(path: Path | str) -> UseCaseSpec:
    """Read and validate a spec file. Raises SpecError naming the file and field."""
    path = Path(path)
    source = str(path)
    try:
        if not path.is_file():
            raise SpecError(source, [("", "file not found (or not a regular file)")])
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(source, [("", f"{size} bytes; a spec may have at most {MAX_SPEC_BYTES}")])
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(source, [("", f"cannot read the file ({exc.strerror or exc})")]) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (as some editors write) is not content
    except UnicodeDecodeError as exc:
        raise SpecError(source, [("", f"not valid UTF-8 at byte {exc.start}")]) from None
    return parse_spec(parse_yaml(text, source), source)


def parse_yaml(text: str, source: str) -> Any:
    """SafeLoader with duplicate-key, depth and expansion limits; every failure is a SpecError."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [("", f"{where}YAML syntax error: {problem}")]) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. an integer of 5000 digits
        raise SpecError(source, [("", f"YAML value cannot be read: {_short(str(exc))}")]) from None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 40, 40, 4, 4, 2


def short_repr(value: Any) -> str:
    """A repr that costs little and stays short, whatever the value (never the whole input)."""
    return _REPR.repr(value)


# YAML 1.2's core schema: the only plain scalars read as booleans, integers and floats. PyYAML's
# SafeLoader resolves YAML 1.1's, where `yes`/`no`/`on`/`off` are booleans, `010` is octal (8), `1:30`
# sexagesimal (90) and `1_000` is 1000, silently; under these rules each of them is text, which the
# spec's strict validation refuses in a number's or a boolean's field, naming it (`_yaml11_reading`).
_CORE_SCHEMA = (
    ("tag:yaml.org,2002:bool", r"(?:true|True|TRUE|false|False|FALSE)\Z", "tTfF"),
    ("tag:yaml.org,2002:int", r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z",
        "-+.0123456789",
    ),
)


def _core_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    """SafeLoader's implicit resolvers (null, timestamp, merge, ...) with its YAML 1.1 booleans, integers
    and floats replaced by YAML 1.2 core schema's (`_CORE_SCHEMA`, integers before floats)."""
    replaced = {tag for tag, _, _ in _CORE_SCHEMA}
    table = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in replaced]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, pattern, firsts in _CORE_SCHEMA:
        for first in firsts:
            table.setdefault(first, []).append((tag, re.compile(pattern)))
    return table


def _yaml11_reading(value: Any) -> Any:
    """What YAML 1.1 (PyYAML's SafeLoader, the spec's reader before YAML 1.2's rules) makes of ``value``
    written plain where YAML 1.2 reads it as text: a boolean or a number (`1:30`: 90); else None."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        if not isinstance(yaml.load(value, Loader=_UniqueKeyLoader), str):  # a number to YAML 1.2 too
            return None
        read = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, OverflowError):
        return None
    return read if isinstance(read, bool | int | float) else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reads plain scalars by YAML 1.2's core schema (`_CORE_SCHEMA`, not 1.1's), and
    refuses a key given twice in one mapping (PyYAML keeps the last silently), an unhashable key,
    nesting deeper than MAX_YAML_DEPTH and a document that expands (through anchors and aliases) to
    more than MAX_YAML_NODES nodes: the checks run on the composed node graph, before any Python
    object is built."""

    yaml_implicit_resolvers = _core_resolvers()

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """YAML 1.2's integers: decimal (`010` is 10, never octal), `0o` octal, `0x` hexadecimal."""
        value = str(self.construct_scalar(node))
        if value.startswith(("0o", "0x")):
            return int(value[2:], 8 if value[1] == "o" else 16)
        return int(value)

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def expanded(n: Any) -> int:  # nodes after alias expansion, memoised per node
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = MAX_YAML_NODES + 1  # a cycle counts as too big
            children: list[Any] = []
            if isinstance(n, yaml.MappingNode):
                children = [c for pair in n.value for c in pair]
            elif isinstance(n, yaml.SequenceNode):
                children = list(n.value)
            total = 1
            for c in children:
                total += expanded(c)
                if total > MAX_YAML_NODES:
                    break
            sizes[id(n)] = min(total, MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if node is not None and expanded(node) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"expands to more than {MAX_YAML_NODES} values (anchors/aliases)", node.start_mark
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a plain value, not a {type(key).__name__}",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


class _SpecDumper(yaml.SafeDumper):
    """SafeDumper that quotes a string either YAML 1.1 or 1.2 would read as a boolean or a number
    (`"1e3"`, `"0o10"` are text to 1.1 and written plain by SafeDumper, numbers to the spec's 1.2 reader):
    what `dump_spec` writes reads back as the same value."""

    yaml_implicit_resolvers = {
        first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []), *core]
        for first, core in _core_resolvers().items()
    }


def dump_spec(data: dict[str, Any]) -> str:
    """A spec (or any of its parts) as YAML that the spec's reader (`parse_spec`, YAML 1.2's rules) reads
    back as the same values: `usecase show` prints it for a person to copy into a file."""
    return yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True)


def _normalise_distributions(data: dict[str, Any]) -> dict[str, Any]:
    """Accept the two short forms of a token distribution (a mapping of quantiles, a list of buckets)."""
    traffic = data.get("traffic")
    if not isinstance(traffic, dict):
        return data
    traffic = dict(traffic)
    for key in ("prompt_tokens", "output_tokens"):
        value = traffic.get(key)
        if isinstance(value, list):
            traffic[key] = {"buckets": value}
        elif isinstance(value, dict) and value and not ({"quantiles", "buckets"} & set(value)):
            traffic[key] = {"quantiles": value}
    return {**data, "traffic": traffic}


def _loc_to_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"quantiles", "buckets"} and out.endswith("_tokens"):
            continue  # the short forms hide this level from the author
        else:
            out += ("." if out else "") + str(part)
    return out


# pydantic's errors for a text given where a boolean or a number belongs (strict: never coerced)
_SCALAR_TYPES = {"bool_type", "int_type", "float_type", "bool_parsing", "int_parsing", "float_parsing"}


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    loc = tuple(err["loc"])
    path = _loc_to_path(loc)
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known fields: {', '.join(sorted(known))})"
        msg = f"unknown field{hint}"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind in {"model_type", "dict_type"}:
        if path.endswith("_tokens"):
            msg = "give quantiles ({p50: 5000, p90: 7000}) or buckets ([{tokens: 4096, share: 0.6}, ...])"
        else:
            msg = "must be a mapping of its fields"
        msg += f" (got {short_repr(err.get('input'))})"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    else:
        msg = msg[:1].lower() + msg[1:]
        if "input" in err and kind not in {"missing"}:
            shown = short_repr(err["input"])
            if len(shown) <= 60:
                msg += f" (got {shown})"
            was = _yaml11_reading(err["input"]) if kind in _SCALAR_TYPES else None
            if was is not None:
                shown_was = json.dumps(was)
                msg += (
                    f": a spec is read by YAML 1.2's rules, in which {err['input']} is text; YAML 1.1 "
                    f"would read it as {shown_was} (write {shown_was} if that is meant)"
                )
    return path, msg


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = UseCaseSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return []
        model = _inner_model(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _cross_checks(spec: UseCaseSpec) -> Iterable[tuple[str, str]]:
    """Rules between fields, reported with the path of the field to fix."""
    src = spec.rollout.traffic_source
    if (src.kind == "request-log") != (src.path is not None):
        yield (
            "rollout.traffic_source.path",
            "a request-log source needs a path (.jsonl or .csv)"
            if src.path is None
            else "only a request log has a path",
        )
    for key in ("prompt_tokens", "output_tokens"):
        dist: TokenDistribution = getattr(spec.traffic, key)
        path = f"traffic.{key}"
        if (dist.quantiles is None) == (dist.buckets is None):
            yield path, "give either quantiles ({p50: 5000, p90: 7000}) or buckets ([{tokens, share}, ...])"
            continue
        if dist.quantiles is not None:
            if not dist.quantiles:
                yield path, "at least one quantile is needed, e.g. {p50: 5000}"
                continue
            bad = [k for k in dist.quantiles if not _QUANTILE_KEY.match(k) or not 0 < _quantile_level(k) < 1]
            for k in bad:
                yield f"{path}.{k}", "quantile keys are p1..p99 (e.g. p50, p90, p99.9)"
            if bad:
                continue
            points = sorted((_quantile_level(k), k, v) for k, v in dist.quantiles.items())
            for (_, k0, v0), (_, k1, v1) in zip(points, points[1:], strict=False):
                if v1 < v0:
                    yield f"{path}.{k1}", f"must be at least {k0} ({v0}): quantiles cannot decrease"
        else:
            assert dist.buckets is not None
            if not dist.buckets:
                yield path, "at least one bucket is needed"
                continue
            total = sum(b.share for b in dist.buckets)
            if abs(total - 1) > 1e-6:
                yield path, f"bucket shares must sum to 1, they sum to {total:.6g}"
            seen: set[int] = set()
            for i, b in enumerate(dist.buckets):
                if b.tokens in seen:
                    yield f"{path}[{i}].tokens", f"{b.tokens} appears twice"
                seen.add(b.tokens)

    steps = spec.rollout.steps
    for i in range(1, len(steps)):
        if steps[i].traffic_pct <= steps[i - 1].traffic_pct:
            yield (
                f"rollout.steps[{i}].traffic_pct",
                f"must be greater than step {i - 1} ({steps[i - 1].traffic_pct:g}): ramp steps must increase",
            )
    for i, step in enumerate(steps):
        if step.min_samples < spec.rollout.batch_size:
            yield (
                f"rollout.steps[{i}].min_samples",
                f"{step.min_samples} is smaller than one pilot batch "
                f"(rollout.batch_size={spec.rollout.batch_size})",
            )
    if spec.rollout.shadow.min_samples < spec.rollout.batch_size:
        yield (
            "rollout.shadow.min_samples",
            f"{spec.rollout.shadow.min_samples} is smaller than one pilot batch "
            f"(rollout.batch_size={spec.rollout.batch_size})",
        )
    # max_looks counts per step (as the gate does): at one look per batch, each step must be able to reach
    # its minimum sample in its smaller arm within max_looks looks
    batch = spec.rollout.batch_size
    needs = [("rollout.shadow", math.ceil(spec.rollout.shadow.min_samples / batch))]
    for i, step in enumerate(steps):
        small = min(step.traffic_pct, 100 - step.traffic_pct) / 100
        needs.append((f"rollout.steps[{i}]", math.ceil(step.min_samples / (batch * small))))
    for where, looks in needs:
        if looks > spec.gate.max_looks:
            yield (
                "gate.max_looks",
                f"{spec.gate.max_looks} looks per step cannot reach {where}.min_samples at one look per "
                f"batch of {batch} (needs {looks})",
            )
    if spec.quality_budget.calibration.max_texts < 2:
        yield "quality_budget.calibration.max_texts", "at least 2 texts are needed (one is held out)"
