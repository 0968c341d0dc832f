"""SharedJobCluster and clusterpy-scheduler: real daemons on loopback, several clients at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import clusterpy
from clusterpy import JobStatus, SharedJobCluster
from clusterpy.errors import SchedulerLostError

from .conftest import wait_until


class SchedulerProcess:
    def __init__(self, tmp, nodes, extra=()):
        self.log_path = tmp / f"scheduler-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "clusterpy.scheduler", "--port", "0", "--log-level", "DEBUG",
               "--pulse-interval", "0.2", *[a for n in nodes for a in ("-n", n.address)], *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=tmp)
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"scheduler did not start: {line!r}\n{self.log_path.read_text()}")
        self.address = f"{match[1]}:{match[2]}"

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_scheduler(tmp_path):
    started = []

    def start(nodes, extra=()):
        s = SchedulerProcess(tmp_path, nodes, extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def square(x):
    import time

    time.sleep(0.02)
    return x * x


def test_two_clients_share_nodes_and_see_only_their_jobs(start_node, start_scheduler):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    sched = start_scheduler(nodes)
    results = {}

    def client(name, offset):
        with SharedJobCluster(lambda x: (name, x + offset), sched.address, pulse_interval=0.5) as cluster:
            jobs = [cluster.submit(i) for i in range(40)]
            results[name] = [job() for job in jobs]
            results[name + "-nodes"] = {job.ip_addr for job in jobs}

    threads = [threading.Thread(target=client, args=(n, o)) for n, o in (("a", 0), ("b", 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["a"] == [("a", i) for i in range(40)]
    assert results["b"] == [("b", i + 1000) for i in range(40)]
    assert "computation" in sched.log()


def test_small_client_is_not_starved_behind_a_big_one(start_node, start_scheduler):
    node = start_node(cpus=2)
    sched = start_scheduler([node])

    def sleeper(x):
        import time

        time.sleep(x)
        return x

    with SharedJobCluster(sleeper, sched.address) as big:
        big_jobs = [big.submit(0.05) for _ in range(300)]  # 7.5 s of work on 2 CPUs
        wait_until(lambda: any(j.status is JobStatus.Running for j in big_jobs))
        with SharedJobCluster(sleeper, sched.address) as small:
            start = time.monotonic()
            small_jobs = [small.submit(0.05) for _ in range(10)]
            assert [j(30) for j in small_jobs] == [0.05] * 10
            waited = time.monotonic() - start
        unfinished = sum(not j.done() for j in big_jobs)
        assert waited < 3.0, waited  # FIFO would take ~7.5 s
        assert unfinished > 100  # the big client was still running when the small one was done
        for job in big_jobs:
            big.cancel(job)


def test_node_loss_behind_the_scheduler_is_handled(start_node, start_scheduler):
    a, b = start_node(cpus=2), start_node(cpus=2)
    sched = start_scheduler([a, b])
    with SharedJobCluster(square, sched.address, reentrant=True) as cluster:
        jobs = [cluster.submit(i) for i in range(120)]
        wait_until(lambda: sum(j.done() for j in jobs) >= 20)
        a.stop(signal.SIGKILL)
        assert [j(60) for j in jobs] == [i * i for i in range(120)]


def test_scheduler_death_gives_scheduler_lost_error(start_node, start_scheduler):
    node = start_node(cpus=1)
    sched = start_scheduler([node])

    def sleeper(x):
        import time

        time.sleep(x)

    with SharedJobCluster(sleeper, sched.address, pulse_interval=0.2) as cluster:
        job = cluster.submit(30)
        wait_until(lambda: job.status is JobStatus.Running)
        sched.stop(signal.SIGKILL)
        with pytest.raises(SchedulerLostError):
            job(20)
        assert job.status is JobStatus.Abandoned


def test_bad_computation_of_one_client_does_not_disturb_another(start_node, start_scheduler, tmp_path):
    node = start_node(cpus=2)
    sched = start_scheduler([node])

    def crash(x):
        import os

        os._exit(3)

    with SharedJobCluster(crash, sched.address) as bad, SharedJobCluster(square, sched.address) as good:
        bad_jobs = [bad.submit(i) for i in range(4)]
        good_jobs = [good.submit(i) for i in range(10)]
        assert [j() for j in good_jobs] == [i * i for i in range(10)]
        for job in bad_jobs:
            with pytest.raises(clusterpy.WorkerDiedError):
                job(30)


def test_client_crash_recovered_through_the_scheduler(start_node, start_scheduler, tmp_path):
    node = start_node(cpus=2)
    sched = start_scheduler([node])
    journal = tmp_path / "shared.journal"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        import clusterpy

        def work(x):
            import time
            time.sleep(0.5)
            return x + 100

        cluster = clusterpy.SharedJobCluster(work, sys.argv[1], recover_file=sys.argv[2])
        jobs = [cluster.submit(i) for i in range(6)]
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    out = subprocess.run([sys.executable, str(script), sched.address, str(journal)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr
    jobs = clusterpy.recover_jobs(journal, timeout=60)
    assert [j.result for j in jobs] == [i + 100 for i in range(6)]
    assert all(j.status is JobStatus.Finished for j in jobs)


def test_shared_cluster_example(start_node, start_scheduler):
    from .conftest import REPO

    sched = start_scheduler([start_node(cpus=2)])
    out = subprocess.run([sys.executable, str(REPO / "examples" / "shared_cluster.py"), sched.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("computed by worker") == 20


def test_scheduler_discovers_its_nodes(start_node, tmp_path):
    node = start_node(cpus=2)
    sched = SchedulerProcess(tmp_path, [], extra=["--discovery-interfaces", "lo"])
    try:
        with SharedJobCluster(square, sched.address) as cluster:
            assert [cluster.submit(i)(30) for i in range(4)] == [0, 1, 4, 9]
        assert f"discovered node 127.0.0.1:{node.port}" in sched.log()
    finally:
        sched.stop()


def test_scheduler_cli_errors_are_one_line():
    bad = subprocess.run([sys.executable, "-m", "clusterpy.scheduler", "--pulse-interval", "-1"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--pulse-interval" in bad.stderr


THREE_CLIENTS = textwrap.dedent("""
    import json, sys
    import clusterpy

    name = sys.argv[2]
    def tag(x):
        import time
        time.sleep(0.01)
        return name, x * x

    with clusterpy.SharedJobCluster(tag, sys.argv[1]) as cluster:
        jobs = [cluster.submit(i) for i in range(30)]
        print(json.dumps([job() for job in jobs]))
