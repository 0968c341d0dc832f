"""The web monitor: its pure parts directly, then real HTTP on 127.0.0.1 against real clusters.

The HTTP tests use the standard library's http.client (so they can send any Host header or
none) against a JobCluster with an embedded node, a node process, and a clusterpy-scheduler.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import clusterpy
from clusterpy.errors import ConfigurationError, JobCancelledError, JobTerminatedError
from clusterpy.job import ClusterJob, JobStatus
from clusterpy.monitor import Ended, JobHistory, MonitorSpec, Throughput, parse_monitor, record_job
from clusterpy.monitor._guard import Guard, allowed_hosts_for

pytest.importorskip("aiohttp", reason="the monitor needs aiohttp (pip install 'clusterpy[monitor]')")

REPO = Path(__file__).resolve().parent.parent


def wait_for_file(path: str, n: int) -> int:
    """A job that runs until ``path`` exists (the test decides when jobs finish)."""
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.01)
    if n < 0:
        raise ValueError(f"job {n} failed on purpose")
    return n


def until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Client:
    """Plain HTTP to a monitor URL; every request names its Host unless told otherwise."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.removeprefix("token=")

    def request(self, method: str, path: str, *, token: str | None = "header", host: str | None = "default",
                body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            hdrs = dict(headers or {})
            if token == "header":
                hdrs["X-Clusterpy-Token"] = self.token
            elif token is not None:
                hdrs["X-Clusterpy-Token"] = token
            if host == "default":
                hdrs["Host"] = f"{self.host}:{self.port}"
            elif host is not None:
                hdrs["Host"] = host
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            if data is not None:
                conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def snapshot(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/api/snapshot")
        assert status == 200, body
        return json.loads(body)


# ------------------------------------------------------------------ pure parts


def test_throughput_counts_per_second_and_forgets_old_seconds():
    t = Throughput(window=5)
    t.add(100.2)
    t.add(100.9)
    t.add(102.0)
    assert t.series(102.5) == [0, 0, 2, 0, 1]
    assert t.series(104.0) == [2, 0, 1, 0, 0]
    assert t.series(106.0) == [1, 0, 0, 0, 0]
    t.add(50.0)  # older than the window: dropped, the ring stays as it was
    assert t.series(106.0) == [1, 0, 0, 0, 0]
    assert t.series(1000.0) == [0] * 5  # a long gap clears everything
    with pytest.raises(ValueError):
        Throughput(window=0)


def test_history_counts_tallies_and_keeps_only_the_latest_failures():
    h = JobHistory(keep_failures=3, max_traceback=50)
    for i in range(10):
        status = "Terminated" if i % 2 else "Finished"
        h.add(Ended(str(i), str(i), status, "n1", 0.5, 1000.0 + i, "boom" if i % 2 else None,
                    "x" * 100 if i % 2 else None, owner="c1"), now=10.0)
    h.add(Ended("x", "x", "Abandoned", None, 0.0, 2000.0, "lost"), now=11.0)
    assert h.counts == {"Finished": 5, "Terminated": 5, "Abandoned": 1}
    assert h.ended() == 11
    assert (h.nodes["n1"].done, h.nodes["n1"].failures, h.nodes["n1"].cpu_time) == (10, 5, 5.0)
    assert [e.key for e in h.latest_failures()] == ["x", "9", "7"]
    kept = h.latest_failures()[1].traceback
    assert kept is not None and kept.startswith("...\n") and len(kept) == 54
    assert h.owners["c1"]["Terminated"] == 5
    assert h.throughput.series(11.5)[-2:] == [10, 1]


def test_guard_decisions():
    g = Guard("t" * 32, allowed_hosts_for("127.0.0.1", 8080))
    ok = dict(host="127.0.0.1:8080")
    assert g.check(method="GET", query_token="t" * 32, **ok) is None
    assert g.check(method="GET", cookie_token="t" * 32, **ok) is None
    assert g.check(method="GET", header_token="t" * 32, host="localhost:8080") is None
    assert g.check(method="GET", **ok).status == 401
    assert g.check(method="GET", query_token="wrong", **ok).status == 403
    # the header decides over a stale cookie; a wrong header is not rescued by a good cookie
    assert g.check(method="GET", header_token="wrong", cookie_token="t" * 32, **ok).status == 403
    for host in (None, "evil.example:8080", "127.0.0.1:8081", "127.0.0.1"):
        assert g.check(method="GET", header_token="t" * 32, host=host).status == 403
    # a change: never on the cookie alone, never from another origin
    assert g.check(method="POST", cookie_token="t" * 32, **ok).status == 403
    assert g.check(method="POST", header_token="t" * 32, origin="http://evil.example", **ok).status == 403
    assert g.check(method="POST", header_token="t" * 32, origin="http://127.0.0.1:8080", **ok) is None
    with pytest.raises(ValueError):
        Guard("short", ["x"])


def test_allowed_hosts():
    assert allowed_hosts_for("::1", 9000) >= {"[::1]:9000", "localhost:9000", "127.0.0.1:9000"}
    assert allowed_hosts_for("10.1.2.3", 80) == {"10.1.2.3", "10.1.2.3:80"}
    assert "proxy.example:443" in allowed_hosts_for("127.0.0.1", 1, ["proxy.example:443"])
    wildcard = allowed_hosts_for("0.0.0.0", 7000)
    assert {"127.0.0.1:7000", f"{socket.gethostname().lower()}:7000"} <= wildcard


def test_parse_monitor():
    assert parse_monitor(False) is None and parse_monitor(None) is None
    assert parse_monitor(True) == MonitorSpec("127.0.0.1", 0)
    assert parse_monitor(8181) == MonitorSpec("127.0.0.1", 8181)
    assert parse_monitor("8181") == MonitorSpec("127.0.0.1", 8181)
    assert parse_monitor("0.0.0.0:80") == MonitorSpec("0.0.0.0", 80)
    assert parse_monitor("[::1]:81") == MonitorSpec("::1", 81)
    for bad in ("x", 70000, -1, "host:", 1.5):
        with pytest.raises(ConfigurationError):
            parse_monitor(bad)


def test_without_aiohttp_the_core_works_and_the_monitor_says_how_to_get_it():
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "import clusterpy\n"
        "with clusterpy.JobCluster(pow, local=True, local_cpus=1) as c:\n"
        "    print('result', c.submit(2, 5)())\n"
        "try:\n"
        "    clusterpy.JobCluster(pow, local=True, local_cpus=1, monitor=True)\n"
        "except clusterpy.ConfigurationError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "result 32" in out.stdout
    assert "refused: " in out.stdout and "pip install 'clusterpy[monitor]'" in out.stdout


# ------------------------------------------------------------------ a real cluster over HTTP


@pytest.fixture(scope="module")
def quiet_cluster():
    with clusterpy.JobCluster(pow, local=True, local_cpus=1, monitor=True) as cluster:
        yield cluster


def test_the_url_is_on_loopback_and_the_page_needs_its_token(quiet_cluster):
    url = quiet_cluster.monitor_url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{32}", url), url
    c = Client(url)
    status, headers, body = c.request("GET", f"/?token={c.token}", token=None)
    assert status == 200 and b"<canvas" in body
    assert f'content="{c.token}"' in body.decode()  # the page carries it for its POSTs
    cookie = headers["Set-Cookie"]
    assert f"clusterpy_monitor_{c.port}={c.token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    # the cookie the page set is enough for the page's own reads
    status, _, body = c.request("GET", "/api/snapshot", token=None,
                                headers={"Cookie": f"clusterpy_monitor_{c.port}={c.token}"})
    assert status == 200 and json.loads(body)["kind"] == "cluster"


@pytest.mark.parametrize("path", ["/", "/api/snapshot", "/api/events", "/static/monitor.js", "/nowhere"])
def test_every_route_refuses_a_missing_or_wrong_token(quiet_cluster, path):
    c = Client(quiet_cluster.monitor_url)
    status, _, body = c.request("GET", path, token=None)
    assert status == 401, body
    status, _, body = c.request("GET", path, token="x" * 32)
    assert status == 403, body
    status, _, body = c.request("GET", path + "?token=" + "y" * 32, token=None)
    assert status == 403, body


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost.evil.example:{port}", None])
def test_a_wrong_or_missing_host_header_is_refused_even_with_the_token(quiet_cluster, host):
    c = Client(quiet_cluster.monitor_url)
    for path in ("/", "/api/snapshot"):
        status, _, body = c.request("GET", path + f"?token={c.token}", host=host and host.format(port=c.port))
        # aiohttp itself answers 400 to an HTTP/1.1 request with no Host; the guard, 403 to a wrong one
        assert status == (400 if host is None else 403), body
        assert b"Host" in body


def test_actions_refuse_get_cookies_alone_other_origins_and_bad_bodies(quiet_cluster):
    c = Client(quiet_cluster.monitor_url)
    for path in ("/api/cancel", "/api/stop-node"):
        status, _, _ = c.request("GET", path)
        assert status == 405  # nothing changes on GET, even with the token
        status, _, _ = c.request("GET", path + f"?token={c.token}&job=1&node=x", token=None)
        assert status == 405
        status, _, _ = c.request("POST", path, token=None, body={"job": "1", "node": "x"},
                                 headers={"Cookie": f"clusterpy_monitor_{c.port}={c.token}"})
        assert status == 403
        status, _, _ = c.request("POST", path, body={"job": "1", "node": "x"},
                                 headers={"Origin": "http://evil.example"})
        assert status == 403
        status, _, _ = c.request("POST", path, body="not an object")
        assert status == 400
        status, _, _ = c.request("POST", path, body={"job": "1"}, headers={"Content-Type": "text/plain"})
        assert status == 415
    status, _, body = c.request("POST", "/api/cancel", body={"job": "no-such-job"})
    assert status == 404 and json.loads(body)["ok"] is False


def test_events_stream_pushes_snapshots(quiet_cluster):
    c = Client(quiet_cluster.monitor_url)
    conn = http.client.HTTPConnection(c.host, c.port, timeout=10)
    try:
        conn.request("GET", "/api/events", headers={"X-Clusterpy-Token": c.token})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        events = []
        while len(events) < 2:
            line = response.fp.readline().decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        assert events[0]["kind"] == "cluster" and events[1]["time"] > events[0]["time"]
    finally:
        conn.close()


def test_snapshot_follows_jobs_and_cancel_by_post_works(tmp_path):
    gate = str(tmp_path / "gate")
    with clusterpy.JobCluster(wait_for_file, local=True, local_cpus=2, monitor=True, prefetch=0) as cluster:
        c = Client(cluster.monitor_url)
        jobs = [cluster.submit(gate, n) for n in (1, 2, 3, -4, 5, 6)]
        s = until(lambda: (s := c.snapshot())["counts"]["Running"] == 2 and s, what="two running jobs")
        assert s["counts"]["Created"] == 4 and s["submitted"] == 6
        (node,) = s["nodes"]
        assert node["state"] == "connected" and node["cpus"] == 2 and node["busy"] == 2 and node["jobs_done"] == 0
        assert node["last_pulse"] is not None and node["last_pulse"] < 10
        assert {r["key"] for r in s["running"]} == {jobs[0]._key, jobs[1]._key}
        assert all(r["node"] == node["name"] and r["started"] for r in s["running"])

        # cancel a running job through the monitor
        status, _, body = c.request("POST", "/api/cancel", body={"job": jobs[0]._key})
        assert status == 200 and json.loads(body)["ok"] is True
        with pytest.raises((JobCancelledError, JobTerminatedError)):
            jobs[0](timeout=15)
        assert jobs[0].status is JobStatus.Cancelled
        until(lambda: c.snapshot()["counts"]["Cancelled"] == 1, what="the cancel to show")

        Path(gate).touch()  # let the others finish
        cluster.wait(30)
        s = until(lambda: (s := c.snapshot())["counts"]["Finished"] == 4 and s, what="finished jobs to show")
        assert s["counts"] == {"Created": 0, "Running": 0, "Finished": 4, "Terminated": 1, "Cancelled": 1,
                               "Abandoned": 0}
        (node,) = s["nodes"]
        assert node["jobs_done"] == 6 and node["failures"] == 1 and node["busy"] == 0  # the cancelled one ran there too
        assert sum(s["throughput"]["values"]) == 6 and len(s["throughput"]["values"]) == 120
        (failure,) = s["failures"]
        assert failure["key"] == jobs[3]._key and failure["status"] == "Terminated"
        assert failure["error"] == "ValueError: job -4 failed on purpose"
        assert "wait_for_file" in failure["traceback"] and "Traceback" in failure["traceback"]
        assert s["running"] == [] and s["running_total"] == 0
    # closed with the cluster
    with pytest.raises(OSError):
        socket.create_connection((c.host, c.port), timeout=2).close()


def test_stop_using_a_node_moves_its_jobs(tmp_path, node):
    gate = str(tmp_path / "gate")
    with clusterpy.JobCluster(wait_for_file, nodes=[node.address], local=True, local_cpus=1, monitor=True,
                              reentrant=True, prefetch=0, pulse_interval=0.3) as cluster:
        c = Client(cluster.monitor_url)
        s = until(lambda: (s := c.snapshot()) and sum(n["state"] == "connected" for n in s["nodes"]) == 2 and s,
                  what="two nodes")
        local = next(n for n in s["nodes"] if n["node_id"] != node.node_id)
        jobs = [cluster.submit(gate, n) for n in range(4)]
        until(lambda: c.snapshot()["counts"]["Running"] == 3, what="three running jobs")
        status, _, body = c.request("POST", "/api/stop-node", body={"node": local["name"]})
        assert status == 200 and json.loads(body) == {"ok": True, "node": local["name"]}
        s = until(lambda: (s := c.snapshot()) and any(n["state"] == "stopped" for n in s["nodes"]) and s,
                  what="the node to show as stopped")
        assert next(n for n in s["nodes"] if n["name"] == local["name"])["busy"] == 0
        status, _, _ = c.request("POST", "/api/stop-node", body={"node": local["name"]})
        assert status == 404  # already stopped
        Path(gate).touch()
        assert sorted(job(timeout=30) for job in jobs) == [0, 1, 2, 3]
        assert {job.node_id for job in jobs} == {node.node_id}  # the stopped node's job moved
        more = cluster.submit(gate, 9)
        assert more(timeout=30) == 9 and more.node_id == node.node_id
        time.sleep(1.0)  # several reconnect delays: it does not come back by itself
        assert next(n for n in c.snapshot()["nodes"] if n["name"] == local["name"])["state"] == "stopped"


def test_the_monitor_port_can_be_chosen_and_a_taken_one_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{taken}"):
            clusterpy.JobCluster(pow, local=True, local_cpus=1, monitor=taken)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with clusterpy.JobCluster(pow, local=True, local_cpus=1, monitor=free) as cluster:
        assert cluster.monitor_url.startswith(f"http://127.0.0.1:{free}/?token=")
        assert cluster.submit(3, 2)() == 9


# ------------------------------------------------------------------ clusterpy-scheduler


async def test_scheduler_monitor_shows_nodes_and_computations(node, tmp_path):
    import asyncio

    from clusterpy.scheduler import SchedulerServer
    from clusterpy.secret import load_secret

    sched = SchedulerServer(secret=load_secret(), nodes=[(node.host, node.port)], port=0,
                            dest_path=tmp_path / "sched", monitor=True)
    await sched.start()
    try:
        c = Client(sched.monitor.url)
        gate = str(tmp_path / "gate")

        def run_client() -> dict[str, Any]:
            with clusterpy.SharedJobCluster(wait_for_file, f"127.0.0.1:{sched.port}") as cluster:
                jobs = [cluster.submit(gate, n) for n in (1, -2, 3)]
                s = until(lambda: (s := c.snapshot())["counts"]["Running"] == 2 and s, what="running jobs")
                Path(gate).touch()
                for job in jobs:
                    job.future.exception(30)
                return s

        during = await asyncio.to_thread(run_client)
        assert during["kind"] == "scheduler"
        (n,) = during["nodes"]
        assert n["node_id"] == node.node_id and n["state"] == "connected" and n["busy"] >= 2
        (comp,) = during["computations"]
        assert comp["client"] == "connected" and comp["counts"]["Running"] == 2
        assert all(r["owner"] == comp["comp_id"] and r["started"] for r in during["running"])
        after = await asyncio.to_thread(c.snapshot)
        assert after["counts"]["Finished"] == 2 and after["counts"]["Terminated"] == 1
        assert after["nodes"][0]["jobs_done"] == 3 and after["nodes"][0]["failures"] == 1
        assert after["failures"][0]["error"].startswith("ValueError") and "wait_for_file" in after["failures"][0]["traceback"]
        status, _, _ = await asyncio.to_thread(c.request, "GET", "/api/snapshot", host="evil.example")
        assert status == 403
    finally:
        await sched.aclose()


def test_scheduler_command_line_prints_the_monitor_url(node, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "clusterpy.scheduler", "--port", "0", "-n", node.address,
                             "--dest-path", str(tmp_path / "sched"), "--monitor"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        line = proc.stdout.readline()
        match = re.search(r"monitor at (http://127\.0\.0\.1:\d+/\?token=\S+)", line)
        assert match, line
        c = Client(match[1])
        s = until(lambda: (s := c.snapshot())["nodes"][0]["state"] == "connected" and s, what="the node")
        assert s["kind"] == "scheduler" and s["nodes"][0]["cpus"] == node.cpus
    finally:
        proc.terminate()
        proc.wait(15)


def test_example_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "monitor.py"), "--jobs", "12", "--linger", "0"],
                         capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"monitor at http://127\.0\.0\.1:\d+/\?token=", out.stdout + out.stderr)
    assert "finished 10, failed 2" in out.stdout, out.stdout


