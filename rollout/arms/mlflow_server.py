"""The `mlflow` arm: a registered SparsePilot version served by MLflow's pyfunc scoring server
(`sparsepilot serve-model NAME --alias challenger`, i.e. `mlflow models serve -m
models:/sparsepilot-NAME@challenger --env-manager local`), one version per server.

Requests go to POST {url}/invocations, one prompt each (latency is per request):
* text tasks: `{"inputs": [prompt], "params": {"mode": "generate", "max_new_tokens": N}}` -> the greedy
  completion, scored against the reference here;
* `loglik`: `{"inputs": [prompt], "params": {"mode": "loglik", "reference": reference}}` -> the mean
  log-probability of the reference's tokens after the prompt (rollout.pyfunc_model), whose exp is the
  task's quality, computed by the same function as the in-process arm.
The server's answer is `{"predictions": [...]}`; anything else is an error observation."""

from __future__ import annotations

import math
from typing import Any

from rollout.arms.base import ArmAnswer, ArmConfigError, ArmRequest, failed, score_output
from rollout.arms.http import HttpArm

# a mean log-likelihood is <= 0; above 0 by no more than float rounding it is 0 (quality 1), beyond that
# the server is broken, and its answer an error observation as a NaN is (rollout.arms.base.usable)
LOGLIK_ROUNDING = 1e-6


class MlflowServerArm(HttpArm):
    kind = "mlflow"

    def check(self) -> None:
        """Before a batch: the scoring server is up and its model loaded (MLflow's scoring server answers
        GET /ping with 200 once the model is loaded, 404 when it failed to load). Any other answer is a
        configuration problem: every request would fail, and that is no evidence against the model."""
        resp = self.http.probe("/ping", "start it with `sparsepilot serve-model NAME --alias ALIAS`")
        if resp.status_code != 200:
            raise self.http.unhealthy(
                "/ping",
                resp,
                "the scoring server is up but its model is not loaded (MLflow answers /ping with 200 once "
                "it is); see the server's log, or check that url is the scoring server's root",
            )

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer:
        if task == "loglik":
            ref = request.reference.strip()
            if not ref:
                raise ArmConfigError("loglik needs a reference; the pilot asks for a completion first")
            payload: dict[str, Any] = {
                "inputs": [request.prompt],
                "params": {"mode": "loglik", "reference": ref},
            }
        else:
            payload = {
                "inputs": [request.prompt],
                "params": {"mode": "generate", "max_new_tokens": int(max_new_tokens)},
            }
        reply = self.http.post("/invocations", payload)
        if reply.error:
            return failed(task, request.reference, reply.latency_ms, reply.error)
        try:
            value = reply.body["predictions"][0]
        except (KeyError, IndexError, TypeError) as exc:
            return failed(task, request.reference, reply.latency_ms, f"malformed predictions: {exc!r}")
        if task == "loglik":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return failed(task, request.reference, reply.latency_ms, f"score is not a number: {value!r}")
            if value > LOGLIK_ROUNDING:  # a probability above 1: the server is broken, not the model perfect
                return failed(task, request.reference, reply.latency_ms, f"log-likelihood above 0: {value!r}")
            return ArmAnswer(min(1.0, math.exp(float(value))), reply.latency_ms, 0, False, "")
        if not isinstance(value, str):
            return failed(task, request.reference, reply.latency_ms, f"completion is not text: {value!r}")
        quality = score_output(task, value, request.reference) if request.reference else 0.0
        return ArmAnswer(quality, reply.latency_ms, 0, False, value)
