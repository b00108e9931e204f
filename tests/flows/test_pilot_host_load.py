"""Review s48 L1/L2: a pilot arm served on this host (an endpoint on loopback, docs/serving.md's own
`http://127.0.0.1:5002`) is slowed by the host's overload as the in-process model is, but only in-process
rows were flagged `overloaded`, so a busy host breached the latency guardrail (a NO-GO, or the monitor's
automatic rollback); and the flag was the whole batch's average, so a busy spell over part of a batch
flagged none of the rows it slowed. Real HTTP on loopback (an OpenAI-compatible stdlib server in this
process), a real busy process sharing our CPU, the real meter (sparse_core.host)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rollout.arms.host_load import is_this_host, runs_here
from rollout.spec import ArmSpec, parse_spec
from sparse_core.host import snapshot
from tests.fixtures.flows import tiny_spec


def _own_address() -> str | None:
    """An address of this machine's interfaces other than loopback (no packet is sent), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize(
    ("url", "here"),
    [
        ("http://127.0.0.1:5002", True),
        ("http://127.8.9.10:5002/v1", True),
        ("http://localhost:5001", True),
        ("http://[::1]:5002/v1", True),
        ("http://0.0.0.0:5002", True),
        ("http://own-address:5002", True),
        ("http://192.0.2.1:5002/v1", False),  # TEST-NET-1: never this machine's
    ],
)
def test_an_endpoint_whose_url_names_this_machine_runs_here(url: str, here: bool) -> None:
    if "own-address" in url:
        own = _own_address()
        if own is None:
            pytest.skip("no address other than loopback on this machine")
        url = url.replace("own-address", own)
    assert runs_here(ArmSpec(kind="openai", url=url, model="m")) is here
    assert runs_here(ArmSpec()) and not is_this_host("")  # in-process runs here; no host is not here


COMPLETION = json.dumps({"choices": [{"text": "print"}]})


