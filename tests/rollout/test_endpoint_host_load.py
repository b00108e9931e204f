"""Review s49 H: an endpoint arm served by a SEPARATE process on this host was metered as if its answers
were the pilot's own work: the pilot's threads sleep on HTTP meanwhile (no wait share, or the noise of a
few ms), so the fallback rule counted the server's own model work as the others' load and flagged answers
of a server alone on an idle host (3 of 8 on two idle cores). Now the server's processes (the owners of the
listening socket and their descendants) are the arm's own work and their threads' waiting decides. Real
processes: a stdlib server process burning CPU per answer (tests/fixtures/cpu_server.py), a real spinner,
the real meter and the real OpenAI arm over loopback HTTP."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rollout.arms.base import ArmRequest
from rollout.arms.endpoint_process import (
    descendants,
    listening_inodes,
    listening_processes,
    proc_net_address,
    url_port,
)
from rollout.arms.host_load import MeteredArm, metered
from rollout.arms.openai import OpenAIArm
from rollout.spec import ArmSpec
from sparse_core.host import WAIT_SHARE_LIMIT, snapshot

SERVER = Path(__file__).resolve().parents[1] / "fixtures" / "cpu_server.py"
BURN_S = 0.06

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0
   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 222 1 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 333 1 0
   3: 0500000A:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 444 1 0
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0:0 0:0 0 1000 0 555 1
   1: 0000000000000000FFFF00000100007F:1F93 00000000000000000000000000000000:0000 0A 0:0 0:0 0 1000 0 666 1
"""


def test_the_listening_socket_of_a_url_is_read_from_proc_net_tcp() -> None:
    assert str(proc_net_address("0100007F:1F90")) == "127.0.0.1"
    assert str(proc_net_address("00000000000000000000000001000000:1F90")) == "::1"
    assert listening_inodes(TCP, 8080, {"127.0.0.1"}) == {111}  # the connection on 8080 is not listening
    assert listening_inodes(TCP, 8081, {"127.0.0.1"}) == {222}  # 0.0.0.0: every address
    assert listening_inodes(TCP, 8082, {"127.0.0.1"}) == set()  # another address's listener
    assert listening_inodes(TCP, 8080, {"0.0.0.0"}) == {111}  # a url naming 0.0.0.0 reaches loopback's
    assert listening_inodes(TCP6, 8080, {"::1"}) == {555}
    assert listening_inodes(TCP6, 8083, {"127.0.0.1"}) == {666}  # ::ffff:127.0.0.1
    assert url_port("http://127.0.0.1:5002/v1") == 5002 and url_port("https://localhost/v1") == 443
    assert descendants([10], {10: 1, 11: 10, 12: 11, 13: 1}) == {10, 11, 12}


@contextmanager
def cpu_server(cpu: int) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """The server process pinned to `cpu` (real-time round-robin where this test may ask for it), its url
    and its scheduling policy ("rr" or "other")."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(cpu), str(BURN_S), "rr"], stdout=subprocess.PIPE, text=True
    )
    try:
        port, policy = proc.stdout.readline().split()  # type: ignore[union-attr]
        yield proc, f"http://127.0.0.1:{port}/v1", policy
    finally:
        proc.kill()
        proc.wait()


# the spinner: pinned beside the server, for 5 s at most should this test die before it is killed
SPIN = """import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
print("spinning", flush=True)
t = time.monotonic()
while time.monotonic() - t < 5:
    pass
