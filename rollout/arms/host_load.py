"""The pilot host's load in the arms' latencies: which arms run on this host, and which of their answers
were timed while it was overloaded.

An arm runs on this host when it is in-process, or when it is an endpoint whose URL names this machine
(a loopback address, `localhost`, the host's own address: docs/serving.md's `http://127.0.0.1:5002`,
where `sparsepilot serve-model` binds by default). Such an arm's latency is slowed by every other process
on the host as the in-process model's is, so each of its answers is measured for the host's load
(`sparse_core.host.HostLoadMeter`, the rule of every timing) and its row is flagged `overloaded` when that
answer was: per answer, not per batch, so a busy spell over part of a batch flags the rows it slowed
(a batch's average hid 12 of 40 rows at twice their latency). An endpoint served here by another
process is measured as that process's work (`MeteredArm`: its CPU is the arm's own, its threads' waiting
decides). An endpoint elsewhere does its work on its own host: its rows are never flagged."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from rollout.arms.base import Arm, ArmAnswer, ArmRequest
from rollout.arms.endpoint_process import ServerProcesses
from sparse_core.host import NOT_THE_SERVER, NOT_VISIBLE, EndpointMeter, HostLoad, HostLoadMeter, InFlight

log = logging.getLogger(__name__)


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
    either counts).

    An endpoint on this host (`url`) served by ANOTHER process is measured as that process's work
    (`sparse_core.host.EndpointMeter`): the processes holding the socket listening on the url's port and
    their descendants (`rollout.arms.endpoint_process.ServerProcesses`: found at the first answer, again
    where the server restarted), whose CPU is the arm's own and whose threads' waiting decides. This
    process only waits on HTTP meanwhile: its own threads' few ms say nothing, and the server's cores
    counted as the others' flagged an idle host's answers. Where that process cannot be seen (another
    user's, another namespace) it is said once in the log and in each answer's load (`endpoint_note`), and
    only our own threads' waiting (over a floor) and the quota judge; so too where the listening process
    hardly ran while the others' cores would flag the answer (a port forwarder:
    `sparse_core.host.NOT_THE_SERVER`, said once in the log). Answers in flight at once (`max_concurrency`
    > 1) share the server's CPU by their overlap (`sparse_core.host.InFlight`), and the others' share of the
    server's CPUs judges them, not its threads' waiting for each other. An endpoint served by this very
    process (a server thread in it) is measured as an in-process arm is."""

    def __init__(self, arm: Arm, threads: int | None = None, url: str | None = None) -> None:
        self.arm = arm
        self.label = arm.label
        self.max_concurrency = arm.max_concurrency
        self.threads = threads  # None: torch's threads when the answer ends (the pilot's thread policy)
        self.url = url  # an endpoint's: its server's processes are measured as the arm's own
        self.loads: list[tuple[str, HostLoad]] = []  # (request id, its answer's load), in answer order
        self._overloaded: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._server = None if url is None else ServerProcesses(url)  # the listening socket's processes
        self._in_flight = InFlight()  # its answers in flight at once share the server's CPU

    def answer(
        self, request: ArmRequest, task: str, *, max_new_tokens: int, max_prompt_tokens: int | None
    ) -> ArmAnswer:
        with self._meter() as meter:
            res = self.arm.answer(
                request, task, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens
            )
        assert meter.load is not None
        if meter.load.endpoint_note == NOT_THE_SERVER and self.url is not None:
            _say_once(self.url, NOT_THE_SERVER_WARNING)
        with self._lock:
            rid = request.request_id
            self._overloaded[rid] = self._overloaded.get(rid, False) or meter.load.overloaded
            self.loads.append((rid, meter.load))
        return res

    def _meter(self) -> HostLoadMeter | EndpointMeter:
        if self._server is None:
            return HostLoadMeter(threads=self.threads)
        roots = self._server.roots()  # looked up again where the server restarted
        if os.getpid() in roots:  # served by a thread of this process
            return HostLoadMeter(threads=self.threads)
        if not roots:
            assert self.url is not None
            _say_once(self.url, NOT_VISIBLE_WARNING)
            return EndpointMeter(None, note=NOT_VISIBLE)
        return EndpointMeter(self._server.tree, in_flight=self._in_flight)

    def overloaded(self, request_id: str) -> bool:
        with self._lock:
            return self._overloaded.get(request_id, False)

    def close(self) -> None:
        self.arm.close()


NOT_VISIBLE_WARNING = (
    "%s: no process listening on its port is visible from here (another user's, or another namespace's, "
    "or the server is gone): the server's CPU cannot be told from the other processes' load, so its "
    "answers are flagged overloaded only from this process's own threads' waiting (docs/serving.md)"
)
NOT_THE_SERVER_WARNING = (
    "%s: the process listening on its port hardly ran while it answered (a port forwarder: ssh -L, "
    "kubectl port-forward, docker-proxy?): the model server's CPU cannot be told from the other processes' "
    "load, so such answers are flagged overloaded only from this process's own threads' waiting "
    "(docs/serving.md)"
)
_said: set[tuple[str, str]] = set()


def _say_once(url: str, warning: str) -> None:
    """A warning, once per url and process."""
    if (url, warning) not in _said:
        _said.add((url, warning))
        log.warning(warning, url)


def metered(arm: Arm, arm_spec: Any) -> Arm:
    """The arm, measured per answer where it runs on this host (`runs_here`); an endpoint's as its server
    process's work (`MeteredArm`)."""
    if not runs_here(arm_spec):
        return arm
    return MeteredArm(arm, url=None if arm_spec.kind == "in-process" else arm_spec.url)


def flag_overloaded(rows: list[dict[str, Any]], arms: dict[str, Arm]) -> list[dict[str, Any]]:
    """Each row's `overloaded`: its arm's answer to its request was timed under overload (False for an arm
    not on this host, and for a row its arm never answered)."""
    for r in rows:
        arm = arms[r["arm"]]
        r["overloaded"] = isinstance(arm, MeteredArm) and arm.overloaded(r["request_id"])
    return rows


def endpoint_notes(arms: dict[str, Arm]) -> str | None:
    """The notes of the arms' answers' loads (`HostLoad.endpoint_note`: an endpoint whose server process
    could not be seen), each once, with the arms it is of: "control, treatment: endpoint process not
    visible: ..." (the batch's load record, which the per-answer loads do not reach); None without any."""
    arms_of: dict[str, list[str]] = {}
    for name, arm in arms.items():
        if isinstance(arm, MeteredArm):
            for note in dict.fromkeys(load.endpoint_note for _, load in arm.loads if load.endpoint_note):
                arms_of.setdefault(note, []).append(name)
    return "; ".join(f"{', '.join(names)}: {note}" for note, names in arms_of.items()) or None