def test_history_describes_a_failure_only_when_read_and_once():
    described: list[int] = []

    def describe(i):
        described.append(i)
        return Ended(str(i), str(i), "Terminated", "n1", 0.1, 1.0, "boom", "t" * 50)

    h = JobHistory(keep_failures=2, max_traceback=10)
    for i in range(5):
        h.add_lazy("Terminated", "n1", 0.1, 10.0, functools.partial(describe, i))
    h.add_lazy("Finished", "n1", 0.1, 10.0, lambda: pytest.fail("a job that did not fail is never described"))
    assert described == []  # nothing formatted while jobs end
    assert [e.key for e in h.latest_failures()] == ["4", "3"]
    assert described == [3, 4]  # only the failures still kept
    assert h.latest_failures()[0].traceback == "...\n" + "t" * 10
    assert described == [3, 4]  # described once
    assert h.counts == {"Terminated": 5, "Finished": 1} and h.nodes["n1"].failures == 5


def test_record_job_counts_a_job_and_describes_its_failure():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    h = JobHistory()
    ok = ClusterJob(None, (1,), {}, time.time())
    ok.node_id, ok.cpu_time = "n1", 0.5
    ok._end(JobStatus.Finished, 2)
    record_job(h, ok, 10.0)
    bad = ClusterJob(None, (2,), {}, time.time())
    bad.node_id, bad.stderr = "n1", "oops\n"
    bad._end(JobStatus.Terminated, exc=Unprintable())
    record_job(h, bad, 10.0)
    assert h.counts == {"Finished": 1, "Terminated": 1} and h.nodes["n1"].cpu_time == 0.5
    (failure,) = h.latest_failures()
    assert (failure.key, failure.job_id, failure.error) == (bad._key, str(bad.id), "Unprintable")
    assert failure.traceback is not None and failure.traceback.endswith("--- stderr ---\noops\n")
