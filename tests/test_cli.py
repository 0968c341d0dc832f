"""The command lines, run as real subprocesses against real clusterpy-node processes.

``clusterpy`` (fan-out and ``status``), ``clusterpy-node`` options and signals, and the
option machinery of :mod:`clusterpy.config` (precedence flag > env > config file > default).
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clusterpy.config import OptionParser, byte_size, positive_int
from clusterpy.secret import load_secret
from clusterpy.status import query_nodes

from .conftest import REPO, marked_processes, wait_until

CLI = [sys.executable, "-m", "clusterpy"]


def run_cli(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def program(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def records(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines() if line.strip()), key=lambda r: r["job"])


def wait_busy(node, cli: subprocess.Popen, busy: int) -> None:
    """Wait until ``busy`` jobs run on the node; fail at once, with its output, if the CLI ended."""
    def ready() -> bool:
        if cli.poll() is not None:
            raise AssertionError(f"the CLI ended early ({cli.returncode}): {cli.communicate()}")
        return node_status(node)["busy"] == busy

    wait_until(ready, timeout=30, interval=0.2)


def node_status(node) -> dict:
    [status] = asyncio.run(query_nodes([(node.host, node.port)], secret=load_secret(), timeout=5))
    assert status.reachable, status.error
    return status.as_dict()


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines)}


def script_cmd(name: str) -> list[str]:
    """Run a console script as declared in setup.cfg (installed or not)."""
    module, _, func = console_scripts()[name].partition(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"]


# ---------------------------------------------------------------- every console script


@pytest.mark.parametrize("argv", [[name] for name in console_scripts()] + [["clusterpy", "status"]])
def test_help_of_every_console_script(argv):
    assert "clusterpy" in console_scripts() and "clusterpy-node" in console_scripts()
    proc = subprocess.run([*script_cmd(argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and len(proc.stdout.splitlines()) > 5
    if argv[0] in ("clusterpy", "clusterpy-node"):  # made with clusterpy.config.OptionParser
        assert "--config FILE" in proc.stdout
        assert "Precedence: command line > environment > config file > default" in proc.stdout


@pytest.mark.parametrize("argv", [[name] for name in console_scripts()] + [["clusterpy", "status"]])
def test_bad_flag_is_one_line_and_usage_exit_2(argv):
    proc = subprocess.run([*script_cmd(argv[0]), *argv[1:], "--no-such-flag", "x"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage:") and "Traceback" not in proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "--no-such-flag" in error


@pytest.mark.parametrize("args, env, message", [
    (["--cpus", "0"], {}, "argument --cpus: must be at least 1"),
    ([], {"CLUSTERPY_PORT": "http"}, "environment variable CLUSTERPY_PORT='http': not an integer"),
    ([], {"CLUSTERPY_CLEAN": "maybe"}, "CLUSTERPY_CLEAN='maybe': expected true or false"),
    (["--config", "/nonexistent/clusterpy.toml"], {}, "cannot read config file /nonexistent/clusterpy.toml"),
    (["--max-file-size", "lots"], {}, "not a size: 'lots'"),
])
def test_node_bad_values_exit_2_naming_the_source(args, env, message, tmp_path):
    proc = subprocess.run([*script_cmd("clusterpy-node"), "--dest-path", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- option machinery (no processes)


def _parser() -> OptionParser:
    opts = OptionParser("prog", "node", "test")
    opts.add("--port", type=positive_int, default=9700, help="port")
    opts.add("--clean", flag=True, default=False, help="clean")
    opts.add("-n", "--nodes", many=True, help="nodes")
    opts.add("--secret-file", env=False, help="secret")
    opts.parser.add_argument("--plain", type=byte_size, default=5, help="added with argparse directly")
    return opts


def test_precedence_flag_env_config_default(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nport = 1111\nclean = true\nnodes = ["a", "b:1"]\nplain = "2K"\n'
                   '[other]\nport = "not ours"\n')
    args = _parser().parse([], environ={})
    assert (args.port, args.clean, args.nodes, args.plain) == (9700, False, [], 5)
    assert args._sources["port"] == "default"
    args = _parser().parse(["--config", str(cfg)], environ={})
    assert (args.port, args.clean, args.nodes, args.plain) == (1111, True, ["a", "b:1"], 2048)
    env = {"CLUSTERPY_PORT": "2222", "CLUSTERPY_CLEAN": "no", "CLUSTERPY_NODES": "x, y z", "CLUSTERPY_PLAIN": "1M",
           "CLUSTERPY_CONFIG": str(cfg)}
    args = _parser().parse([], environ=env)
    assert (args.port, args.clean, args.nodes, args.plain) == (2222, False, ["x", "y", "z"], 1 << 20)
    assert args._sources["port"] == "env" and args.config == str(cfg)
    args = _parser().parse(["--port", "3333", "--clean", "-n", "q", "--plain", "7"], environ=env)
    assert (args.port, args.clean, args.nodes, args.plain) == (3333, True, ["q"], 7)
    args = _parser().parse(["--no-clean"], environ={"CLUSTERPY_CLEAN": "yes"})
    assert args.clean is False and args._sources["clean"] == "flag"


def test_env_only_where_allowed_and_config_errors(tmp_path, capsys):
    assert _parser().parse([], environ={"CLUSTERPY_SECRET_FILE": "/x"}).secret_file is None
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nprot = 1\n")
    with pytest.raises(SystemExit) as info:
        _parser().parse(["--config", str(cfg)], environ={})
    assert info.value.code == 2 and "unknown option 'prot' in [node]" in capsys.readouterr().err
    cfg.write_text("[node\n")
    with pytest.raises(SystemExit):
        _parser().parse(["--config", str(cfg)], environ={})
    assert "is not valid TOML" in capsys.readouterr().err
    cfg.write_text("[node]\nport = [1, 2]\n")
    with pytest.raises(SystemExit):
        _parser().parse(["--config", str(cfg)], environ={})
    assert "expected a single value" in capsys.readouterr().err
    help_text = " ".join(_parser().parser.format_help().split())
    assert "[env CLUSTERPY_PLAIN]" in help_text and "CLUSTERPY_SECRET_FILE" not in help_text


def test_node_reads_env_and_config(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\ncpus = 3\nport = 0\nlog-level = "WARNING"\n')

    def first_line(*args: str, **env: str) -> str:
        proc = subprocess.Popen([*script_cmd("clusterpy-node"), "--dest-path", str(tmp_path / "d"),
                                 "--no-discovery", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, **env})
        try:
            return proc.stdout.readline()
        finally:
            proc.terminate()
            assert proc.wait(15) == 0

    assert "cpus=3" in first_line("--config", str(cfg))
    assert "cpus=1" in first_line("--config", str(cfg), CLUSTERPY_CPUS="1")
    assert "cpus=2" in first_line("--cpus", "2", CLUSTERPY_CPUS="1", CLUSTERPY_CONFIG=str(cfg))


# ---------------------------------------------------------------- fan-out


ECHO_ARGS = """\
    . ./lib.sh
    greet
    for a in "$@"; do echo "<$a>"; done
    cat data.csv
    echo "stderr of $1" >&2
    exit "${EXIT:-0}"
