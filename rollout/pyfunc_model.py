"""The MLflow pyfunc a registered SparsePilot version loads as: base model + sparse plan.

No weights are logged: the model version carries the base model ref and the plan (JSON, plus the gate
tensors when the plan has them), and `load_context` loads the base model with `sparse_core.load_model`
and applies the plan with `sparse_core.sparsify`. sparse_core (torch) is imported lazily so logging and
registering stay cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PLAN_ARTIFACT = "plan"
INFO_ARTIFACT = "sparsepilot"  # sparsepilot.json: base model ref, plan hash, use case
MODES = ("generate", "score", "loglik")


class SparsePilotModel(mlflow.pyfunc.PythonModel):
    """predict(prompts) -> generated text (mode='generate', greedy, max_new_tokens), the mean
    per-token log-likelihood of each prompt under the sparse model (mode='score'), or the mean
    log-likelihood of `params.reference` after each prompt (mode='loglik': the pilot's `loglik` task over
    HTTP, computed by the same function as the in-process arm, sparse_core.tasks.score_request)."""

    # predict() takes a DataFrame, a list, a dict or one string and checks its prompts itself
    # (`_prompts`): type hints would make MLflow coerce inputs, and without them MLflow warns "Add type
    # hints to the `predict` method" each time the class is made, i.e. on every load of a version. This
    # is the switch MLflow's own ChatModel uses to skip its type-hint wrapping (mlflow/pyfunc/model.py).
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import sparse_core

        info = json.loads(Path(context.artifacts[INFO_ARTIFACT]).read_text())
        self.info = info
        self.model, self.tokenizer = sparse_core.load_model(info["base_model_ref"])
        self.model.eval()
        plan = sparse_core.load_plan(context.artifacts[PLAN_ARTIFACT], config=self.model.config)
        if plan.content_hash() != info["plan_hash"]:
            raise ValueError(
                f"plan artifact hash {plan.content_hash()} does not match "
                f"the registered plan_hash {info['plan_hash']}"
            )
        sparse_core.sparsify(self.model, plan)
        self.plan = plan

    @staticmethod
    def _prompts(model_input: Any) -> list[str]:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if "prompt" in model_input.columns:
                values = model_input["prompt"].tolist()
            elif model_input.shape[1] == 1:
                values = model_input.iloc[:, 0].tolist()
            else:
                raise ValueError(f"input needs a 'prompt' column, got columns {list(model_input.columns)}")
        elif isinstance(model_input, str):
            values = [model_input]
        elif isinstance(model_input, dict) and "prompt" in model_input:
            p = model_input["prompt"]
            values = [p] if isinstance(p, str) else list(p)
        else:
            values = list(model_input)
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v:
                raise ValueError(f"prompt {i} must be a non-empty string, got {v!r}")
        return values

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow reads hints as schema
        import torch

        from sparse_core import paged_cache_kwargs

        params = params or {}
        mode = params.get("mode", "generate")
        if mode not in MODES:
            raise ValueError(f"params.mode must be one of {MODES}, got {mode!r}")
        max_new = int(params.get("max_new_tokens", 32))
        if mode == "loglik":
            return self._loglik(self._prompts(model_input), params.get("reference"))
        out: list[Any] = []
        with torch.inference_mode():
            for prompt in self._prompts(model_input):
                enc = self.tokenizer(prompt, return_tensors="pt")
                if mode == "score":
                    ids = enc["input_ids"]
                    if ids.shape[1] < 2:
                        raise ValueError("mode='score' needs prompts of at least two tokens")
                    logits = self.model(**enc).logits[:, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                    out.append(float(logp.mean()))
                else:
                    gen = self.model.generate(
                        **enc,
                        **paged_cache_kwargs(self.model),  # appends without re-copying the cache
                        max_new_tokens=max_new,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                    )
                    out.append(
                        self.tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                    )
        return out

    def _loglik(self, prompts: list[str], reference: Any) -> list[float]:
        import math

        from sparse_core.tasks import score_request

        if not isinstance(reference, str) or not reference.strip():
            raise ValueError(
                "mode='loglik' needs params.reference, a non-empty string (a version registered "
                "before this mode existed drops the param: register it again)"
            )
        return [
            math.log(max(score_request(self.model, self.tokenizer, p, reference, "loglik").quality, 1e-300))
            for p in prompts
        ]
