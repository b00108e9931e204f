"""The pilot host's load in the arms' latencies: which arms run on this host, and which of their answers
were timed while it was overloaded.

An arm runs on this host when it is in-process, or when it is an endpoint whose URL names this machine
(a loopback address, `localhost`, the host's own address: docs/serving.md's `http://127.0.0.1:5002`,
where `sparsepilot serve-model` binds by default). Such an arm's latency is slowed by every other process
on the host as the in-process model's is, so each of its answers is measured for the host's load
(`sparse_core.host.HostLoadMeter`, the rule of every timing) and its row is flagged `overloaded` when that
answer was: per answer, not per batch, so a busy spell over part of a batch flags the rows it slowed
(a batch's average hid 12 of 40 rows at twice their latency). An endpoint elsewhere does its work on its
own host: its rows are never flagged."""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from rollout.arms.base import Arm, ArmAnswer, ArmRequest


def runs_here(arm_spec: Any) -> bool:
    """True for an in-process arm and an endpoint served on this machine (`is_this_host`)."""
    if arm_spec.kind == "in-process":
        return True
    host = urlsplit(arm_spec.url or "").hostname
    return bool(host) and is_this_host(host)


def is_this_host(host: str) -> bool:
    """Whether `host` (a name or an address) resolves to this machine: a loopback or unspecified address,
    or one of its own addresses (one a socket can bind to). A name that does not resolve is not."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return any(_is_own_address(family, addr[0]) for family, _, _, _, addr in infos)


def _is_own_address(family: int, address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is not the address
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))  # only an address of this machine's interfaces can be bound
        return True
    except OSError:
        return False


class MeteredArm:
    """`arm`, each of whose answers is measured for the host's load; `overloaded(request_id)`: an answer to
    that request was timed while the host was overloaded (the control without a reference answers twice:
    either counts)."""

    def __init__(self, arm: Arm, threads: int | None = None) -> None:
        self.arm = arm
        self.label = arm.label
        self.max_concurrency = arm.max_concurrency
        self.threads = threads  # None: torch's threads when the answer ends (the pilot's thread policy)
        self._overloaded: dict[str, bool] = {}
        self._lock = threading.Lock()

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer:
        from sparse_core.host import HostLoadMeter

        with HostLoadMeter(threads=self.threads) as meter:
            res = self.arm.answer(
                request, task, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens
            )
        assert meter.load is not None
        with self._lock:
            rid = request.request_id
            self._overloaded[rid] = self._overloaded.get(rid, False) or meter.load.overloaded
        return res

    def overloaded(self, request_id: str) -> bool:
        with self._lock:
            return self._overloaded.get(request_id, False)

    def close(self) -> None:
        self.arm.close()


def metered(arm: Arm, arm_spec: Any) -> Arm:
    """The arm, measured per answer where it runs on this host (`runs_here`)."""
    return MeteredArm(arm) if runs_here(arm_spec) else arm


def flag_overloaded(rows: list[dict[str, Any]], arms: dict[str, Arm]) -> list[dict[str, Any]]:
    """Each row's `overloaded`: its arm's answer to its request was timed under overload (False for an arm
    not on this host, and for a row its arm never answered)."""
    for r in rows:
        arm = arms[r["arm"]]
        r["overloaded"] = isinstance(arm, MeteredArm) and arm.overloaded(r["request_id"])
    return rows
