"""``clusterpy``: fan a program out over the cluster from the shell, and subcommands.

::

    clusterpy [OPTIONS] PROGRAM [PROGRAM_ARGS...]   run PROGRAM once per -a / --args-file line
    clusterpy status [OPTIONS]                       list the reachable nodes

Dispatch: if the first argument names a subcommand (:data:`SUBCOMMANDS`), that
subcommand's ``main(argv) -> exit status`` gets the rest; anything else is the fan-out
command. Adding a subcommand is one entry in :data:`SUBCOMMANDS` (``keygen`` imports its
module lazily, so ``clusterpy`` itself starts fast). A program that happens to be called like a subcommand runs as ``./status`` or
after ``--`` (``clusterpy -- status``).

Exit status: 0 every job exited 0; 1 a job failed (they are named on stderr) or no node could
be used; 2 a bad command line (one line and the usage, never a traceback); 130 Ctrl-C; 143
SIGTERM (running jobs are terminated on their nodes first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from . import __version__
from ._fanout import FanOutOptions, JobSpec, run_fanout
from . import tls
from .config import OptionParser, log_level, non_negative_int, positive_float, positive_int, secret_file_from
from .errors import ClusterError, ConfigurationError, DependencyError
from .filestore import validate_comp_id
from .identity import DEFAULT_NODE_PORT

__all__ = ["main", "SUBCOMMANDS", "Subcommand", "build_fanout_parser", "build_status_parser", "status_main"]

log = logging.getLogger("clusterpy.cli")


@dataclass(frozen=True)
class Subcommand:
    """``clusterpy NAME ARGS...`` calls ``main(ARGS)``, which returns the exit status."""

    summary: str
    main: Callable[[list[str]], int]


# ---------------------------------------------------------------- shared pieces


def _nodes_option(opts: OptionParser, group: argparse._ArgumentGroup | None = None) -> None:
    opts.add("-n", "--nodes", many=True, metavar="HOST[:PORT]", group=group,
             help=f"a node's address (port {DEFAULT_NODE_PORT} if left out), or a pattern such as '10.0.1.*' "
                  "that selects discovered nodes; repeat the option or separate them with commas")


def _discovery_options(opts: OptionParser, group: argparse._ArgumentGroup | None = None) -> None:
    opts.add("--discover", flag=True, env=False, group=group,
             help="find nodes by UDP broadcast on the interfaces of CLUSTERPY_DISCOVERY_INTERFACES (default: "
                  "every one) and through --relay (default: when no node is named, or a pattern is given)")
    opts.add("--relay", many=True, metavar="HOST[:PORT]", env=False, group=group,
             help="a clusterpy-netrelay that finds nodes on another network (repeatable)")
    opts.add("--cluster-name", metavar="NAME", default="", env=False, group=group,
             help="discover only the nodes started with this --cluster-name")


def _parse_nodes(values: Sequence[str]) -> list[str]:
    return [n.strip() for value in values for n in value.split(",") if n.strip()]


def _addresses(nodes: Sequence[str], default_port: int = DEFAULT_NODE_PORT) -> list[tuple[str, int]]:
    """``"host"``, ``"host:port"``, ``"[v6]:port"`` -> (host, port)."""
    out = []
    for node in nodes:
        host, sep, port = node.rpartition(":")
        if sep and port.isdigit() and host and not host.endswith(":"):
            out.append((host.strip("[]"), int(port)))
        else:
            out.append((node.strip("[]"), default_port))
    return out


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="clusterpy: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------- fan-out


def build_fanout_parser() -> OptionParser:
    subcommands = "\n".join(f"  clusterpy {name:<8} {sub.summary}" for name, sub in SUBCOMMANDS.items())
    opts = OptionParser(
        "clusterpy", "clusterpy",
        "Ship PROGRAM (and the -f files) to the nodes and run it once per job: each -a gives one\n"
        "job's arguments, split as a shell would. Output comes back grouped per job, or into\n"
        "--output-dir, or as --json lines. With no node given, an embedded local node runs the jobs.\n\n"
        "  clusterpy -f data.csv -f lib.sh -a 'arg11 arg12' -a arg21 ./program\n"
        "  seq 1000 | clusterpy -n node1 -n node2 --args-file - --output-dir out ./program\n\n"
        f"Other commands:\n{subcommands}",
        epilog="Exit status: 0 if every job exited 0; 1 if a job failed (failed jobs are named on stderr)\n"
               "or no node could be used; 2 for a bad command line; 130 after Ctrl-C (running jobs are\n"
               "terminated on their nodes).",
    )
    p = opts.parser
    # Optional to argparse, so that a bad flag is reported as such; checked in _fanout_options.
    p.add_argument("program", metavar="PROGRAM", nargs="?", help="the program to run (a path, or a command on PATH)")
    p.add_argument("program_args", nargs=argparse.REMAINDER, metavar="PROGRAM_ARGS",
                   help="arguments given to every job, before the job's own")
    jobs = p.add_argument_group("jobs")
    opts.add("-a", "--args", many=True, metavar="ARGS", env=False, group=jobs,
             help="one job's arguments, split as a shell would ('-a \"x y\"'; use -a=-x for one starting with -); "
                  "repeat for more jobs. With no -a and no --args-file, one job runs with no arguments")
    opts.add("--args-file", metavar="FILE", env=False, group=jobs,
             help="one job per line ('-' reads stdin); blank lines and lines starting with # are skipped")
    opts.add("-f", "--file", many=True, metavar="PATH", env=False, group=jobs,
             help="a file or directory to ship with the program, into its working directory (repeatable)")
    where = p.add_argument_group("where")
    _nodes_option(opts, where)
    opts.add("--local", flag=True, env=False, group=where,
             help="also run jobs on an embedded node on this machine (default: when no node is given "
                  "and none is discovered within a second)")
    _discovery_options(opts, where)
    opts.add("--secret-file", metavar="FILE", env=False, group=where,
             help="file with the cluster secret (else CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, "
                  "~/.config/clusterpy/secret)")
    opts.add("--dest-path", metavar="NAME", env=False, group=where,
             help="run in, and ship the files to, the directory NAME under each node's dest path, "
                  "kept after the run (default: a private directory, removed afterwards)")
    opts.add("--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS", env=False, group=where,
             help="give up if no node has joined after this long")
    how = p.add_argument_group("how")
    opts.add("--cpus-per-job", type=positive_int, default=1, metavar="N", env=False, group=how,
             help="CPUs each job occupies on its node (a node with fewer runs such a job alone)")
    opts.add("--timeout", type=positive_float, metavar="SECONDS", env=False, group=how,
             help="terminate a job that runs longer than this (it counts as failed: 'timeout')")
    opts.add("--reentrant", flag=True, default=False, env=False, group=how,
             help="if a node is lost, run its jobs again elsewhere (the jobs must be safe to repeat)")
    opts.add("--retries", type=non_negative_int, default=0, metavar="N", env=False, group=how,
             help="run a failed job (non-zero exit, timeout, killed, node lost) again, up to N more times")
    out = p.add_argument_group("output")
    opts.add("--output-dir", metavar="DIR", env=False, group=out,
             help="write DIR/<n>.stdout, DIR/<n>.stderr, DIR/<n>.exit (exit code, or timeout/killed/...) "
                  "and DIR/jobs.jsonl instead of printing the jobs' output")
    opts.add("--json", flag=True, default=False, env=False, group=out,
             help="print one JSON object per job (as it ends) on stdout, with its output")
    opts.add("-q", "--quiet", flag=True, default=False, env=False, group=out,
             help="no progress bar and no summary table; failed jobs are still named")
    opts.add("--log-level", type=log_level, default="WARNING", metavar="LEVEL", env=False, group=out,
             help="clusterpy's own log messages on stderr: DEBUG, INFO, WARNING, ERROR")
    opts.add("--monitor", flag=True, default=False, env=False, group=out,
             help="serve a live web page of the run on 127.0.0.1 (its URL, with a token, goes to stderr); "
                  "needs pip install 'clusterpy[monitor]'")
    opts.add("--monitor-port", metavar="[HOST:]PORT", env=False, group=out,
             help="where the --monitor page listens (implies --monitor; default: a free port on 127.0.0.1)")
    tls.add_tls_arguments(opts)
    p.add_argument("--version", action="version", version=f"clusterpy {__version__}")
    return opts


def _read_jobs(opts: OptionParser, args: argparse.Namespace) -> list[JobSpec]:
    lines: list[tuple[str, str]] = [(f"-a {a!r}", a) for a in args.args]
    if args.args_file:
        try:
            if args.args_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.args_file, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            opts.error(f"--args-file {args.args_file}: {getattr(exc, 'strerror', None) or exc}")
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((f"{args.args_file}:{number}", line))
    specs: list[JobSpec] = []
    for where, line in lines:
        try:
            specs.append(JobSpec(len(specs) + 1, tuple(shlex.split(line))))
        except ValueError as exc:
            opts.error(f"{where}: cannot split the arguments: {exc}")
    if not specs and not args.args_file:
        specs.append(JobSpec(1, ()))
    return specs


def _fanout_options(opts: OptionParser, args: argparse.Namespace) -> FanOutOptions:
    program = args.program
    if program is None:
        opts.error("the PROGRAM to run is missing")
    if not os.path.isfile(program):
        found = shutil.which(program) if os.sep not in program else None
        if found is None:
            opts.error(f"program {program!r} not found")
        program = found
    for path in args.file:
        if not os.path.exists(path):
            opts.error(f"-f {path}: no such file or directory")
    if args.dest_path is not None:
        try:
            validate_comp_id(args.dest_path)
        except DependencyError:
            opts.error(f"--dest-path {args.dest_path!r}: need one directory name of letters, digits, '_', '.', '-'")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        opts.error(f"--output-dir {args.output_dir}: exists and is not a directory")
    return FanOutOptions(
        program=program, fixed_args=list(args.program_args), files=list(args.file),
        nodes=_parse_nodes(args.nodes), local=args.local, secret_file=secret_file_from(args),
        discover=args.discover, relays=list(args.relay), cluster_name=args.cluster_name,
        certfile=args.certfile, keyfile=args.keyfile, cafile=args.cafile,
        cpus_per_job=args.cpus_per_job, timeout=args.timeout, reentrant=args.reentrant, retries=args.retries,
        output_dir=args.output_dir, json=args.json, quiet=args.quiet, dest_path=args.dest_path,
        connect_timeout=args.connect_timeout,
        monitor=args.monitor_port if args.monitor_port is not None else bool(args.monitor),
    )


def fanout_main(argv: Sequence[str]) -> int:
    opts = build_fanout_parser()
    args = opts.parse(argv)
    _setup_logging(args.log_level)
    options = _fanout_options(opts, args)
    specs = _read_jobs(opts, args)
    if not specs:
        print("clusterpy: no jobs to run (the args file has no job lines)", file=sys.stderr)
        return 0
    try:
        return run_fanout(options, specs)
    except (ConfigurationError, DependencyError) as exc:
        opts.error(str(exc))
    except ClusterError as exc:
        print(f"clusterpy: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- status


def build_status_parser() -> OptionParser:
    opts = OptionParser(
        "clusterpy status", "clusterpy.status",
        "Ask each node how it is doing and list the ones that answer: address, host, CPUs,\n"
        "jobs running and queued, jobs done, load average, clusterpy version, uptime.\n"
        "With no --nodes (or with a pattern), nodes are discovered first; if none is found,\n"
        f"127.0.0.1:{DEFAULT_NODE_PORT} is asked.",
        epilog="Exit status: 0 if every node answered, 1 if one did not (it is listed on stderr), 2 for a "
               "bad command line.",
    )
    _nodes_option(opts)
    _discovery_options(opts)
    opts.add("--wait", type=positive_float, default=1.0, metavar="SECONDS", env=False,
             help="how long to listen for discovered nodes")
    opts.add("--json", flag=True, default=False, env=False, help="one JSON object per node on stdout")
    opts.add("--timeout", type=positive_float, default=5.0, metavar="SECONDS", env=False,
             help="how long to wait for each node")
    opts.add("--secret-file", metavar="FILE", env=False,
             help="file with the cluster secret (else CLUSTERPY_SECRET, CLUSTERPY_SECRET_FILE, "
                  "~/.config/clusterpy/secret)")
    tls.add_tls_arguments(opts)
    return opts


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def status_main(argv: Sequence[str]) -> int:
    """``clusterpy status``: returns 0 if every node answered, else 1."""
    from .discovery import DEFAULT_RELAY_PORT, is_pattern
    from .secret import load_secret
    from .status import discover_nodes, query_nodes

    opts = build_status_parser()
    args = opts.parse(argv)
    nodes = _parse_nodes(args.nodes)
    explicit = [n for n in nodes if not is_pattern(n)]
    patterns = [n for n in nodes if is_pattern(n)]
    discover = args.discover if args.discover is not None else bool(patterns or args.relay or not nodes)
    try:
        secret = load_secret(secret_file=secret_file_from(args))
        ssl = tls.client_context_from(args.certfile, args.keyfile, args.cafile)
    except ConfigurationError as exc:
        opts.error(str(exc))
    addresses = _addresses(explicit)
    if discover:
        try:
            found = asyncio.run(discover_nodes(
                secret, port=DEFAULT_NODE_PORT, wait=args.wait, patterns=patterns, cluster_name=args.cluster_name,
                relays=_addresses(args.relay, DEFAULT_RELAY_PORT)))
        except OSError as exc:
            print(f"clusterpy status: discovery failed: {exc}", file=sys.stderr)
            found = []
        addresses += [a for a in found if a not in addresses]
        if not addresses:
            print(f"clusterpy status: no node discovered within {args.wait:g}s", file=sys.stderr)
            if patterns:
                return 1
            addresses = [("127.0.0.1", DEFAULT_NODE_PORT)]
    results = asyncio.run(query_nodes(addresses, secret=secret, timeout=args.timeout, ssl=ssl))
    if args.json:
        for result in results:
            print(json.dumps(result.as_dict()), flush=True)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title_justify="left")
        for name, justify in (("Node", "left"), ("Host", "left"), ("CPUs", "right"), ("Running", "right"),
                              ("Queued", "right"), ("Done", "right"), ("Load", "right"), ("Version", "left"),
                              ("Up", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for r in results:
            if r.reply is not None:
                s = r.reply
                table.add_row(r.address, s.hostname, str(s.cpus), str(s.busy), str(s.queued), str(s.jobs_done),
                              f"{s.load[0]:.2f}", s.version, _duration(s.uptime))
        if any(r.reachable for r in results):
            Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    for r in results:
        if not r.reachable:
            print(f"clusterpy status: {r.address}: unreachable: {r.error}", file=sys.stderr)
    return 0 if all(r.reachable for r in results) else 1


# ---------------------------------------------------------------- dispatch

def _keygen_main(argv: list[str]) -> int:
    from .keygen import main as keygen_main  # lazily: cryptography is slow to import

    return keygen_main(argv)


#: ``clusterpy NAME ...`` runs ``SUBCOMMANDS[NAME]``; anything else is the fan-out command.
SUBCOMMANDS: dict[str, Subcommand] = {
    "status": Subcommand("list the reachable nodes and what they are doing", status_main),
    "keygen": Subcommand("create a cluster CA, node and client certificates, and a secret", _keygen_main),
}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``clusterpy`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]].main(argv[1:])
        return fanout_main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the jobs started (while parsing, reading stdin)
        return 130


if __name__ == "__main__":
    sys.exit(main())
