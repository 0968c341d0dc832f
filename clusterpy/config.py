"""Options for clusterpy's command-line programs: flag > environment > config file > default.

Every daemon (``clusterpy-node``, later ``clusterpy-scheduler`` and ``clusterpy-netrelay``) and
the ``clusterpy`` command declare their options once with :class:`OptionParser`; each option
can then be given, first match wins:

1. on the command line (``--port 9701``; booleans also as ``--no-clean``);
2. in the environment, ``CLUSTERPY_<NAME>`` (``CLUSTERPY_PORT=9701``; booleans as
   1/0, true/false, yes/no, on/off; lists separated by commas or spaces);
3. in the TOML file named by ``--config FILE`` (or ``CLUSTERPY_CONFIG``), in the table named
   after the program, with the option's long name (dashes or underscores)::

       [node]                  # read by clusterpy-node
       port = 9701
       cpus = 4
       dest-path = "/var/lib/clusterpy"
       clean = true

       [clusterpy]             # read by the clusterpy command
       nodes = ["10.0.0.5", "10.0.0.6:9701"]

   Tables of other programs are ignored, so one file can serve them all (a subcommand reads
   a sub-table: ``[clusterpy.status]``); an unknown key in the program's own table is an
   error (a typo must not be silently ignored);
4. the option's default.

A bad value from any source is reported like a bad flag: one line naming the source, the
usage, and exit status 2 (argparse's convention), never a traceback.

The parser itself is plain :mod:`argparse`; defaults are kept out of argparse (its default
is None, which no command-line value can be) so that an option left off the command line
can be told from one given with its default value, which precedence needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Mapping, NoReturn, Sequence

from ._malloc import MiB, tune_malloc
from .errors import ClusterError, ConfigurationError
from .secret import load_secret

__all__ = [
    "ENV_PREFIX",
    "OptionParser",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "byte_size",
    "log_level",
    "setup_logging",
    "run_daemon",
    "secret_file_from",
]

ENV_PREFIX = "CLUSTERPY_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# ---------------------------------------------------------------- value types


def _number(text: str | int | float, kind: type) -> Any:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def positive_int(text: str | int) -> int:
    """An integer >= 1 (an argparse ``type=``; raises ArgumentTypeError otherwise)."""
    value: int = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str | int) -> int:
    """An integer >= 0."""
    value: int = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def positive_float(text: str | float) -> float:
    """A finite number > 0 (seconds, usually)."""
    value: float = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


def byte_size(text: str | int) -> int:
    """A size in bytes: ``1048576``, ``512K``, ``64M``, ``2G`` (powers of 1024); >= 1."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.fullmatch(text)
        if not match:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1048576, 512K, 64M, 2G)")
        value = int(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {value}")
    return value


def log_level(text: str) -> str:
    """A logging level name, case-insensitive."""
    name = str(text).upper()
    if name not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_LOG_LEVELS)}")
    return name


def setup_logging(level: str, log_file: str | None = None) -> None:
    """Configure the root logger once for a daemon: to ``log_file`` (appended) or stderr.

    Raises:
        OSError: the log file cannot be opened.
    """
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def secret_file_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """The ``--secret-file`` to pass to :func:`clusterpy.secret.load_secret`, with precedence kept.

    ``load_secret`` reads ``CLUSTERPY_SECRET`` and ``CLUSTERPY_SECRET_FILE`` itself, after an
    explicit file; so a file named only in the config file must give way to them.
    """
    environ = os.environ if environ is None else environ
    value: str | None = getattr(args, "secret_file", None)
    if getattr(args, "_sources", {}).get("secret_file") == "config" and (
            environ.get("CLUSTERPY_SECRET") or environ.get("CLUSTERPY_SECRET_FILE")):
        return None
    return value


# ---------------------------------------------------------------- the parser


@dataclass(frozen=True)
class _Option:
    dest: str
    key: str  # long name without dashes: the config-file key
    env: str | None
    default: Any
    convert: Callable[[Any], Any] | None
    kind: str  # "value" | "flag" | "list"
    choices: tuple[Any, ...] | None


