"""What the gate accepts: the observation table, checked column by column, and its fingerprint.

`check_observations` never raises on bad data: it returns the cleaned table, or the problems, each naming
the column, so that `decide` can answer INVALID with the reason instead of crashing the flow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from rollout.validation import ARMS

REQUIRED_COLUMNS = ("request_id", "arm", "quality", "latency_ms", "error")


@dataclass(frozen=True)
class Checked:
    # cleaned rows in arrival order (+ bool `treated`, `overloaded`; `request_code`: the request's number
    # in order of first appearance); None on problems
    frame: pd.DataFrame | None
    problems: tuple[str, ...]  # "column 'quality': ..." messages; empty when the table is usable


def _rows(mask: np.ndarray | pd.Series, index: pd.Index) -> str:
    where = index[np.asarray(mask)][:5].tolist()
    return f"{int(np.asarray(mask).sum())} row(s), e.g. at rows {where}"


def check_observations(observations: object, *, mode: str) -> Checked:
    """Validate the rows of one step (in arrival order). Problems: not a table, an empty table, a missing
    column, a missing value, NaN/inf, quality outside [0, 1], latency <= 0, an error flag that is not 0/1,
    an unknown arm, a repeated (request_id, arm), and in a split step a request in both arms. An optional
    `overloaded` column (0/1) marks rows collected while the host's CPU was oversubscribed. A column named
    twice is a problem too: which of the two counts is not known."""
    if not isinstance(observations, pd.DataFrame):
        return Checked(None, (f"observations must be a pandas DataFrame, got {type(observations).__name__}",))
    missing = [c for c in REQUIRED_COLUMNS if c not in observations.columns]
    if missing:
        return Checked(None, (f"missing column(s): {', '.join(missing)}",))
    named = [str(c) for c in observations.columns]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        return Checked(None, (f"column(s) named twice: {', '.join(twice)}; which one counts is not known",))
    if observations.empty:
        return Checked(None, ("no observations: the table is empty",))
    df = observations.loc[:, list(REQUIRED_COLUMNS)].reset_index(drop=True)
    problems: list[str] = []
    for col in REQUIRED_COLUMNS:
        nulls = df[col].isna().to_numpy()
        if nulls.any():
            problems.append(f"column {col!r}: missing/NaN value in {_rows(nulls, df.index)}")
    numeric: dict[str, np.ndarray] = {}
    for col in ("quality", "latency_ms"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        unparsable = np.isnan(values) & df[col].notna().to_numpy()
        if unparsable.any():
            problems.append(f"column {col!r}: not a number in {_rows(unparsable, df.index)}")
        inf = np.isinf(values)
        if inf.any():
            problems.append(f"column {col!r}: infinite value in {_rows(inf, df.index)}")
        numeric[col] = values
    with np.errstate(invalid="ignore"):
        q, lat = numeric["quality"], numeric["latency_ms"]
        outside = np.isfinite(q) & ((q < 0) | (q > 1))
        if outside.any():
            problems.append(f"column 'quality': outside [0, 1] in {_rows(outside, df.index)}")
        non_positive = np.isfinite(lat) & (lat <= 0)
        if non_positive.any():
            problems.append(f"column 'latency_ms': zero or negative in {_rows(non_positive, df.index)}")
    overloaded = np.zeros(len(df), bool)
    if "overloaded" in observations.columns:  # optional: rows collected while the host was overloaded
        flag = observations["overloaded"].reset_index(drop=True)
        ok = flag.isin([0, 1, True, False]).to_numpy()
        if not ok.all():
            problems.append(f"column 'overloaded': not 0/1 or true/false in {_rows(~ok, df.index)}")
        else:
            overloaded = flag.astype(bool).to_numpy()
    err = df["error"]
    if err.dtype != bool:
        ok = err.isin([0, 1, True, False]).to_numpy() | err.isna().to_numpy()
        if not ok.all():
            problems.append(f"column 'error': not 0/1 or true/false in {_rows(~ok, df.index)}")
    arm_col = df["arm"]
    treated = (arm_col == "treatment").to_numpy(dtype=bool, na_value=False)
    unknown = (
        ~(treated | (arm_col == "control").to_numpy(dtype=bool, na_value=False)) & arm_col.notna().to_numpy()
    )
    if unknown.any():
        names = sorted({str(a) for a in arm_col[unknown]})[:5]
        problems.append(f"column 'arm': unknown arm(s) {names} in {_rows(unknown, df.index)}")
    rid = df["request_id"] if pd.api.types.is_string_dtype(df["request_id"]) else df["request_id"].astype(str)
    all_new = mode == "split" and rid.is_unique
    if all_new:
        # A split step's requests are each in one arm once: every id new, numbered as factorize would (and
        # hashing for uniqueness alone is cheaper than numbering); neither check below can fail.
        rid_code = np.arange(len(rid))
    else:
        rid_code, uniques = pd.factorize(rid)
        key = (rid_code + 1) * 2 + treated  # a missing id (code -1, reported above) is its own value
        dup = np.bincount(key)[key] > 1
        if dup.any():
            problems.append(
                f"column 'request_id': repeated within an arm in {_rows(dup, df.index)} "
                "(every request is evidence once)"
            )
    if mode == "split" and not all_new:
        n_req, known = len(uniques), rid_code >= 0  # missing ids are reported above
        has_t = np.bincount(rid_code[treated & known], minlength=n_req) > 0
        has_c = np.bincount(rid_code[~treated & known], minlength=n_req) > 0
        in_both = (has_t & has_c)[rid_code] & ~treated & known
        if in_both.any():
            problems.append(
                f"column 'request_id': {int(in_both.sum())} request(s) appear in both arms of a split step, "
                f"e.g. {rid[in_both].head(3).tolist()}; a split step assigns each request "
                "to one arm (shadow data belongs to the shadow step)"
            )
    if problems:
        return Checked(None, tuple(problems))
    clean = pd.DataFrame(
        {
            "request_id": rid,
            "arm": pd.Categorical.from_codes(treated.astype(np.int8), categories=list(ARMS)),
            "quality": q,
            "latency_ms": lat,
            "error": err.astype(bool).to_numpy(),
            "treated": treated,
            "overloaded": overloaded,
            "request_code": rid_code,
        }
    )
    return Checked(clean, ())


def data_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 over the rows in arrival order (the order is part of the evidence: the confidence sequence
    is computed along it): the request ids and arms as text, the numbers by their exact bits."""
    h = hashlib.sha256()
    for col in REQUIRED_COLUMNS:
        if col not in frame.columns:
            continue
        values = frame[col]
        h.update(f"{col}:{len(values)}\n".encode())
        if col in ("quality", "latency_ms") and pd.api.types.is_float_dtype(values):
            h.update(np.ascontiguousarray(values.to_numpy(dtype="<f8")).tobytes())
        elif col == "error" and pd.api.types.is_bool_dtype(values):
            h.update(np.ascontiguousarray(values.to_numpy(dtype=bool)).tobytes())
        elif col == "arm" and isinstance(values.dtype, pd.CategoricalDtype):
            h.update(np.ascontiguousarray(values.cat.codes.to_numpy(dtype=np.int8)).tobytes())
        else:
            _update_text(h, values)
    return h.hexdigest()