"""


def test_arguments_split_and_files_reach_the_program(node, tmp_path):
    prog = program(tmp_path, "prog.sh", ECHO_ARGS)
    (tmp_path / "data.csv").write_text("x,y\n1,2\n")
    (tmp_path / "lib.sh").write_text('greet() { echo "lib loaded"; }\n')
    proc = run_cli("-n", node.address, "-f", str(tmp_path / "data.csv"), "-f", str(tmp_path / "lib.sh"),
                   "-a", "arg11 arg12", "-a", "arg21", "-a", "'two words' \"x y\" z\\ z", "--json", str(prog))
    assert proc.returncode == 0, proc.stderr
    recs = records(proc.stdout)
    assert [r["args"] for r in recs] == [["arg11", "arg12"], ["arg21"], ["two words", "x y", "z z"]]
    for rec in recs:
        assert rec["ok"] and rec["status"] == "exited" and rec["exit_code"] == 0 and rec["attempts"] == 1
        assert rec["node"] == node.address and rec["wall_time"] >= 0
        expected = "lib loaded\n" + "".join(f"<{a}>\n" for a in rec["args"]) + "x,y\n1,2\n"
        assert rec["stdout"] == expected
        assert rec["stderr"] == f"stderr of {rec['args'][0]}\n"
    # Output not on a terminal: no progress bar; the summary goes to stderr, stdout is pure JSON.
    assert "jobs/s" not in proc.stderr and "jobs per node" in proc.stderr


def test_output_dir_and_exit_status_with_one_failing_job(node, tmp_path):
    prog = program(tmp_path, "prog.sh", 'echo "out $1"\necho "err $1" >&2\nexit "$1"\n')
    args_file = tmp_path / "jobs.txt"
    args_file.write_text("0\n# a comment\n\n3\n0 'a b'\n")
    out = tmp_path / "out"
    proc = run_cli("-n", node.address, "--args-file", str(args_file), "--output-dir", str(out), str(prog))
    assert proc.returncode == 1
    assert "1 of 3 jobs failed: job 2 [3]: exit 3" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{s}" for n in (1, 2, 3) for s in ("stdout", "stderr", "exit")] + ["jobs.jsonl"])
    assert (out / "2.stdout").read_text() == "out 3\n" and (out / "2.stderr").read_text() == "err 3\n"
    assert [(out / f"{n}.exit").read_text() for n in (1, 2, 3)] == ["0\n", "3\n", "0\n"]
    recs = records((out / "jobs.jsonl").read_text())
    assert [r["args"] for r in recs] == [["0"], ["3"], ["0", "a b"]] and "stdout" not in recs[0]
    assert [r["ok"] for r in recs] == [True, False, True]


def test_grouped_labelled_output_timeout_and_retries(node, tmp_path):
    prog = program(tmp_path, "prog.sh", """\
        case "$1" in
          slow) sleep 30 ;;
          flaky) if [ -e tried ]; then echo second try; else touch tried; exit 4; fi ;;
          *) echo "hello $1" ;;
        esac
    """)
    proc = run_cli("-n", node.address, "--timeout", "1", "--retries", "1", "-a", "world", "-a", "flaky",
                   "-a", "slow", str(prog))
    assert proc.returncode == 1
    assert "==> job 1 [world] on " + node.address + ": exit 0" in proc.stdout
    assert proc.stdout.split("==> job 1 [world]")[1].split("\n", 1)[1].startswith("hello world\n")
    assert "==> job 2 [flaky]" in proc.stdout and "second try" in proc.stdout
    assert "job 2 [flaky] on " in proc.stderr and "exit 4; retrying (1 of 1 retries)" in proc.stderr
    assert "1 of 3 jobs failed: job 3 [slow]: timeout" in proc.stderr


def test_sigint_terminates_running_jobs_and_exits_130(start_node, tmp_path):
    node = start_node(cpus=2)
    prog = program(tmp_path, "sleeper.sh", 'if [ "$1" = quick ]; then echo done quick; exit 0; fi\nexec sleep 60\n')
    cli = subprocess.Popen([*CLI, "-n", node.address, "--json", "-a", "quick", "-a", "long1", "-a", "long2",
                            "-a", "long3", str(prog)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = cli.stdout.readline()  # the quick job's record: it has finished, as far as the CLI knows
        wait_busy(node, cli, 2)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=20)
        out = first + out
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err
    assert "interrupted: 1 of 4 jobs finished" in err and "Traceback" not in err
    assert [r["args"] for r in records(out)] == [["quick"]]
    status = wait_until(lambda: (s := node_status(node))["busy"] == 0 and s, timeout=10, interval=0.2)
    assert status["queued"] == 0 and status["busy_cpus"] == 0
    assert not [cmd for _pid, cmd in marked_processes() if "sleep 60" in cmd]


def test_progress_bar_shown_on_a_terminal(node, tmp_path):
    prog = program(tmp_path, "prog.sh", "sleep 0.3\necho hi\n")
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*CLI, "-n", node.address, "-a", "1", "-a", "2", "-a", "3", str(prog)],
                            stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(primary)
        assert proc.wait(30) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "jobs/s" in screen and "3/3" in screen and "0 failed" in screen and "━" in screen
    assert "==> job 1 [1]" in screen and "hi" in screen


def test_cpus_per_job_is_honoured_by_the_node(start_node, tmp_path):
    node = start_node(cpus=2)
    prog = program(tmp_path, "prog.sh", "sleep 0.4\n")

    def overlapping(*extra: str) -> bool:
        proc = run_cli("-n", node.address, "--json", "-a", "a", "-a", "b", *extra, str(prog))
        assert proc.returncode == 0, proc.stderr
        first, second = records(proc.stdout)
        return first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]

    assert overlapping()
    assert not overlapping("--cpus-per-job", "2")


def test_dest_path_names_the_working_directory_and_is_kept(node, tmp_path):
    prog = program(tmp_path, "prog.sh", 'pwd\necho "$1" > "result-$1.txt"\n')
    proc = run_cli("-n", node.address, "--dest-path", "myrun", "--json", "-a", "7", str(prog))
    assert proc.returncode == 0, proc.stderr
    [rec] = records(proc.stdout)
    assert rec["stdout"].strip() == str(node.dest / "myrun")
    assert (node.dest / "myrun" / "result-7.txt").read_text() == "7\n"
    assert run_cli("-n", node.address, "--dest-path", "../up", str(prog)).returncode == 2


def test_no_reachable_node_fails_fast_with_a_message(tmp_path):
    prog = program(tmp_path, "prog.sh", "true\n")
    proc = run_cli("-n", "127.0.0.1:1", "--connect-timeout", "1", "-q", str(prog))
    assert proc.returncode == 1
    assert "no node joined within 1s (tried 127.0.0.1:1)" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- status


def test_status_lists_nodes(start_node):
    a, b = start_node(cpus=1), start_node(cpus=3)
    proc = run_cli("status", "-n", a.address, "-n", b.address, "--json")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["address"], r["reachable"], r["cpus"], r["node_id"]) for r in recs] == [
        (a.address, True, 1, a.node_id), (b.address, True, 3, b.node_id)]
    import clusterpy

    for r in recs:
        assert r["version"] == clusterpy.__version__ and r["busy"] == 0 and r["queued"] == 0
        assert r["uptime"] > 0 and len(r["load"]) == 3 and r["hostname"]
    proc = run_cli("status", "-n", f"{a.address},127.0.0.1:1")
    assert proc.returncode == 1
    assert a.address in proc.stdout and "CPUs" in proc.stdout
    assert "127.0.0.1:1: unreachable" in proc.stderr


# ---------------------------------------------------------------- clusterpy-node daemon


def test_node_sigterm_with_a_running_job_leaves_no_orphans(start_node, tmp_path):
    node = start_node(cpus=1)
    prog = program(tmp_path, "prog.sh", "exec sleep 60\n")
    cli = subprocess.Popen([*CLI, "-n", node.address, "-q", "-a", "x", str(prog)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_busy(node, cli, 1)
        # A worker, and the program it runs (forked a moment after the node counts the job busy).
        family = wait_until(lambda: len(f := descendants(node.proc.pid)) >= 2 and f)
        start = time.monotonic()
        assert node.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 10
        assert not [pid for pid in family if alive(pid)]
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 1 and "job 1 [x]" in err


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_node_serve_n_exits_after_n_computations(start_node, tmp_path):
    node = start_node(extra=["--serve", "2"])
    prog = program(tmp_path, "prog.sh", "true\n")
    assert run_cli("status", "-n", node.address).returncode == 0  # a status query is not a computation
    assert run_cli("-q", "-n", node.address, str(prog)).returncode == 0
    assert node.alive()
    assert run_cli("-q", "-n", node.address, str(prog)).returncode == 0
    node.proc.wait(15)
    assert node.proc.returncode == 0


def test_node_clean_only_a_directory_it_made(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    cmd = [*script_cmd("clusterpy-node"), "--port", "0", "--dest-path", str(dest), "--clean", "--no-discovery"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "refusing to --clean" in proc.stderr
    assert (dest / "precious.txt").exists()
    (dest / "precious.txt").unlink()
    for argv in (cmd[:-2] + cmd[-1:], cmd):  # the first run (no --clean) marks the directory
        (dest / "junk").mkdir(exist_ok=True)
        node = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert "listening on" in node.stdout.readline()
        finally:
            node.terminate()
            assert node.wait(15) == 0
    assert not (dest / "junk").exists() and (dest / ".clusterpy-node").exists()


def test_node_max_file_size_refuses_big_files(start_node, tmp_path):
    node = start_node(extra=["--max-file-size", "1K"])
    prog = program(tmp_path, "prog.sh", "true\n")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 4096)
    proc = run_cli("-q", "-n", node.address, "-f", str(big), "--connect-timeout", "2", str(prog))
    assert proc.returncode == 1
    assert "this node accepts at most 1024" in proc.stderr


# ---------------------------------------------------------------- the example


def test_example_fanout_sh(node, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program(bindir, "clusterpy", f'exec "{sys.executable}" -m clusterpy "$@"\n')
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(REPO / "examples" / "fanout.sh"), node.address], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    for header, lines in (("[alpha beta]", "alpha: 1\nbeta: 1\n"), ("[gamma]", "gamma: 1\n"), ("[ta eps]", "ta: 2\neps: 1\n")):
        assert f"{header} on {node.address}: exit 0" in proc.stdout
        assert proc.stdout.split(header)[1].split("\n", 1)[1].startswith(lines)
    assert "3 of 3 jobs ran" in proc.stderr
