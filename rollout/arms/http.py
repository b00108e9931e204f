"""The HTTP client the endpoint arms share: one pooled `httpx.Client` per arm, at most `max_concurrency`
requests in flight (a semaphore, and the pool's size), the spec's timeouts, a bearer token read from the
environment variable the spec names.

`post` never raises for what a server or the network does: a status >= 400, a timeout, a refused or
dropped connection and a body that is not JSON all come back as a `Reply` with `error` set, and the latency
the client waited (measured here, after the semaphore: queueing inside this process is not the server's
latency). Only configuration problems raise `ArmConfigError`."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from rollout.arms.base import ArmConfigError
from rollout.redact import redact

MAX_ERROR_BODY = 300


@dataclass(frozen=True)
class Reply:
    body: Any  # the parsed JSON (None on error)
    latency_ms: float
    error: str | None = None  # what went wrong, for the log: "HTTP 503: ...", "timed out after 30s", ...
    status: int | None = None


class HttpEndpoint:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        max_concurrency: int,
        api_key_env: str | None = None,
        arm: str = "arm",
    ) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "sparsepilot-pilot"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ArmConfigError(
                    f"{arm}: api_key_env names the environment variable {api_key_env!r}, which is not set "
                    "(or empty) in the pilot's environment"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.arm = arm
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=float(connect_timeout_s)),
            limits=httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            ),
            follow_redirects=False,
        )

    def post(self, path: str, payload: dict[str, Any]) -> Reply:
        """POST `payload` as JSON. The request has `timeout_s` in all: the answer is read as it arrives
        and cut off once `timeout_s` has passed since the request was sent (a server that keeps dripping
        bytes, a stalled proxy sending keep-alives), so no request holds a worker, and the use case's
        lease, for long. httpx's own timeouts bound each wait for a byte (a silent server), so a request
        that stalls just before its deadline ends within 2 x `timeout_s`."""
        with self._slots:
            t0 = time.perf_counter()
            deadline = t0 + self.timeout_s
            try:
                with self._client.stream("POST", path, content=json.dumps(payload)) as resp:
                    parts = []
                    for part in resp.iter_bytes():
                        parts.append(part)
                        if time.perf_counter() > deadline:
                            return Reply(None, _ms(t0), self._timed_out("the answer was still arriving"))
                    body_bytes = b"".join(parts)
            except httpx.TimeoutException as exc:
                return Reply(None, _ms(t0), self._timed_out(type(exc).__name__))
            except httpx.HTTPError as exc:  # refused, reset, DNS, protocol errors
                return Reply(None, _ms(t0), f"{type(exc).__name__}: {exc}")
            latency = _ms(t0)
            if time.perf_counter() > deadline:
                return Reply(None, latency, self._timed_out("the answer was complete too late"))
        if resp.status_code >= 400:
            text = body_bytes.decode("utf-8", "replace")[:MAX_ERROR_BODY]
            return Reply(None, latency, f"HTTP {resp.status_code}: {text}", resp.status_code)
        try:
            return Reply(json.loads(body_bytes), latency, None, resp.status_code)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, 5000-digit numbers, deep nesting
            return Reply(
                None, latency, f"malformed JSON from {path}: {str(exc)[:MAX_ERROR_BODY]}", resp.status_code
            )

    def _timed_out(self, how: str) -> str:
        return f"timed out after {self.timeout_s:g}s ({how})"

    def probe(self, path: str, hint: str) -> httpx.Response:
        """GET `path` before a batch: an unreachable server or refused credentials is a configuration
        problem (ArmConfigError naming the arm), not evidence against a model. Any other status returns:
        what it means is the arm's to judge (`unhealthy`)."""
        with self._slots:
            try:
                resp = self._client.get(path)
            except httpx.HTTPError as exc:
                raise ArmConfigError(
                    f"{self.arm}: cannot reach {self.base_url}{path} ({type(exc).__name__}: {exc}); {hint}"
                ) from None
        if resp.status_code in (401, 403):
            raise ArmConfigError(
                f"{self.arm}: {self.base_url} refused the credentials (HTTP {resp.status_code}); "
                "set api_key_env to the name of the variable holding the key"
            )
        return resp

    def unhealthy(self, path: str, resp: httpx.Response, why: str) -> ArmConfigError:
        """The configuration error for a probe whose status says the endpoint cannot serve the pilot."""
        where = resp.headers.get("location")
        to = f" to {redact(where)[:200]}" if where and resp.is_redirect else ""
        return ArmConfigError(
            f"{self.arm}: GET {redact(self.base_url + path)} answered HTTP {resp.status_code}{to}: {why}"
        )

    def close(self) -> None:
        self._client.close()


def _ms(t0: float) -> float:
    return max((time.perf_counter() - t0) * 1000.0, 0.001)


class HttpArm:
    """What the endpoint arms share: the pooled endpoint, the arm's role in messages, its concurrency."""

    kind = "http"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_concurrency: int = 4,
        api_key_env: str | None = None,
        role: str = "arm",
    ) -> None:
        self.role = role
        self.http = HttpEndpoint(
            url,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_concurrency=max_concurrency,
            api_key_env=api_key_env,
            arm=f"pilot.arms.{role}",
        )
        self.max_concurrency = self.http.max_concurrency
        self.label = f"{self.kind} {self.http.base_url}"

    def close(self) -> None:
        self.http.close()