"""


def _fair(pid: int) -> None:
    """Every thread of a real-time process back to the normal policy (a fair share beside a spinner;
    round-robin's 100 ms slices would let a 60 ms answer wait anywhere from 0 to 100 ms)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


def _threads(pid: int | str) -> dict[int, tuple[int, int]]:
    """tid -> (run, run_delay) ns of each thread of a process, read here, not by the meter."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run, delay = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(run), int(delay))
    return out


def _delta(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> tuple[int, int]:
    ran = sum(r - a.get(t, (0, 0))[0] for t, (r, _) in b.items())
    return ran, sum(d - a.get(t, (0, 0))[1] for t, (_, d) in b.items())


def _answers(arm: MeteredArm, server: int, n: int, tag: str) -> list[tuple[str, float, bool]]:
    """n answers: each one's request id, the server's threads' wait share, and whether our side is out of
    the judgement (our threads ran under a quarter of the answer: `measure_endpoint`'s floor), all read
    by this test."""
    out = []
    for i in range(n):
        s0, o0, t0 = _threads(server), _threads("self"), time.monotonic()
        arm.answer(
            ArmRequest(f"{tag}{i}", "p", "print"), "contains", max_new_tokens=4, max_prompt_tokens=None
        )
        s1, o1, wall = _threads(server), _threads("self"), time.monotonic() - t0
        ran, waited = _delta(s0, s1)
        own_ran, own_waited = _delta(o0, o1)
        own_free = own_ran < WAIT_SHARE_LIMIT * wall * 1e9 or own_waited <= own_ran / 7  # ANSWER_FLOOR_SHARE
        out.append((f"{tag}{i}", waited / max(ran + waited, 1), own_free))
    return out


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_server_process_on_this_host_is_flagged_only_when_it_waited_for_its_cpu() -> None:
    """The server and this process pinned to one CPU: the server's 60 ms of CPU per answer is a whole
    core of the mask, which the fallback rule read as the others' (1 + our thread > 1.5: every answer
    flagged). Its answers are flagged when, and only when, its threads waited for the CPU: an answer the
    server ran through freely is not; with a spinner pinned beside it every answer is (wait share about
    a half). Load from the other CPUs does not count (the mask is one CPU); load on this one could make
    the server wait, so the server runs real-time for the quiet answers where the test may ask for it
    (back to the normal policy beside the spinner), and the quiet answers are judged by the wait shares
    this test reads from schedstat itself."""
    if snapshot().run_ns is None:
        pytest.skip("no schedstat on this kernel")
    mask = os.sched_getaffinity(0)
    cpu = max(mask)
    try:
        with cpu_server(cpu) as (proc, url, policy):
            arm = metered(
                OpenAIArm(url, "m", timeout_s=10, connect_timeout_s=2, max_concurrency=1),
                ArmSpec(kind="openai", url=url, model="m"),
            )
            assert isinstance(arm, MeteredArm)
            _answers(arm, proc.pid, 1, "warm")  # the first answer imports the task's scorer here
            os.sched_setaffinity(0, {cpu})
            quiet = _answers(arm, proc.pid, 4, "q")
            os.sched_setaffinity(0, mask)
            if policy == "rr":
                _fair(proc.pid)
            spin = subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)], stdout=subprocess.PIPE, text=True)
            try:
                assert spin.stdout is not None and spin.stdout.readline() == "spinning\n"
                starved = _answers(arm, proc.pid, 3, "s")
            finally:
                spin.kill()
                spin.wait()
            arm.close()
    finally:
        os.sched_setaffinity(0, mask)
    free = [rid for rid, share, own_free in quiet if share <= WAIT_SHARE_LIMIT / 2 and own_free]
    assert not any(arm.overloaded(rid) for rid in free), (quiet, [arm.overloaded(r) for r, _, _ in quiet])
    assert all(arm.overloaded(rid) for rid, _, _ in starved), starved
    loads = dict(arm.loads)
    for rid, share, _ in quiet + starved:  # the meter's reading is the server's, and it decides
        load = loads[rid]
        assert load.endpoint_busy_cores is not None and load.endpoint_busy_cores > 0.05, load  # its 60 ms
        assert load.wait_share == pytest.approx(share, abs=0.1), (load, share)
        assert load.endpoint_note is None
    assert all(loads[rid].wait_share > 0.3 for rid, _, _ in starved), starved
    if not free:
        pytest.skip(f"the server waited for its CPU in every quiet answer (load on it; {policy}): {quiet}")


def test_a_server_nobody_here_can_see_is_said_once_and_not_flagged_from_our_sleeping_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No process of ours listens on the url's port (here: nothing does; in production another user's
    server or another namespace's): the warning says so once, each answer's load carries the note, and
    our own threads' few ms of runnable time (a wait share of 0.4 of 5 ms in a 400 ms answer) flag
    nothing, where a share over the limit of a third of the answer's time does."""
    with caplog.at_level(logging.WARNING, logger="rollout.arms.host_load"):
        with socket.socket() as s:  # a port nobody listens on, new to this process (said once per url)
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        assert listening_processes(url) == set()
        arm = metered(
            OpenAIArm(url, "m", timeout_s=2, connect_timeout_s=1, max_concurrency=1),
            ArmSpec(kind="openai", url=url, model="m"),
        )
        for i in range(3):
            arm.answer(
                ArmRequest(f"r{i}", "p", "print"), "contains", max_new_tokens=4, max_prompt_tokens=None
            )
        arm.close()
    assert caplog.text.count("no process listening on its port is visible") == 1
    assert isinstance(arm, MeteredArm) and all(
        "endpoint process not visible" in (load.endpoint_note or "") for _, load in arm.loads
    )
    from sparse_core.host import ANSWER_FLOOR_SHARE, CpuSnapshot, measure_endpoint

    assert ANSWER_FLOOR_SHARE == WAIT_SHARE_LIMIT  # as `_answers` reads it
    a = CpuSnapshot(0.0, None, None, None, threads_ns=((1, 1_000_000, 0),))
    noise = CpuSnapshot(0.4, None, None, None, threads_ns=((1, 4_000_000, 2_000_000),))
    load = measure_endpoint(a, noise, None, note="endpoint process not visible")
    assert load.wait_share is None and not load.overloaded
    busy = CpuSnapshot(0.4, None, None, None, threads_ns=((1, 101_000_000, 50_000_000),))
    load = measure_endpoint(a, busy, None)
    assert load.wait_share == pytest.approx(1 / 3, abs=1e-3) and load.overloaded


@pytest.mark.parametrize(
    ("server_busy", "run_ms", "delay_ms", "overloaded"),
    [
        (True, 300, 10, False),  # busy on both cores alone: its CPU is its own, it hardly waited
        (True, 200, 120, True),  # it waited 0.375 of its runnable time: starved
        (False, 1, 2, False),  # a server that sleeps: 3 ms runnable is noise, the inferred rule: idle
    ],
)
def test_the_servers_cpu_is_the_arms_own_and_its_threads_waiting_decides(
    server_busy: bool, run_ms: int, delay_ms: int, overloaded: bool
) -> None:
    """Pure: the host's busy ticks over a 0.4 s answer are all the server's (two pool workers); read as
    the others', 2 cores + our thread would be over any two-core mask."""
    from sparse_core.host import CLK_TCK, CpuSnapshot, ProcessesSnapshot, cpu_limits, measure_endpoint

    ticks = int(2 * 0.4 * CLK_TCK) if server_busy else 0
    a = CpuSnapshot(0.0, 0, 0, None, threads_ns=((1, 0, 0),))
    b = CpuSnapshot(0.4, ticks, 0, None, threads_ns=((1, 1_000_000, 1_000_000),))
    before = ProcessesSnapshot(((10, 0), (11, 0)), ((10, 0, 0), (11, 0, 0)))
    ms = 1_000_000
    after = ProcessesSnapshot(
        ((10, ticks // 2), (11, ticks - ticks // 2)), ((10, run_ms * ms, delay_ms * ms), (11, 0, 0))
    )
    load = measure_endpoint(a, b, (before, after))
    assert load.others_busy_cores == 0.0 and load.overloaded is overloaded, load
    assert load.endpoint_busy_cores == pytest.approx(2.0 if server_busy else 0.0)
    assert load.threads == (2 if server_busy else 1) and cpu_limits().mask >= 1
    assert (load.wait_share is None) is (not server_busy)


def _server(cpu: int, burn_s: float, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(cpu), str(burn_s), "other", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, int(proc.stdout.readline().split()[0])  # type: ignore[union-attr]


def _ask(arm: MeteredArm, rid: str) -> None:
    arm.answer(ArmRequest(rid, "p", "print"), "contains", max_new_tokens=4, max_prompt_tokens=None)


def test_answers_in_flight_at_once_are_each_charged_their_share_of_the_servers_cpu() -> None:
    """Review s50 B1: with `max_concurrency` 4 each answer's meter read the server's CPU for every answer in
    flight (4 on one CPU: a median 180 ms charged an answer of 60 ms, up to 240), and the server's threads
    waiting for each other read as overload (19 of 20 flagged, its CPU real-time: no other process could
    take it). Now the server's CPU is split among the answers in flight by their overlap: four answers'
    charges add up to the four answers' work (the old meter's added up to 600-960 ms), and each says it
    was timed concurrently. The judgement is asserted on the pure rule (tests/sparse_core/test_host.py)."""
    from concurrent.futures import ThreadPoolExecutor

    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    server, port = _server(cpu, BURN_S)
    url = f"http://127.0.0.1:{port}/v1"
    arm = metered(
        OpenAIArm(url, "m", timeout_s=20, connect_timeout_s=2, max_concurrency=4),
        ArmSpec(kind="openai", url=url, model="m"),
    )
    assert isinstance(arm, MeteredArm)
    try:
        _ask(arm, "warm")  # the first answer imports the task's scorer here
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda rid: _ask(arm, rid), [f"c{i}" for i in range(4)]))
    finally:
        server.kill()
        server.wait()
        arm.close()
    loads = [load for rid, load in arm.loads if rid != "warm"]
    assert all(load.endpoint_busy_cores is not None for load in loads), loads
    charged = sum(load.endpoint_busy_cores * load.seconds for load in loads)  # type: ignore[operator]
    # the server burns BURN_S of CPU per answer (thread time: slowed, never shortened, by load), plus a
    # few ms of HTTP each; a half of it either way is far from the old meter's 2.5-4x
    assert 0.5 * 4 * BURN_S < charged < 1.5 * 4 * BURN_S, loads
    assert any((load.endpoint_in_flight or 0) >= 2 for load in loads), loads  # four sent at once


def test_a_server_restarted_between_answers_is_found_again_and_one_gone_meanwhile_is_not_visible() -> None:
    """Review V4: the meter kept the first server's pid; after a restart on the same port the dead pid read
    0 cores, the new server's CPU counted as the others' load and every answer was flagged, with no note.
    Now the listening socket's owners are looked up again where one ended (or its pid names another
    process), and an answer whose server is not seen at both ends is judged as not visible, said."""
    from sparse_core.host import EndpointMeter

    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    first, port = _server(cpu, BURN_S)
    url = f"http://127.0.0.1:{port}/v1"
    arm = metered(
        OpenAIArm(url, "m", timeout_s=10, connect_timeout_s=2, max_concurrency=1),
        ArmSpec(kind="openai", url=url, model="m"),
    )
    assert isinstance(arm, MeteredArm)
    second = None
    try:
        _ask(arm, "before")
        first.kill()
        first.wait()
        second, _ = _server(cpu, BURN_S, port)
        _ask(arm, "after")
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
                p.wait()
        arm.close()
    after = dict(arm.loads)["after"]
    assert after.endpoint_note is None and after.wait_share is not None, after  # the new server's threads
    assert after.endpoint_busy_cores is not None and after.endpoint_busy_cores > 0.05, after
    with EndpointMeter(lambda: [first.pid]) as meter:  # its process ended: seen at neither end
        pass
    assert meter.load is not None and "ended during the answer" in (meter.load.endpoint_note or "")
    assert meter.load.endpoint_busy_cores is None and not meter.load.overloaded


# a port forwarder in front of a server (as `ssh -L`, `kubectl port-forward`, docker-proxy): PORT upstream
FORWARDER = """import socket, sys, threading
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen()
print(ls.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while (d := a.recv(65536)):
            b.sendall(d)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
while True:
    c, _ = ls.accept()
    u = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_forwarder_listening_for_the_server_is_said_and_its_answers_are_not_flagged_from_the_others() -> (
    None
):
    """Review V6: a forwarder holds the listening socket, so it was metered as the server: the real
    server's CPU (60 ms an answer, on this process's one CPU) read as the others' load and every answer
    was flagged, with no note. A "server" that hardly ran while the others' cores would flag the answer
    is judged as not visible and said."""
    mask = os.sched_getaffinity(0)
    cpu = max(mask)
    server, sport = _server(cpu, BURN_S)
    fwd = subprocess.Popen([sys.executable, "-c", FORWARDER, str(sport)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(fwd.stdout.readline())}/v1"  # type: ignore[union-attr]
        arm = metered(
            OpenAIArm(url, "m", timeout_s=10, connect_timeout_s=2, max_concurrency=1),
            ArmSpec(kind="openai", url=url, model="m"),
        )
        assert isinstance(arm, MeteredArm)
        _ask(arm, "warm")  # the first answer imports the task's scorer here
        os.sched_setaffinity(0, {cpu})
        for i in range(3):
            _ask(arm, f"r{i}")
        arm.close()
    finally:
        os.sched_setaffinity(0, mask)
        for p in (server, fwd):
            p.kill()
            p.wait()
    loads = [load for rid, load in arm.loads if rid != "warm"]
    # the note goes only with an answer the rule for the others' cores would otherwise have judged; a
    # clean-clone CI saw one of three answers (others' cores 0.572) without it, not flagged: the note is
    # asked of one answer at least, and no answer may be flagged
    assert any("did not do the work (a forwarder?" in (load.endpoint_note or "") for load in loads), loads
    assert not any(load.overloaded for load in loads), loads


def test_the_test_server_exits_when_its_parent_is_killed() -> None:
    """Review V7: a test run killed by SIGKILL left its real-time cpu_server listening for good."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, {str(SERVER)!r}, '0', '0.01'], stdout=subprocess.PIPE)\n"
            "p.stdout.readline()\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = int(parent.stdout.readline())  # type: ignore[union-attr]
    parent.kill()
    parent.wait()
    end = time.monotonic() + 3
    while Path(f"/proc/{server}").exists() and _state(server) != "Z" and time.monotonic() < end:
        time.sleep(0.02)
    assert not Path(f"/proc/{server}").exists() or _state(server) == "Z", (
        f"cpu_server {server} outlived its parent"
    )


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]


def test_the_servers_tree_is_walked_down_from_it(tmp_path: Path) -> None:
    """Review V5: every process's stat was read at both ends of every answer (139-275 ms an answer with
    1,100-3,100 processes); the tree is walked down from the server's processes, as the full scan finds it."""
    from rollout.arms.endpoint_process import process_parents, process_tree

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; subprocess.Popen(['sleep', '5']); print(1, flush=True); time.sleep(5)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child.stdout.readline()  # type: ignore[union-attr]
        walked = process_tree({child.pid})
        if walked is None:
            pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children")
        assert walked == descendants({child.pid}, process_parents()) and len(walked) == 2, walked
        (tmp_path / "10" / "task" / "10").mkdir(parents=True)  # a kernel without children files
        (tmp_path / "10" / "stat").write_text("10 (python) S 1 " + "0 " * 40)
        assert process_tree({10}, tmp_path) is None
    finally:
        child.kill()
        child.wait()
