"""The `openai` arm: any server with the OpenAI-compatible `/v1/completions` API (vLLM, TGI, llama.cpp
server, SGLang, LiteLLM, ...). docs/serving.md shows how to point it at a serving stack.

* Text tasks (`exact_match`, `contains`, `rouge_l`): a greedy completion (`temperature: 0`,
  `max_tokens` = the pilot's answer length) scored against the reference.
* `loglik`: the probability of the reference after the prompt from the server's prompt log-probabilities
  (`echo: true, logprobs: 1, max_tokens: 0` on prompt + " " + reference; `max_tokens: 1` where a server
  refuses 0 with HTTP 400): the reference's tokens are those whose text offset lies past the prompt. A
  server that answers without prompt log-probabilities does not support the task: that is an
  `ArmConfigError` (the pilot stops with that message) rather than a stream of error observations that
  would blame the challenger. Use a text task for such a server.

`api_key_env` names the environment variable with the bearer token (LiteLLM, hosted gateways)."""

from __future__ import annotations

from typing import Any

from rollout.arms.base import ArmAnswer, ArmConfigError, ArmRequest, failed, loglik_quality, score_output
from rollout.arms.http import HttpArm
from rollout.validation import MAX_TOKENS


class OpenAIArm(HttpArm):
    kind = "openai"

    def __init__(self, url: str, model: str, **endpoint: Any) -> None:
        super().__init__(url, **endpoint)
        self.model = model
        self.label += f" (model {model})"
        self._echo_max_tokens = 0  # prompt log-probabilities without generating (1 where a server needs it)

    def check(self) -> None:
        """Before a batch: the server is reachable, answers the OpenAI API at `url`, and, where it lists its
        models, serves `model`. A 404, a redirect or a server error from GET {url}/models is a configuration
        problem (a url without /v1, an http url behind an https gateway): every request would fail the same
        way, and that is no evidence against the model. Only a 200 whose body is not a model list, or
        another client error, means the server does not list its models."""
        resp = self.http.probe("/models", "is the server running?")
        status = resp.status_code
        if status == 404:
            raise self.http.unhealthy(
                "/models",
                resp,
                "no OpenAI-compatible API at this url: url is the API base, /v1 included "
                "(e.g. http://host:8000/v1)",
            )
        if resp.is_redirect:
            raise self.http.unhealthy(
                "/models",
                resp,
                "the server redirects, and the pilot does not follow redirects: put the url it redirects "
                "to (https, /v1 included) in the spec",
            )
        if status >= 500:
            raise self.http.unhealthy("/models", resp, "the server fails; see its log")
        try:
            served = [str(m["id"]) for m in resp.json()["data"]] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is not None and self.model not in served:
            raise ArmConfigError(
                f"pilot.arms.{self.role}: {self.http.base_url} does not serve model {self.model!r}; "
                f"it serves {served[:10]}"
            )

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer:
        if task == "loglik":
            return self._loglik(request)
        reply = self.http.post(
            "/completions",
            {
                "model": self.model,
                "prompt": request.prompt,
                "max_tokens": int(max_new_tokens),
                "temperature": 0,
                "n": 1,
                "stream": False,
            },
        )
        if reply.error:
            return failed(task, request.reference, reply.latency_ms, reply.error)
        try:
            text = reply.body["choices"][0]["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            return failed(task, request.reference, reply.latency_ms, f"malformed completion: {exc!r}")
        quality = score_output(task, text, request.reference) if request.reference else 0.0
        return ArmAnswer(quality, reply.latency_ms, _tokens(reply.body), False, text)

    def _loglik(self, request: ArmRequest) -> ArmAnswer:
        ref = request.reference.strip()
        if not ref:
            raise ArmConfigError("loglik needs a reference; the pilot asks for a completion first")
        full = request.prompt + " " + ref
        payload = {
            "model": self.model,
            "prompt": full,
            "max_tokens": self._echo_max_tokens,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
            "stream": False,
        }
        reply = self.http.post("/completions", payload)
        if reply.status == 400 and self._echo_max_tokens == 0:
            # Some servers (vLLM versions among them) refuse max_tokens=0; one generated token is then
            # asked for and ignored (it lies past the reference). Remembered for this arm.
            self._echo_max_tokens = 1
            reply = self.http.post("/completions", {**payload, "max_tokens": 1})
        if reply.error:
            return failed("loglik", ref, reply.latency_ms, reply.error)
        try:
            choice = reply.body["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            return failed("loglik", ref, reply.latency_ms, f"malformed completion: {exc!r}")
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        offsets = lp.get("text_offset") if isinstance(lp, dict) else None
        values = lp.get("token_logprobs") if isinstance(lp, dict) else None
        echoed = (
            isinstance(offsets, list)
            and isinstance(values, list)
            and len(offsets) == len(values)
            and any(isinstance(o, int) and o < len(full) for o in offsets)
        )
        if not echoed:
            raise ArmConfigError(
                f"pilot.arms.{self.role}: {self.label} returned no prompt log-probabilities for "
                "echo=true, logprobs=1, which the loglik task needs (vLLM returns them; llama.cpp's server "
                "does not): use a text task (rouge_l, contains, exact_match) with this server"
            )
        try:
            picked = reference_logprobs(offsets, values, len(request.prompt), len(full))
            quality = loglik_quality(picked)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an offset of Infinity
            return failed("loglik", ref, reply.latency_ms, f"malformed prompt log-probabilities: {exc}")
        return ArmAnswer(quality, reply.latency_ms, _tokens(reply.body), False, "")


def reference_logprobs(
    offsets: list[Any], values: list[Any], prompt_chars: int, total_chars: int
) -> list[float]:
    """The log-probabilities of the tokens that carry the reference: those ending past the prompt (a token
    straddling the boundary holds reference text) and starting inside prompt + reference (tokens a server
    generated anyway are not the reference)."""
    ends = [int(o) for o in offsets[1:]] + [total_chars]
    out = []
    for start, end, v in zip(offsets, ends, values, strict=True):
        if end > prompt_chars and int(start) < total_chars:
            if v is None:
                raise ValueError(f"no log-probability for the reference token at offset {start}")
            out.append(float(v))
    if not out:
        raise ValueError("no reference tokens in the echoed prompt")
    return out


def _tokens(body: Any) -> int:
    """The tokens the server says it used, or 0 where it does not say so usably: the figure is the
    server's account, not evidence about the model, so an absurd one (not a count, or beyond
    `MAX_TOKENS`, which the batch's data check refuses) must not cost the pilot its batch."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    try:
        total = usage.get("total_tokens")
        if total is None:
            total = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
        count = int(total)
    except (TypeError, ValueError, OverflowError):
        return 0
    return count if 0 <= count <= MAX_TOKENS else 0
