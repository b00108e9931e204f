"""The pilot gate: pure statistics, no I/O (docs/gate.md has the method, its guarantees and measurements).

One idea per module:
* `settings`   - GateSettings, the thresholds (from a use-case spec);
* `sequences`  - the math: anytime-valid confidence sequences for bounded means, by betting;
* `quality`    - the step's observations as a bounded stream, and the GO / futility tests on it;
* `guardrails` - guardrails as data (named checks) judged by the same kind of sequential test;
* `detection`  - the monitor's change detector: its checks over any number of looks;
* `power`      - the exact power of the guardrails' rate test (what a ceiling can detect);
* `planning`   - planned (simulated) and projected sample sizes;
* `spending`   - the GO level of a use case's k-th pilot (alpha spent across its pilots);
* `inputs`     - what the gate accepts (never raises on bad data), the fingerprint, the SRM test;
* `evidence`   - GateHistory, QualityEvidence, Decision (stored verbatim as the decision's evidence);
* `decide`     - one look at one step -> GO / EXTEND / NO-GO / INVALID;
* `explain`    - the paragraph a business owner reads.
"""

from rollout.gate.decide import decide
from rollout.gate.evidence import Decision, GateHistory, Mode, Outcome, QualityEvidence, running_intersection
from rollout.gate.explain import explain
from rollout.gate.guardrails import (
    Guardrail,
    GuardrailCheck,
    guardrail_checks,
    judge,
    judge_all,
    judge_monitor,
)
from rollout.gate.inputs import ARMS, REQUIRED_COLUMNS, check_observations, data_fingerprint, srm_test
from rollout.gate.planning import SamplePlan, planned_sample_size, projected_sample_size
from rollout.gate.settings import GateSettings

__all__ = [
    "ARMS",
    "REQUIRED_COLUMNS",
    "Decision",
    "GateHistory",
    "GateSettings",
    "Guardrail",
    "GuardrailCheck",
    "Mode",
    "Outcome",
    "QualityEvidence",
    "SamplePlan",
    "check_observations",
    "data_fingerprint",
    "decide",
    "explain",
    "guardrail_checks",
    "judge",
    "judge_all",
    "judge_monitor",
    "planned_sample_size",
    "projected_sample_size",
    "running_intersection",
    "srm_test",
]
