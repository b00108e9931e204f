"""`SparsePlan`: the small, versioned, JSON-serialisable description of how a model's attention is
sparsified. It is the unit that calibration produces, the registry versions (by `content_hash`) and
`sparsify` consumes, so it validates itself eagerly and fails with messages that name the field."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sparse_core.errors import SparsePilotError

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
TENSORS_FILE = "plan_tensors.safetensors"
HASH_FILE = "plan.sha256"  # the content hash, beside plan.json
PLAN_DIR_FILES = frozenset({PLAN_FILE, TENSORS_FILE, HASH_FILE})  # all that `save_plan` writes

# Keys a per-layer override may set; per-head overrides set only tau.
LAYER_OVERRIDE_KEYS = ("tau", "sink_blocks", "local_blocks", "top_k", "min_density", "estimator", "sharpen")
SHARPEN_MAX = 8.0


class PlanError(SparsePilotError, ValueError):
    """An invalid sparse plan (bad field value, or a plan that does not fit the model)."""


class ModelRefError(SparsePilotError, ValueError):
    """A model reference that cannot be resolved or loaded; the message names the ref."""


DEFAULT_BLOCK_SIZE = 64  # tokens per attention block: a plan's, and calibration's, default


@dataclass(frozen=True)
class LayerParams:
    """The effective selection parameters for one layer, after overrides are applied."""

    layer_idx: int
    dense: bool
    estimator: str
    tau: float
    sink_blocks: int
    local_blocks: int
    top_k: int | None
    min_density: float | None
    head_tau: dict[int, float]  # query-head index -> tau, for heads that differ from `tau`
    sharpen: float = 1.0  # the estimate's power before selection (`selection.sharpen`)


@dataclass
class SparsePlan:
    """How to sparsify attention. Defaults are the recommended starting point for a 2k-8k context:
    on SmolLM2 at 2k tokens a 4-block (256-token) local window matters more than the estimator
    (pooled, tau 0.9: top-1 agreement 92.2% with 4 local blocks vs 85.1% with 1 at similar density),
    and tau 0.97 keeps agreement above 95% (docs/sparse_core.md).

    - ``tau``: per query block keep the fewest key blocks whose estimated attention mass reaches tau.
    - ``sink_blocks`` / ``local_blocks``: always kept (first blocks, and the diagonal window; >= 1).
    - ``top_k``: cap on key blocks per query block (sink and local blocks always kept even above it).
    - ``min_density``: floor on the fraction of causal blocks kept per query block.
    - ``sharpen``: raise the estimated mass to this power before selecting (`selection.sharpen`; 1.0,
      the default, leaves it as it is and is left out of the dict, so older plans keep their hash).
    - ``group_heads``: select once per KV head (mean of its query heads' scores; a per-head tau
      override applies as the max over the group). The kernels then share gathered K/V across the
      group, which matters on CPU where copying K/V costs as much as the arithmetic.
    - ``layer_overrides``: {layer: {key: value}} for keys in LAYER_OVERRIDE_KEYS.
    - ``head_overrides``: {layer: {query_head: tau}}.
    - ``dense_layers``: layers that keep dense attention.
    - ``decode``: optional `sparse_core.decode.DecodePlan` (or its dict): sparse reads of the KV cache
      in cached decode steps. None (the default, and every plan written before it existed): decode
      steps stay dense and the plan's dict and content hash are what they always were.
    - ``metadata``: free-form provenance (budget, data fingerprint, fidelity, densities,
      ``gate_weights``). Only ``metadata["gate_weights"]`` takes part in the content hash.
    - ``tensors``: named tensors that travel with the plan (e.g. learned gate weights), saved next to
      the JSON by `save_plan`; not part of `to_dict`.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    estimator: str = "pooled"
    tau: float = 0.97
    sink_blocks: int = 1
    local_blocks: int = 4
    top_k: int | None = None
    min_density: float | None = None
    group_heads: bool = True
    sharpen: float = 1.0
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    head_overrides: dict[int, dict[int, float]] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()
    decode: Any = None  # sparse_core.decode.DecodePlan | None
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layer_overrides = {int(k): dict(v) for k, v in (self.layer_overrides or {}).items()}
        self.head_overrides = {
            int(k): {int(h): float(t) for h, t in v.items()} for k, v in (self.head_overrides or {}).items()
        }
        self.dense_layers = tuple(sorted({int(x) for x in (self.dense_layers or ())}))
        self.metadata = dict(self.metadata or {})
        self.tensors = dict(self.tensors or {})
        if self.decode is not None:
            from sparse_core.decode.plan import DecodePlan

            self.decode = DecodePlan.from_value(self.decode)
        self._check()

    # -- validation -------------------------------------------------------------------------------
    def _check(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 16 or bs & (bs - 1):
            raise PlanError(f"plan.block_size must be a power of two >= 16, got {bs!r}")
        if not isinstance(self.group_heads, bool):
            raise PlanError(f"plan.group_heads must be true or false, got {self.group_heads!r}")
        if not isinstance(self.estimator, str) or not self.estimator:
            raise PlanError(f"plan.estimator must be a non-empty name, got {self.estimator!r}")
        _check_selection("plan", self.tau, self.sink_blocks, self.local_blocks, self.top_k, self.min_density)
        check_sharpen("plan", self.sharpen)
        for layer, merged in merged_overrides("plan", self.layer_overrides, LAYER_OVERRIDE_KEYS, self):
            if not isinstance(merged["estimator"], str) or not merged["estimator"]:
                raise PlanError(f"plan.layer_overrides[{layer}].estimator must be a non-empty name")
            check_sharpen(f"plan.layer_overrides[{layer}]", merged["sharpen"])
            _check_selection(
                f"plan.layer_overrides[{layer}]",
                merged["tau"],
                merged["sink_blocks"],
                merged["local_blocks"],
                merged["top_k"],
                merged["min_density"],
            )
        for layer, heads in self.head_overrides.items():
            if layer < 0:
                raise PlanError(f"plan.head_overrides: layer index must be >= 0, got {layer}")
            for head, tau in heads.items():
                if head < 0:
                    raise PlanError(f"plan.head_overrides[{layer}]: head index must be >= 0, got {head}")
                _check_tau(f"plan.head_overrides[{layer}][{head}]", tau)
        if any(x < 0 for x in self.dense_layers):
            raise PlanError(f"plan.dense_layers: layer indices must be >= 0, got {list(self.dense_layers)}")
        _check_metadata(self.metadata)

    def validate_for(self, config: Any) -> SparsePlan:
        """Check the plan fits a model config (HF `PretrainedConfig` or anything with the same fields).
        Returns self so it chains."""
        n_layers = _cfg(config, "num_hidden_layers")
        n_heads = _cfg(config, "num_attention_heads")
        name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", "model")
        check_layers_exist(
            "plan",
            {
                "layer_overrides": self.layer_overrides.keys(),
                "head_overrides": self.head_overrides.keys(),
                "dense_layers": self.dense_layers,
            },
            n_layers,
            name,
        )
        for layer, heads in self.head_overrides.items():
            bad = sorted(h for h in heads if h >= n_heads)
            if bad:
                raise PlanError(
                    f"plan.head_overrides[{layer}] names head(s) {bad} "
                    f"but {name} has {n_heads} attention heads"
                )
        if self.decode is not None:
            self.decode.validate_for(n_layers, name)
        expected = self.metadata.get("model_shape")
        if expected:
            actual = model_shape(config)
            mismatch = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
            if mismatch:
                detail = ", ".join(
                    f"{k}: plan {a!r} vs model {b!r}" for k, (a, b) in sorted(mismatch.items())
                )
                raise PlanError(f"plan was made for a different model ({detail})")
        # the architecture too: one of the same geometry (a Llama plan on a Qwen2) has other attention to
        # calibrate on; plans saved before the type was stamped have none and are not asked
        made_for, model_type = self.metadata.get("model_type"), getattr(config, "model_type", None)
        if made_for and model_type and made_for != model_type:
            raise PlanError(
                f"plan was made for a {made_for!r} model (metadata.model_type), not {model_type!r} ({name})"
            )
        # the weights: a plan's per-head thresholds are calibrated to one model's attention, and another
        # of the same geometry and type (a fine-tune updated in place) needs its own calibration; plans
        # saved before the fingerprint was stamped, and models loaded without one, are not asked
        made_on, weights = (
            self.metadata.get("model_fingerprint"),
            getattr(config, "weights_fingerprint", None),
        )
        if isinstance(made_on, str) and isinstance(weights, str) and made_on != weights:
            raise PlanError(
                f"plan was calibrated on other weights (metadata.model_fingerprint {made_on[:19]}...) than "
                f"{name} has ({weights[:19]}...): calibrate a plan for this model"
            )
        return self

    # -- effective parameters -----------------------------------------------------------------------
    def layer_params(self, layer_idx: int) -> LayerParams:
        ov = self.layer_overrides.get(layer_idx, {})
        return LayerParams(
            layer_idx=layer_idx,
            dense=layer_idx in self.dense_layers,
            estimator=ov.get("estimator", self.estimator),
            tau=float(ov.get("tau", self.tau)),
            sink_blocks=int(ov.get("sink_blocks", self.sink_blocks)),
            local_blocks=int(ov.get("local_blocks", self.local_blocks)),
            top_k=ov.get("top_k", self.top_k),
            min_density=ov.get("min_density", self.min_density),
            head_tau=dict(self.head_overrides.get(layer_idx, {})),
            sharpen=float(ov.get("sharpen", self.sharpen)),
        )

    def with_(self, **changes: Any) -> SparsePlan:
        """A copy with some fields changed (validated); tensors are shared."""
        return replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "estimator": self.estimator,
            "tau": self.tau,
            "sink_blocks": self.sink_blocks,
            "local_blocks": self.local_blocks,
            "top_k": self.top_k,
            "min_density": self.min_density,
            "group_heads": self.group_heads,
            "layer_overrides": {str(k): dict(v) for k, v in sorted(self.layer_overrides.items())},
            "head_overrides": {
                str(k): {str(h): t for h, t in sorted(v.items())}
                for k, v in sorted(self.head_overrides.items())
            },
            "dense_layers": list(self.dense_layers),
            "metadata": self.metadata,
        }
        if self.sharpen != 1.0:  # absent otherwise: older plans keep their dict and hash
            d["sharpen"] = self.sharpen
        if self.decode is not None:  # absent otherwise: older plans keep their dict and hash
            d["decode"] = self.decode.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "plan") -> SparsePlan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise PlanError(f"{source}: format_version must be an integer, got {version!r}")
        if version != FORMAT_VERSION:
            raise PlanError(
                f"{source}: unsupported format_version {version!r} (this build reads {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)} - {"tensors"}
        unknown = sorted(set(data) - known - {"format_version"})
        if unknown:
            raise PlanError(f"{source}: unknown field(s) {unknown}")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{source}: malformed plan ({exc})") from None

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> SparsePlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    def content_hash(self) -> str:
        """sha256 over what changes behaviour: every selection field plus the gate-weights reference,
        and the weights the plan was calibrated on (metadata.model_fingerprint, when stamped: the same
        thresholds on other weights are another plan, which `validate_for` accepts on those weights
        only; plans without it keep their hash). Other provenance metadata (fidelity, data fingerprints,
        densities) does not change the hash."""
        d = self.to_dict()
        meta = d.pop("metadata")
        d["gate_weights"] = meta.get("gate_weights")
        if meta.get("model_fingerprint"):
            d["model_fingerprint"] = meta["model_fingerprint"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def model_shape(config: Any) -> dict[str, int]:
    """The attention geometry a plan depends on; stored in plan metadata by calibration."""
    n_heads = _cfg(config, "num_attention_heads")
    hidden = _cfg(config, "hidden_size")
    return {
        "num_hidden_layers": _cfg(config, "num_hidden_layers"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or n_heads),
        "head_dim": int(getattr(config, "head_dim", None) or hidden // n_heads),
    }


def save_plan(plan: SparsePlan, directory: str | Path) -> Path:
    """Write plan.json (+ plan_tensors.safetensors when the plan carries tensors) atomically into
    `directory`. The tensors file's sha256 is recorded in metadata["gate_weights"] so it is hashed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if plan.tensors:
        from safetensors.torch import save_file

        tmp = directory / f".{TENSORS_FILE}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in plan.tensors.items()}, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, directory / TENSORS_FILE)
        plan.metadata["gate_weights"] = {"file": TENSORS_FILE, "sha256": digest, "keys": sorted(plan.tensors)}
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".plan.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        fh.write(plan.to_json())
    os.replace(tmp_name, directory / PLAN_FILE)
    # the content hash beside it, which `plan_io.load` checks (every saved plan carries one: the
    # registry's artifacts too, so a registered plan loads through the CLI's --plan)
    (directory / HASH_FILE).write_text(
        json.dumps({"content_hash": plan.content_hash(), "format_version": FORMAT_VERSION}) + "\n"
    )
    return directory / PLAN_FILE


def load_plan(path: str | Path, config: Any = None) -> SparsePlan:
    """Read a plan from a directory (or a plan.json path); validate against `config` when given."""
    file = plan_file(path)
    plan = read_plan_json(file)
    load_tensors(plan, file)
    if config is not None:
        validate_plan_for(plan, config, file)
    return plan


def plan_file(path: str | Path) -> Path:
    """The plan.json of a plan directory (or the path itself when it names a file)."""
    path = Path(path)
    file = path / PLAN_FILE if path.is_dir() else path
    if not file.is_file():
        raise PlanError(f"no sparse plan at {file}")
    return file


def read_plan_json(file: Path) -> SparsePlan:
    """The plan in `file` without its tensors; a PlanError naming the file for anything that is not a
    plan.json (binary or non-UTF-8 bytes, bad JSON, a field of the wrong type)."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{file}: not a plan.json (not UTF-8 text)") from None
    except OSError as exc:
        raise PlanError(f"{file}: unreadable ({exc.strerror or exc})") from None
    return SparsePlan.from_json(text, source=str(file))


def load_tensors(plan: SparsePlan, file: Path) -> SparsePlan:
    """Read the tensors `plan.metadata["gate_weights"]` names (a file beside `file`), check their sha256
    and keep them on the plan."""
    ref = plan.metadata.get("gate_weights")
    if not ref:
        return plan
    tfile = file.parent / ref.get("file", TENSORS_FILE)
    if not tfile.is_file():
        raise PlanError(f"{file}: metadata.gate_weights names {tfile.name}, which is missing")
    blob = tfile.read_bytes()
    if ref.get("sha256") and hashlib.sha256(blob).hexdigest() != ref["sha256"]:
        raise PlanError(f"{tfile}: sha256 does not match the plan (corrupt or replaced weights)")
    from safetensors.torch import load as st_load

    try:
        plan.tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for bad bytes
        raise PlanError(f"{tfile}: unreadable safetensors ({exc})") from None
    return plan


def validate_plan_for(plan: SparsePlan, config: Any, file: Path | str) -> SparsePlan:
    """`plan.validate_for(config)`, its error naming the plan file (a user evaluating several plans
    can tell which one does not fit)."""
    try:
        return plan.validate_for(config)
    except PlanError as exc:
        raise PlanError(f"{file}: {exc}") from None


def _check_metadata(meta: dict[str, Any]) -> None:
    """The metadata fields the plan reads: `gate_weights` (an object naming a file in the plan's own
    directory) and `model_shape` (an object of integers)."""
    ref = meta.get("gate_weights")
    if ref is not None:
        if not isinstance(ref, dict):
            raise PlanError(f"plan.metadata.gate_weights must be an object, got {type(ref).__name__}")
        name = ref.get("file", TENSORS_FILE)
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise PlanError(
                f"plan.metadata.gate_weights.file must be a file name in the plan's directory, got {name!r}"
            )
        if ref.get("sha256") is not None and not isinstance(ref["sha256"], str):
            raise PlanError("plan.metadata.gate_weights.sha256 must be a string")
    shape = meta.get("model_shape")
    if shape is not None and not isinstance(shape, dict):
        raise PlanError(f"plan.metadata.model_shape must be an object, got {type(shape).__name__}")


def _cfg(config: Any, name: str) -> int:
    value = getattr(config, name, None)
    if value is None and isinstance(config, dict):
        value = config.get(name)
    if value is None:
        raise PlanError(f"model config has no {name!r}; cannot validate the plan against it")
    return int(value)


def merged_overrides(
    where: str, overrides: dict[int, dict], keys: Sequence[str], base: Any
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Per overridden layer, the effective value of every key (the override's, else `base`'s);
    PlanError for a negative layer index or a key outside `keys`."""
    for layer, ov in overrides.items():
        if layer < 0:
            raise PlanError(f"{where}.layer_overrides: layer index must be >= 0, got {layer}")
        unknown = sorted(set(ov) - set(keys))
        if unknown:
            raise PlanError(
                f"{where}.layer_overrides[{layer}]: unknown key(s) {unknown}; allowed: {list(keys)}"
            )
        yield layer, {k: ov.get(k, getattr(base, k)) for k in keys}


def check_layers_exist(where: str, named: dict[str, Iterable[int]], n_layers: int, model: str) -> None:
    """PlanError when a field (name -> layer indices) names a layer the model does not have."""
    for what, layers in named.items():
        bad = sorted(x for x in layers if x >= n_layers)
        if bad:
            raise PlanError(
                f"{where}.{what} names layer(s) {bad} but {model} has {n_layers} layers (0..{n_layers - 1})"
            )


def _check_tau(where: str, tau: Any) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or not 0.0 < tau <= 1.0:
        raise PlanError(f"{where}.tau must be in (0, 1], got {tau!r}")


def check_sharpen(where: str, power: Any) -> None:
    """PlanError naming `where` unless `power` is a number in (0, SHARPEN_MAX]."""
    if (
        isinstance(power, bool)
        or not isinstance(power, (int, float))
        or not math.isfinite(power)
        or not 0.0 < power <= SHARPEN_MAX
    ):
        raise PlanError(f"{where}.sharpen must be a number in (0, {SHARPEN_MAX:g}], got {power!r}")


def _check_selection(where: str, tau: Any, sink: Any, local: Any, top_k: Any, min_density: Any) -> None:
    _check_tau(where, tau)
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise PlanError(f"{where}.sink_blocks must be an integer >= 0, got {sink!r}")
    if not isinstance(local, int) or isinstance(local, bool) or local < 1:
        raise PlanError(f"{where}.local_blocks must be an integer >= 1 (the diagonal block), got {local!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise PlanError(f"{where}.top_k must be None or an integer >= 1, got {top_k!r}")
    if min_density is not None and (
        isinstance(min_density, bool)
        or not isinstance(min_density, (int, float))
        or math.isnan(min_density)
        or not 0.0 <= min_density <= 1.0
    ):
        raise PlanError(f"{where}.min_density must be None or in [0, 1], got {min_density!r}")
