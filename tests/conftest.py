"""Fixtures that start real clusterpy daemons on loopback and make sure none outlive the tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# Every daemon (and so every worker) started by the tests carries this marker in its
# environment, so the session can prove that none was left running.
RUN_MARKER = f"clusterpy-test-{uuid.uuid4().hex}"
os.environ["CLUSTERPY_TEST_RUN"] = RUN_MARKER
# Discovery broadcasts only on loopback unless a test says otherwise (the network-namespace
# tests do, inside their own namespaces): never on this machine's real interfaces.
os.environ["CLUSTERPY_DISCOVERY_INTERFACES"] = "lo"

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + uuid.uuid4().hex


@pytest.fixture(autouse=True, scope="session")
def _cluster_secret(tmp_path_factory):
    """A secret for the whole run, through the environment, so no test touches ~/.config."""
    path = tmp_path_factory.mktemp("secret") / "secret"
    path.write_text(SECRET)
    path.chmod(0o600)
    old = {k: os.environ.get(k) for k in ("CLUSTERPY_SECRET_FILE", "CLUSTERPY_SECRET")}
    os.environ["CLUSTERPY_SECRET_FILE"] = str(path)
    os.environ.pop("CLUSTERPY_SECRET", None)
    yield path
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def marked_processes() -> list[tuple[int, str]]:
    """Processes (other than this one) whose environment carries this run's marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            if RUN_MARKER.encode() not in env:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if state != "Z":
            found.append((int(entry), cmd))
    return found


class NodeProcess:
    """A real `python -m clusterpy.node` process on 127.0.0.1."""

    def __init__(self, tmp: Path, cpus: int = 2, extra: list[str] | None = None, env: dict[str, str] | None = None):
        self.dest = tmp / f"node-{uuid.uuid4().hex[:8]}"
        self.log_path = self.dest.with_suffix(".log")
        cmd = [sys.executable, "-m", "clusterpy.node", "--port", "0", "--cpus", str(cpus),
               "--dest-path", str(self.dest), "--log-level", "DEBUG", *(extra or [])]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     env={**os.environ, **(env or {})}, cwd=tmp)
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on ([\d.]+):(\d+) cpus=(\d+) id=(\w+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"node did not start: {line!r}\n{self.log()}")
        self.host, self.port, self.cpus, self.node_id = match[1], int(match[2]), int(match[3]), match[4]
        self.address = f"{self.host}:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_node(tmp_path):
    nodes: list[NodeProcess] = []

    def start(cpus: int = 2, extra: list[str] | None = None, env: dict[str, str] | None = None) -> NodeProcess:
        node = NodeProcess(tmp_path, cpus, extra, env)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(start_node):
    return start_node()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def pytest_sessionfinish(session, exitstatus):
    """No daemon or worker process may outlive the test session."""
    deadline = time.monotonic() + 10
    left = marked_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marked_processes()
    if left:
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print("\nLEAKED PROCESSES:\n" + "\n".join(f"  {pid} {cmd}" for pid, cmd in left), file=sys.stderr)
        session.exitstatus = 1
