"""`bench quality` on a tiny model: every estimator spec gets a row per length and per use case, at
the same budget, with the ratio to the best training-free estimator and the measured columns."""

from __future__ import annotations

import json

import pytest

from sparse_core.bench.quality import (
    QualityBenchSettings,
    UseCaseData,
    default_specs,
    plot,
    run_quality_bench,
)
from sparse_core.corpus import CorpusError, corpus_texts, pack_token_windows, timing_window
from sparse_core.errors import SparsePilotError
from sparse_core.estimators import available_estimators
from sparse_core.plan_io import load
from sparse_core.tasks import TaskRow

SPECS = default_specs()
TRAINING_FREE = available_estimators("training-free")


def test_quality_bench_compares_every_estimator_at_one_budget(quality_tiny_dir, quality_texts, tmp_path):
    rows = [TaskRow(prompt=t[:3000], reference=t[3000:3100]) for t in quality_texts if len(t) > 3200][:9]
    settings = QualityBenchSettings(
        model=str(quality_tiny_dir),
        budget="kl=0.05,agree=0.5",
        estimators=SPECS,
        lengths=(512,),
        max_texts=4,
        gate_steps=10,
        heldout_tokens=512,
        usecases=(UseCaseData("tiny-qa", tuple(rows), "loglik"),),
        usecase_length=512,
        max_task_rows=2,
        plans_dir=str(tmp_path / "plans"),
    )
    out = run_quality_bench(settings)
    json.dumps(out, allow_nan=False)  # strict JSON
    (block,) = out["by_length"]
    assert [r["estimator"] for r in block["rows"]] == list(SPECS)
    # timed on a window of the labelled length; the held-out windows' true lengths are recorded
    assert block["speed_tokens"] == 512 and block["heldout_window_tokens"] == [512]
    assert all(0 < r["speed_density"] <= 1 for r in block["rows"])
    free = [r for r in block["rows"] if r["estimator"] in TRAINING_FREE and r["met_budget"]]
    best = min(r["density"] for r in free)
    best_measured = min(r["measured_density"] for r in free)
    for r in block["rows"]:
        assert r["best_training_free_density"] == best
        assert r["best_training_free_measured_density"] == best_measured
        assert 0 < r["measured_density"] <= 1 and r["speedup"] > 0 and r["n_positions"] > 0
        assert isinstance(r["overloaded"], bool)  # the host's load around the row's two timings
        if r["met_budget"]:
            assert r["ratio_vs_best_training_free"] == best / r["density"]
            assert r["measured_ratio_vs_best_training_free"] == best_measured / r["measured_density"]
        # the search's record: the step the plan came from is the sparsest that passed
        passed = [st for st in r["search"] if st["passed"]]
        assert r["search"] and (not passed) == (not r["met_budget"])
        if passed:
            chosen = max(passed, key=lambda st: st["eps"])
            assert chosen["fidelity"]["agree"] == r["calib_agree"]
            # what it kept on calibration's held-out windows, beside the planned density
            assert r["calib_measured_density"] == chosen["density"]
        else:
            assert r["calib_measured_density"] == 1.0  # the all-dense plan
    seconds = {r["estimator"]: r["gate_seconds"] for r in block["rows"]}
    assert seconds["gate"] > 0 and seconds["pooled"] is None  # a training time for learned rows only
    (uc,) = out["usecases"]
    assert uc["usecase"] == "tiny-qa" and len(uc["rows"]) == len(SPECS)
    assert all(r["task"] == "loglik" and r["task_rows"] == 2 for r in uc["rows"])
    assert out["settings"]["usecases"] == ["tiny-qa"] and out["environment"]["loadavg_before"]
    assert out["environment"]["host_load"]["seconds"] > 0  # what the other processes did during the run
    for group, rows_of in (("512", block["rows"]), ("tiny-qa", uc["rows"])):
        for r in rows_of:  # every plan saved, and it is the one the row measured
            saved = load(tmp_path / "plans" / group / r["estimator"])
            assert saved.metadata["estimator"] == r["estimator"] and saved.metadata["density"] == r["density"]
    png = plot(out, tmp_path / "quality.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_quality_bench_passes_its_tau_grid_and_powers_to_calibration(quality_tiny_dir, tmp_path):
    settings = QualityBenchSettings(
        model=str(quality_tiny_dir),
        budget="kl=0.05,agree=0.5",
        estimators=("pooled",),
        lengths=(512,),
        max_texts=4,
        heldout_tokens=512,
        speed=False,
        taus=(0.6, 0.9, 0.999),
        sharpen=(1.0, 2.0),
        plans_dir=str(tmp_path / "plans"),
    )
    out = run_quality_bench(settings)
    assert out["settings"]["taus"] == [0.6, 0.9, 0.999] and out["settings"]["sharpen"] == [1.0, 2.0]
    cal = load(tmp_path / "plans" / "512" / "pooled").metadata["calibration"]
    assert cal["taus"] == [0.6, 0.9, 0.999] and cal["sharpen"] == [1.0, 2.0]


def test_a_timing_window_has_the_length_it_is_labelled_with(quality_tiny):
    _, tok = quality_tiny
    assert len(timing_window(tok, 700)) == 700
    assert timing_window(tok, 700, seed=3) != timing_window(tok, 700)
    # the held-out part alone runs out before a long window: packing it silently gives fewer tokens
    held = pack_token_windows(tok, corpus_texts("heldout"), 10**7, 1)
    assert 0 < len(held[0]) < 10**7
    with pytest.raises(CorpusError, match="fewer than the 10000000 asked"):  # the CLI: one line, exit 2
        timing_window(tok, 10**7)
    assert issubclass(CorpusError, SparsePilotError) and issubclass(CorpusError, ValueError)


def test_a_rows_speed_columns_come_from_its_own_dense_prefills() -> None:
    from sparse_core.bench.quality import speed_fields

    f = speed_fields(0.030, 0.020, 0.018, 0.002)
    assert f["dense_seconds"] == 0.018 and f["prefill_seconds"] == 0.020
    assert f["speedup"] == pytest.approx(0.9)
    assert f["estimator_share"] == pytest.approx(0.002 / 0.018)  # over the dense time, as in every bench


def test_each_row_is_timed_against_the_dense_prefills_around_it(quality_tiny_dir, monkeypatch, tmp_path):
    """The dense time grows through the run (the host got busier): every row is divided by the faster
    of its own two dense prefills, not by the fastest dense prefill of the rows before it."""
    from sparse_core.bench import quality
    from sparse_core.retrofit import is_sparsified

    calls: list[tuple[str, float]] = []

    def fake(model, ids) -> float:  # noqa: ANN001
        arm = "sparse" if is_sparsified(model) else "dense"
        calls.append((arm, 0.01 * (len(calls) + 1) * (2 if arm == "sparse" else 1)))
        return calls[-1][1]

    monkeypatch.setattr(quality, "_time_prefill", fake)
    settings = QualityBenchSettings.quick(
        model=str(quality_tiny_dir),
        budget="kl=0.05,agree=0.5",
        estimators=("pooled", "quest", "oracle"),
        lengths=(256,),
        max_texts=4,
        usecases=(),
        plans_dir=str(tmp_path / "plans"),
    )
    (block,) = run_quality_bench(settings)["by_length"]
    sparse_at = [i for i, (arm, _) in enumerate(calls) if arm == "sparse"]
    assert len(sparse_at) == len(block["rows"]) == 3
    for r, i in zip(block["rows"], sparse_at, strict=True):
        assert calls[i - 1][0] == calls[i + 1][0] == "dense"
        assert r["dense_seconds"] == min(calls[i - 1][1], calls[i + 1][1])
        assert r["prefill_seconds"] == calls[i][1] and r["speedup"] == r["dense_seconds"] / calls[i][1]