def _update_text(h, values: pd.Series) -> None:
    """Feed a column's text to the hash: the values as text joined by the unit separator (0x1F), UTF-8.
    Arrow-backed strings (pandas 3's default `str`) give those bytes from their buffers, without Python
    objects; any other storage joins them in Python. Both give the same bytes, so a fingerprint does not
    depend on how pandas stores the column (under pandas 2, object columns took the second way)."""
    try:
        import pyarrow as pa

        arr = pa.chunked_array(values.array.__arrow_array__()).combine_chunks()
        if (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) and arr.null_count == 0:
            arr = arr.cast(pa.large_string())
            offsets = np.frombuffer(arr.buffers()[1], dtype="<i8")[arr.offset : arr.offset + len(arr) + 1]
            text = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            # the separators go before every value but the first: one vectorised insert
            h.update(np.insert(text, offsets[1:-1] - offsets[0], 0x1F).tobytes())
            return
    except (AttributeError, TypeError, ImportError):
        pass
    # str() of each value, as pandas 2's astype(str) of an object column gave (a missing one: "nan", "None")
    h.update("\x1f".join(map(str, values.astype(object).tolist())).encode("utf-8", "surrogatepass"))


def srm_test(n_control: int, n_treatment: int, planned_treatment_share: float) -> tuple[float, float]:
    """The arm counts against the planned split: (Pearson's chi-square statistic, for information; the
    p-value of the exact two-sided binomial test of the sparse-arm count). The exact test's false rate is
    at most the level at every count, where chi-square's is not at the few rows of an early look at a
    small share (docs/gate.md "Sample-ratio mismatch")."""
    total = n_control + n_treatment
    if total == 0:
        return 0.0, 1.0
    exp_t = total * planned_treatment_share
    exp_c = total - exp_t
    chi2 = (n_control - exp_c) ** 2 / exp_c + (n_treatment - exp_t) ** 2 / exp_t
    p = stats.binomtest(int(n_treatment), int(total), float(planned_treatment_share)).pvalue
    return float(chi2), float(min(1.0, p))