_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
_NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._StoreConstAction,
                argparse._AppendConstAction, argparse._CountAction)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; wraps option help as usual."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """While :meth:`OptionParser._parse_given` hides the defaults, help still shows them."""

    hidden_defaults: list[tuple[argparse.Action, Any]] = []
    before_help: Callable[[], None] | None = None  # names the environment variables in the help

    def format_help(self) -> str:
        if self.before_help is not None:
            self.before_help()
        hidden = [(a, a.default) for a, _ in self.hidden_defaults]
        for action, default in self.hidden_defaults:
            action.default = default
        try:
            return super().format_help()
        finally:
            for action, default in hidden:
                action.default = default


class OptionParser:
    """An argparse parser whose options also come from the environment and a config file.

    Args:
        prog: the program's name (usage and error lines).
        section: the config file's table this program reads (``"node"``; dotted for a
            sub-table: ``"clusterpy.status"``).
        description: text above the options.
        env_prefix: prefix of the environment variables (``CLUSTERPY_`` gives
            ``CLUSTERPY_PORT`` for ``--port``).
        epilog: text below the options; the precedence rules are appended.

    Options are declared with :meth:`add`, or directly on ``parser`` (the underlying
    :class:`argparse.ArgumentParser`), as shared helpers such as
    ``tls.add_daemon_security_arguments(opts.parser)`` do: every optional argument with a
    ``--long`` name (store, append, store_true/false, BooleanOptionalAction) gets its
    environment variable and config key either way. Positionals come from the command line only.
    """

    def __init__(self, prog: str, section: str, description: str, *, env_prefix: str = ENV_PREFIX,
                 epilog: str = "") -> None:
        self.prog = prog
        self.section = section
        self.env_prefix = env_prefix
        self._defaults: dict[str, Any] = {}  # dest -> default, for options made by add()
        self._env: dict[str, str | None] = {}  # dest -> variable (None: none), where not derived
        self._annotated: set[int] = set()
        rules = (
            f"Each option can also be set in the environment ({env_prefix}NAME, shown with the option)\n"
            f"or in the [{section}] table of a TOML file given with --config ({env_prefix}CONFIG).\n"
            "Precedence: command line > environment > config file > default."
        )
        self.parser = _Parser(
            prog=prog, description=description, formatter_class=_HelpFormatter,
            epilog=f"{epilog}\n\n{rules}" if epilog else rules, allow_abbrev=False,
        )
        self.parser.before_help = lambda: self._annotate(self._options())
        self.parser.add_argument(
            "--config", metavar="FILE", default=None,
            help=f"read options from the [{section}] table of this TOML file (env {env_prefix}CONFIG)")

    def add(
        self,
        *flags: str,
        help: str,
        default: Any = None,
        type: Callable[[Any], Any] | None = None,
        flag: bool = False,
        many: bool = False,
        env: bool | str = True,
        metavar: str | None = None,
        choices: Sequence[Any] | None = None,
        group: argparse._ArgumentGroup | None = None,
    ) -> None:
        """Declare an option.

        Args:
            flags: as for argparse (``"-n", "--nodes"``); the long name is the config key.
            help: what it does; the default is appended (and the environment variable).
            default: value when no source gives it.
            type: converts a string (command line, environment, config string) to the value;
                raises ValueError or argparse.ArgumentTypeError for a bad one.
            flag: a boolean: ``--x`` / ``--no-x``.
            many: may be repeated; the value is a list (``-n a -n b``); from the environment
                or a config string it is split on commas and spaces.
            env: False for none, a string for another variable name than the derived one.
            group: an argparse argument group to show it in.
        """
        long = next((f for f in flags if f.startswith("--")), None)
        if long is None:
            raise ValueError(f"option {flags} needs a --long name")
        dest = long[2:].replace("-", "_")
        self._defaults[dest] = default
        if env is not True:
            self._env[dest] = env or None
        if default is not None and default is not False and default != []:
            help = f"{help} (default {default})"
        target = group or self.parser
        # argparse's own default stays None: an append default would be appended to, and
        # BooleanOptionalAction would print it a second time.
        kwargs: dict[str, Any] = dict(dest=dest, default=None, help=help.replace("%", "%%"))
        if flag:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kwargs.update(type=type, metavar=metavar, choices=choices)
            target.add_argument(*flags, action="append" if many else "store", **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print usage and ``prog: error: message`` to stderr and exit with status 2."""
        self.parser.error(message)

    def parse(self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (default ``sys.argv[1:]``) and fill each option from its sources.

        The namespace also has ``_sources``: option -> "flag" | "env" | "config" | "default".
        Exits with status 2 (usage and a one-line error) on any bad value.
        """
        environ = os.environ if environ is None else environ
        options = self._options()
        self._annotate(options)
        args = self._parse_given(argv)
        given = set(vars(args))
        config_path = args.config if "config" in given else environ.get(self.env_prefix + "CONFIG") or None
        args.config = config_path
        table = self._read_config(config_path, options) if config_path else {}
        sources: dict[str, str] = {}
        for opt in options.values():
            if opt.dest in given:
                sources[opt.dest] = "flag"
                continue
            if opt.env and environ.get(opt.env) is not None:
                value = self._convert(opt, environ[opt.env], f"environment variable {opt.env}")
                sources[opt.dest] = "env"
            elif opt.dest in table:
                value = self._convert(opt, table[opt.dest], f"{config_path}: [{self.section}] {opt.key}")
                sources[opt.dest] = "config"
            else:
                value = list(opt.default or ()) if opt.kind == "list" else opt.default
                sources[opt.dest] = "default"
            setattr(args, opt.dest, value)
        for action in self.parser._actions:  # positionals and the like: argparse's defaults
            if action.dest not in vars(args) and action.dest is not argparse.SUPPRESS and action.default is not argparse.SUPPRESS:
                setattr(args, action.dest, action.default)
        args._sources = sources
        return args

    # ------------------------------------------------------------ helpers

    def _options(self) -> dict[str, _Option]:
        """Every --long optional argument of the parser, whoever added it."""
        options: dict[str, _Option] = {}
        for action in self.parser._actions:
            long = next((f for f in action.option_strings if f.startswith("--")), None)
            if long is None or action.dest == "config":
                continue
            if isinstance(action, _FLAG_ACTIONS):  # before _NOT_OPTIONS: store_true is a store_const
                kind = "flag"
            elif isinstance(action, _NOT_OPTIONS):
                continue
            elif isinstance(action, argparse._AppendAction):
                kind = "list"
            else:
                kind = "value"
            env = self._env.get(action.dest, self.env_prefix + action.dest.upper())
            default = self._defaults.get(action.dest, action.default)
            convert = action.type if callable(action.type) else None
            options[action.dest] = _Option(action.dest, long[2:], env, default, convert, kind,
                                           tuple(action.choices) if action.choices is not None else None)
        return options

    def _annotate(self, options: dict[str, _Option]) -> None:
        """Name each option's environment variable in its help (once)."""
        for action in self.parser._actions:
            opt = options.get(action.dest)
            if opt is None or opt.env is None or id(action) in self._annotated or action.help is argparse.SUPPRESS:
                continue
            self._annotated.add(id(action))
            action.help = f"{action.help or ''} [env {opt.env}]".lstrip()

    def _parse_given(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """argparse with every optional's default suppressed: only what the command line gave."""
        saved = [(a, a.default) for a in self.parser._actions if a.option_strings]
        self.parser.hidden_defaults = saved
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            return self.parser.parse_args(argv)
        finally:
            self.parser.hidden_defaults = []
            for action, default in saved:
                action.default = default

    def _read_config(self, path: str, options: dict[str, _Option]) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            self.error(f"cannot read config file {path}: {exc.strerror or exc}")
        except tomllib.TOMLDecodeError as exc:
            self.error(f"config file {path} is not valid TOML: {exc}")
        table: Any = data
        for part in self.section.split("."):  # "clusterpy.status" is the table [clusterpy.status]
            table = table.get(part, {}) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            self.error(f"config file {path}: [{self.section}] must be a table")
        by_key = {o.key.replace("-", "_"): o.dest for o in options.values()}
        out: dict[str, Any] = {}
        for key, value in table.items():
            dest = by_key.get(key.replace("-", "_"))
            if dest is None and isinstance(value, dict):
                continue  # a sub-table: a subcommand's options
            if dest is None:
                known = ", ".join(sorted(o.key for o in options.values()))
                self.error(f"config file {path}: unknown option {key!r} in [{self.section}] (known: {known})")
            out[dest] = value
        return out

    def _convert(self, opt: _Option, raw: Any, source: str) -> Any:
        """Turn a string (environment) or a TOML value into the option's value, or exit 2."""
        try:
            if opt.kind == "flag":
                if isinstance(raw, bool):
                    return raw
                if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
                    return raw.strip().lower() in _TRUE
                raise argparse.ArgumentTypeError("expected true or false")
            if opt.kind == "list":
                items = raw if isinstance(raw, list) else re.split(r"[,\s]+", str(raw).strip())
                return [self._scalar(opt, item) for item in items if str(item).strip()]
            return self._scalar(opt, raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            self.error(f"{source}={raw!r}: {exc}")

    @staticmethod
    def _scalar(opt: _Option, raw: Any) -> Any:
        if isinstance(raw, (dict, list, bool)):
            raise argparse.ArgumentTypeError(f"expected a single value, not a {type(raw).__name__}")
        value = str(raw) if opt.convert is None else opt.convert(raw if isinstance(raw, (int, float)) else str(raw))
        if opt.choices is not None and value not in opt.choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, opt.choices))}")
        return value


def run_daemon(opts: "OptionParser", argv: Sequence[str] | None,
               serve: Callable[[argparse.Namespace, bytes], Coroutine[Any, Any, None]]) -> int:
    """The body of every daemon's console script: parse, set up logging, load the secret, serve.

    Returns 0 after a clean stop and 1 if the daemon could not run (a line on stderr); a bad
    command line or configuration exits with status 2 and the usage (never a traceback).
    """
    args = opts.parse(argv)
    try:
        setup_logging(args.log_level, args.log_file)
    except OSError as exc:
        opts.error(f"--log-file {args.log_file}: {exc.strerror or exc}")
    try:
        secret = load_secret(secret_file=secret_file_from(args))
        tune_malloc(32 * MiB, 128 * MiB)  # a daemon's own process: payload buffers from the heap
        asyncio.run(serve(args, secret))
    except ConfigurationError as exc:
        opts.error(str(exc))
    except ClusterError as exc:
        print(f"{opts.prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{opts.prog}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
