"""Hosts as Linux network namespaces, for tests that need several machines and real broadcast.

::

        subnet A (10.<n>.1.0/24)                      subnet B (10.<n>.2.0/24)
    host ns ── veth ──┐                            ┌── veth ── host ns
    host ns ── veth ──┤ bridge "bra" (.1)  router  │ bridge "brb" (.1) ├── veth ── host ns
                      └──────────── namespace, ip_forward=1 ───────────┘

Every namespace, bridge and veth lives inside namespaces this module creates (nothing is added
to the machine's own network): the router namespace holds the bridges and one end of each
veth pair; each host namespace holds the other end (``eth0``) and ``lo``, with a default route
through the router. Broadcasts stay on their subnet, unicast is routed between subnets.
Namespace names carry a random token, so parallel runs and leftovers of a killed run never
collide. :meth:`Network.close` stops the daemons, kills whatever still runs inside *our*
namespaces, and deletes them; it is safe to call twice.

Use :func:`unavailable` to skip (not root, no ``ip``, no namespace support) with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["unavailable", "Network", "Host", "Daemon", "CLIENT_SCRIPT"]

_IP = shutil.which("ip") or "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([_IP, *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


def unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network-namespace tests need root (run the suite as root, as CI does)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"cpy-probe-{secrets.token_hex(3)}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Daemon:
    """A process started inside a namespace; its stdout lines are kept, stderr goes to a log file."""

    def __init__(self, ns: str, argv: list[str], *, env: dict[str, str], log_path: Path, stdin: bool = False) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # `ip netns exec` execs the command, so proc.pid is the daemon itself.
        self.proc = subprocess.Popen([_IP, "netns", "exec", ns, *argv], env=env, stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first *new* stdout line matching ``pattern``; raises with the log on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.01, left))
            except queue.Empty:
                line = ""
            if line is None or (not line and left <= 0):
                what = "exited" if line is None else f"printed nothing matching {pattern!r} in {timeout}s"
                raise AssertionError(f"daemon {what}; stdout: {''.join(self.lines)!r}\nlog:\n{self.log()[-4000:]}")
            match = re.search(pattern, line) if line else None
            if match:
                return match

    def json(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next JSON line whose "event" is ``event`` (the client script's output)."""
        while True:
            match = self.wait_for(r"^\{.*\}$", timeout)
            record = json.loads(match.group(0))
            if record.get("event") == event:
                return record

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._reader.join(5)
        self._log.close()
        return self.proc.returncode


@dataclass
class Host:
    """One namespace on one subnet."""

    network: "Network"
    label: str
    ns: str
    address: str
    subnet: str
    daemons: list[Daemon] = field(default_factory=list)

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_IP, "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=timeout, env=self.network.env())

    def start(self, argv: list[str], *, env: dict[str, str] | None = None, stdin: bool = False,
              name: str = "daemon") -> Daemon:
        """Start ``argv`` in this host; stopped by :meth:`Network.close` if not before."""
        log_path = self.network.tmp / f"{self.label}-{name}-{len(self.daemons)}.log"
        daemon = Daemon(self.ns, argv, env=self.network.env(env), log_path=log_path, stdin=stdin)
        self.daemons.append(daemon)
        return daemon

    def start_node(self, *extra: str, env: dict[str, str] | None = None, cpus: int = 1) -> Daemon:
        """A clusterpy-node on 0.0.0.0:9700 (all of this host's interfaces), logging at DEBUG."""
        dest = self.network.tmp / f"{self.label}-dest-{len(self.daemons)}"
        return self.start([sys.executable, "-m", "clusterpy.node", "--host", "0.0.0.0", "--port", "9700",
                           "--cpus", str(cpus), "--dest-path", str(dest), "--log-level", "DEBUG", *extra],
                          env=env, name="node")

    def python(self, code: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False,
               name: str = "py") -> Daemon:
        return self.start([sys.executable, "-c", code, *args], env=env, stdin=stdin, name=name)