@contextmanager
def busy_loopback_server(neighbour: subprocess.Popen | None, stop_listening_after: int = 0) -> Iterator[str]:
    """An OpenAI-compatible server on 127.0.0.1 that does ~25 ms of CPU work per completion; a prompt
    starting "busy" has `neighbour` (stopped otherwise) spin on our CPU while it works. With
    `stop_listening_after`, it closes its listening socket before answering that many GETs (the arms'
    probes): it answers on the connections open then, and no process is seen to serve its url."""
    probes: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            return None

        def _send(self, body: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            probes.append(1)
            if len(probes) == stop_listening_after:
                server.shutdown()
                server.socket.close()
            self._send('{"object": "list", "data": [{"id": "m"}]}')

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
            busy = neighbour is not None and prompt.startswith("busy")
            if busy:
                os.kill(neighbour.pid, signal.SIGCONT)
            t = time.thread_time()
            while time.thread_time() - t < 0.025:  # the model's work: CPU, slowed by whatever shares it
                pass
            if busy:
                os.kill(neighbour.pid, signal.SIGSTOP)
            self._send(COMPLETION)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _endpoint_pilot(url: str) -> tuple[Any, dict[str, Any]]:
    """A shadow step's context and info whose two arms are the OpenAI-compatible endpoint at `url`."""
    from flows.common import UseCaseContext

    arms = {role: {"kind": "openai", "url": url, "model": "m"} for role in ("control", "treatment")}
    base = tiny_spec(Path("/models/tiny"))
    base["dataset"]["task"] = "contains"
    spec = parse_spec({**base, "pilot": {"arms": arms}})
    ctx = UseCaseContext("host-load", 1, spec, 1, "h", Path("/nowhere"), rows=[])
    return ctx, {"kind": "shadow", "salt": "s", "traffic_pct": 50.0}


def test_a_batch_leaves_the_callers_torch_threads_as_it_found_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """answer_measured (the pilot's and the monitor's batch) sets torch's threads from the CPUs really
    free for the batch; the caller's own count (one more than this machine has CPUs: never the policy's
    choice) stayed overridden after it returned."""
    import torch

    import flows.pilot as pilot_module
    from flows.arms import answer_with_arms

    monkeypatch.setattr(pilot_module, "answer_batch", answer_with_arms)  # without its Prefect task wrapper
    before = torch.get_num_threads()
    mine = (os.cpu_count() or 1) + 1
    torch.set_num_threads(mine)
    try:
        with busy_loopback_server(None) as url:
            ctx, info = _endpoint_pilot(url)
            rows, _, load = pilot_module.answer_measured(
                ctx, info, [("r0", {"prompt": "quiet", "reference": "print"})], 4, None
            )
        assert torch.get_num_threads() == mine and load.threads < mine
    finally:
        torch.set_num_threads(before)
    assert len(rows) == 2 and not any(r["error"] for r in rows), rows


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_rows_of_an_endpoint_on_this_host_are_flagged_per_answer_timed_under_overload(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both arms behind an endpoint on 127.0.0.1; a busy process shares our CPU only while request 0 is
    answered (1 of 6: the batch's average stays under the limit on a quiet host). Its two rows are
    flagged (they were never, as an endpoint's); the warning says the batch had rows timed under
    overload. The other rows' flags are their own answers' (on a busy host they may be flagged too)."""
    import flows.pilot as pilot_module
    from flows.arms import answer_with_arms

    if snapshot().run_ns is None:
        pytest.skip("no schedstat on this kernel")
    cpu = max(os.sched_getaffinity(0))
    mask = os.sched_getaffinity(0)
    # its own session: its own scheduling group, so it takes half of the CPU from our whole process
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"], start_new_session=True)
    os.sched_setaffinity(neighbour.pid, {cpu})
    os.kill(neighbour.pid, signal.SIGSTOP)
    os.sched_setaffinity(0, {cpu})
    try:
        with busy_loopback_server(neighbour) as url:
            ctx, info = _endpoint_pilot(url)
            requests = [
                (f"r{i}", {"prompt": f"{'busy' if i == 0 else 'quiet'} {i}", "reference": "print"})
                for i in range(6)
            ]
            # the flow's own batch function, without its Prefect task wrapper
            monkeypatch.setattr(pilot_module, "answer_batch", answer_with_arms)
            rows, void, load = pilot_module.answer_measured(ctx, info, requests, 4, None)
    finally:
        os.sched_setaffinity(0, mask)
        neighbour.kill()
        neighbour.wait()
    flags = {(r["request_id"], r["arm"]): r["overloaded"] for r in rows}
    assert len(flags) == 12 and not any(r["error"] for r in rows) and not void, (rows, void)
    assert flags[("r0", "control")] and flags[("r0", "treatment")], flags
    with caplog.at_level(logging.WARNING):
        here = pilot_module.arms_on_this_host(ctx)
        pilot_module.warn_if_overloaded(logging.getLogger("test"), "host-load", rows, load, here)
    assert here == ["control", "treatment"]
    flagged = sum(flags.values())
    assert "host-load: host overloaded during the batch (others busy on" in caplog.text
    assert f"{flagged} of 12 rows were timed under overload" in caplog.text


BOTH = ["control", "treatment"]


@pytest.mark.parametrize(
    ("url", "flagged", "said", "judged"),
    [
        ("http://192.0.2.1:5002/v1", 0, "both arms answer from other hosts, where the load is their own: "
         "every row counts for the latency guardrail", (2, 0, [])),
        ("http://127.0.0.1:5002/v1", 0, "no row was timed under overload (it fell between the answers of the "
         "arms on this host: control, treatment)", (2, 0, BOTH)),
        ("http://127.0.0.1:5002/v1", 1, "1 of 2 rows were timed under overload", (1, 1, BOTH)),
    ],
)  # fmt: skip
def test_an_overloaded_batch_says_what_its_latencies_give_the_gate(
    url: str, flagged: int, said: str, judged: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose arms answer from other hosts, on a pilot host overloaded throughout: no row is
    flagged (the host's load reaches a remote arm's latency only client-side), and the log said "it fell
    between the answers, or the arms answer from other hosts" as if either. The warning now says which,
    and the batch's record in the run summary says what the latency checks judge (`latency`)."""
    import flows.pilot as pilot_module
    from sparse_core.host import HostLoad

    ctx, _ = _endpoint_pilot(url)
    here = pilot_module.arms_on_this_host(ctx)
    rows = [
        {"request_id": "r0", "arm": "control", "overloaded": False},
        {"request_id": "r0", "arm": "treatment", "overloaded": flagged > 0},
    ]
    load = HostLoad(2.0, 1, 1.0, 1.9, None, None, overloaded=True, wait_share=0.4)
    with caplog.at_level(logging.WARNING):
        pilot_module.warn_if_overloaded(logging.getLogger("test"), "host-load", rows, load, here)
    assert (
        "host-load: host overloaded during the batch (others busy on 1.9 of 2.0 CPUs, our threads "
        in caplog.text
    )
    assert said in caplog.text, caplog.text
    record = pilot_module.latency_judged(rows, here)
    assert (record["rows_judged"], record["rows_left_out"], record["arms_measured_here"]) == judged


def test_a_batch_record_says_which_arms_servers_could_not_be_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both arms behind a url on this host whose server no process here is seen to hold (here: it stopped
    listening after the arms' probes and answers on their open connections; in production another user's
    server, another namespace's): each answer's load carried the note, the batch's load (its `host_load`
    in the pilot summary) did not. It now says it once, naming both arms."""
    import flows.pilot as pilot_module
    from flows.arms import answer_with_arms
    from rollout.arms.host_load import NOT_VISIBLE

    monkeypatch.setattr(pilot_module, "answer_batch", answer_with_arms)  # without its Prefect task wrapper
    with busy_loopback_server(None, stop_listening_after=2) as url:
        ctx, info = _endpoint_pilot(url)
        requests = [(f"r{i}", {"prompt": "quiet", "reference": "print"}) for i in range(2)]
        rows, _, load = pilot_module.answer_measured(ctx, info, requests, 4, None)
    assert len(rows) == 4, rows
    assert load.to_dict().get("endpoint_note") == f"control, treatment: {NOT_VISIBLE}", load