""")


def test_three_client_processes_get_their_own_results(start_node, start_scheduler, tmp_path):
    import json

    sched = start_scheduler([start_node(cpus=2), start_node(cpus=2)])
    script = tmp_path / "client.py"
    script.write_text(THREE_CLIENTS)
    procs = {name: subprocess.Popen([sys.executable, str(script), sched.address, name], stdout=subprocess.PIPE,
                                    text=True, cwd=tmp_path) for name in ("x", "y", "z")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        assert json.loads(out) == [[name, i * i] for i in range(30)]


def test_twenty_jobs_finish_long_before_two_thousand_queued_ahead(start_node, start_scheduler):
    sched = start_scheduler([start_node(cpus=2)])
    order = []
    lock = threading.Lock()

    def note(who):
        def callback(job):
            with lock:
                order.append(who)
        return callback

    def tiny(x):
        import time

        time.sleep(0.002)
        return x

    with SharedJobCluster(tiny, sched.address, callback=note("big")) as big:
        big_jobs = [big.submit(i) for i in range(2000)]
        wait_until(lambda: len(order) >= 5)
        with SharedJobCluster(tiny, sched.address, callback=note("small")) as small:
            small_jobs = [small.submit(i) for i in range(20)]
            assert [j(60) for j in small_jobs] == list(range(20))
        wait_until(lambda: order.count("small") == 20)
        with lock:
            last_small = max(i for i, who in enumerate(order) if who == "small")
        # FIFO would finish the small client after all 2,000; round-robin interleaves it at once.
        assert last_small < 400, last_small
        for job in big_jobs:
            big.cancel(job)


def test_a_client_cannot_cancel_or_fetch_another_clients_jobs(start_node, start_scheduler):
    import asyncio
    import uuid as _uuid

    from clusterpy.identity import local_info
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m
    from clusterpy.transport.stream import connect

    from .conftest import SECRET

    sched = start_scheduler([start_node(cpus=2)])
    host, port = sched.address.split(":")

    def sleeper(x):
        import time

        time.sleep(0.3)
        return x

    async def intruder():
        conn = await connect(host, int(port), secret=SECRET.encode(), role="client", info=local_info(),
                             expected_peer_roles=frozenset({"scheduler"}))
        async with conn:
            own = f"c{_uuid.uuid4().hex}"
            conn.send(codec.encode(m.DeployComputation(own, "function", (), b"", None)))
            # Guess job ids (they are small numbers) in its own computation and in guessed ones.
            for job_id in range(1, 200):
                conn.send(codec.encode(m.CancelJob(own, str(job_id), 1)))
                conn.send(codec.encode(m.CancelJob(f"c{_uuid.uuid4().hex}", str(job_id), 1)))
            conn.send(codec.encode(m.AttachComputation(f"c{_uuid.uuid4().hex}")))
            await conn.drain()
            seen = []
            while True:
                msg = codec.decode(await asyncio.wait_for(conn.recv(), 10))
                seen.append(msg)
                if isinstance(msg, m.ComputationFailed) and msg.comp_id != own:
                    return seen

    with SharedJobCluster(sleeper, sched.address) as victim:
        jobs = [victim.submit(i) for i in range(8)]
        seen = asyncio.run(intruder())
        assert [j(30) for j in jobs] == list(range(8))  # nothing of the victim's was cancelled
        assert all(j.status is JobStatus.Finished for j in jobs)
    assert not [msg for msg in seen if isinstance(msg, (m.JobDone, m.JobsStarted))]  # nor did it get any result


def test_two_programs_share_one_scheduler_example(start_node, start_scheduler):
    from .conftest import REPO

    sched = start_scheduler([start_node(cpus=2)])
    out = subprocess.run([sys.executable, str(REPO / "examples" / "shared_pair.py"), sched.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("exit 0, 20 jobs") == 2


def test_result_checking_options_are_refused_clearly():
    from clusterpy.errors import ConfigurationError

    for option in ({"verify": lambda job: True}, {"replicas": 2}):
        with pytest.raises(ConfigurationError, match="does not support"):
            SharedJobCluster(square, "127.0.0.1:1", **option)