class Network:
    """Two subnets, A and B, joined by a router namespace. See the module docstring."""

    def __init__(self, tmp: Path, *, hosts_a: list[str], hosts_b: list[str]) -> None:
        self.tmp = tmp
        self.token = secrets.token_hex(3)
        self.second = 64 + secrets.randbelow(128)  # 10.<second>.1.0/24: namespaces are private anyway
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._closed = False
        try:
            self.router = self._namespace("r")
            _ip("netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for i, (subnet, labels) in enumerate((("a", hosts_a), ("b", hosts_b)), start=1):
                bridge = f"br{subnet}"
                _ip("-n", self.router, "link", "add", bridge, "type", "bridge")
                _ip("-n", self.router, "addr", "add", f"{self._prefix(i)}.1/24", "brd", "+", "dev", bridge)
                _ip("-n", self.router, "link", "set", bridge, "up")
                for j, label in enumerate(labels, start=10):
                    self._add_host(label, subnet, bridge, f"{self._prefix(i)}.{j}", f"{self._prefix(i)}.1")
        except BaseException:
            self.close()
            raise

    def _prefix(self, subnet: int) -> str:
        return f"10.{self.second}.{subnet}"

    def subnet(self, name: str) -> str:
        """``"a"`` or ``"b"`` -> ``"10.x.1.0/24"``."""
        return f"{self._prefix(1 if name == 'a' else 2)}.0/24"

    def broadcast(self, name: str) -> str:
        return f"{self._prefix(1 if name == 'a' else 2)}.255"

    def _namespace(self, label: str) -> str:
        ns = f"cpy-{self.token}-{label}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _add_host(self, label: str, subnet: str, bridge: str, address: str, gateway: str) -> None:
        ns = self._namespace(label)
        port = f"v{label}"[:15]
        _ip("-n", self.router, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.router, "link", "set", port, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "brd", "+", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", gateway)
        self.hosts[label] = Host(self, label, ns, address, subnet)

    def __getitem__(self, label: str) -> Host:
        return self.hosts[label]

    @staticmethod
    def env(extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for processes in the namespaces: the test session's, except that
        broadcasts may use every interface (inside a namespace, every interface is ours)."""
        env = {k: v for k, v in os.environ.items() if k != "CLUSTERPY_DISCOVERY_INTERFACES"}
        env.update(extra or {})
        return env

    def close(self) -> None:
        """Stop every daemon, kill stragglers inside our namespaces, delete the namespaces."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for daemon in host.daemons:
                daemon.stop()
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside a namespace this run created
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: A client for ``Host.python(CLIENT_SCRIPT, json.dumps(config), stdin=True)``. ``config``:
#: ``{"options": {JobCluster keyword arguments}, "steps": [...]}``; steps, each printing one
#: JSON line: ``["wait_nodes", n, timeout]`` (event "nodes"), ``["sleep", s]`` ("nodes"),
#: ``["pause"]`` ("paused", then waits for a line on stdin), ``["jobs", count, delay]``
#: ("jobs": how many ran on each node address). The first line is event "started".
CLIENT_SCRIPT = r'''
import collections, json, sys, time
import clusterpy

def compute(delay):
    import time
    time.sleep(delay)
    return delay

def emit(event, **kw):
    print(json.dumps({"event": event, **kw}), flush=True)

def addresses(cluster):
    return sorted(n["ip_addr"] for n in cluster.nodes())

cfg = json.loads(sys.argv[1])
with clusterpy.JobCluster(compute, **cfg.get("options", {})) as cluster:
    disc = cluster._rt.discovery
    emit("started", request_port=disc.request_port if disc else None, broadcasts=disc.broadcasts if disc else [])
    for step in cfg["steps"]:
        if step[0] == "wait_nodes":
            deadline = time.monotonic() + step[2]
            while len(cluster.nodes()) < step[1] and time.monotonic() < deadline:
                time.sleep(0.05)
            emit("nodes", nodes=addresses(cluster))
        elif step[0] == "sleep":
            time.sleep(step[1])
            emit("nodes", nodes=addresses(cluster))
        elif step[0] == "pause":
            emit("paused", nodes=addresses(cluster))
            sys.stdin.readline()
        elif step[0] == "jobs":
            jobs = [cluster.submit(step[2]) for _ in range(step[1])]
            results = [job() for job in jobs]
            emit("jobs", by_node=dict(collections.Counter(job.ip_addr for job in jobs)), results=len(results))
emit("done")
'''
