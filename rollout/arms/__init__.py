"""Pilot arms: where the control and treatment models answer a pilot's requests (docs/serving.md).

One module per kind, like the metric providers of progressive-delivery tools:
* `base`          - the protocol (`Arm`: one request in, an `ArmAnswer` out: score, client latency, error
                    flag), the scoring of an answer, and `ArmConfigError`;
* `inprocess`     - the model in the flow's own process (the default; what the embedded main job uses);
* `http`          - the shared HTTP client: pooled connections, bounded concurrency, timeouts, errors as
                    answers;
* `mlflow_server` - a pyfunc scoring server (`mlflow models serve`, POST /invocations);
* `openai`        - any OpenAI-compatible `/v1/completions` server (vLLM, TGI, llama.cpp, SGLang, LiteLLM);
* `factory`       - `build_arm`: the arm a spec's `pilot.arms.<role>` describes, checked before use;
* `step`          - one pilot batch through two arms (shadow: both; split: one arm per request);
* `host_load`     - which arms run on this host (in-process, or an endpoint whose url names this
                    machine) and which of their answers were timed while it was overloaded;
* `serve`         - `mlflow models serve` for a registered version (`sparsepilot serve-model`).

Nothing here imports torch at module level: the HTTP arms work in a process without a model.
"""

from rollout.arms.base import Arm, ArmAnswer, ArmConfigError, ArmRequest, score_output
from rollout.arms.factory import build_arm, uses_endpoints
from rollout.arms.step import run_batch

__all__ = [
    "Arm",
    "ArmAnswer",
    "ArmConfigError",
    "ArmRequest",
    "build_arm",
    "run_batch",
    "score_output",
    "uses_endpoints",
]
