"""Put the client's source lines back into remote tracebacks.

cloudpickle (3.1 and newer) renames the file of every function it ships by value to
``<dynamic-code>``, so a worker's traceback says ``File "<dynamic-code>", line 12, in compute``
with no source line. The client still has the source: this module finds, among the files of the
functions it shipped, the code object with that name spanning that line, and rewrites the frame
with the real file name and its source line. With older cloudpickle the frames already carry
real names and nothing changes.
"""

from __future__ import annotations

import inspect
import linecache
import re
import sys
import threading
import types
from typing import Any, Iterable

__all__ = ["remember", "restore"]

_FRAME = re.compile(r'^(?P<indent>\s*)File "<dynamic-code>", line (?P<line>\d+), in (?P<name>.+)$')
_lock = threading.Lock()
_files: set[str] = set()
_index: dict[str, list[tuple[int, int, str]]] = {}  # co_name -> (first, last line, file)
_indexed: set[str] = set()


def remember(objects: Iterable[Any]) -> None:
    """Note the source files of functions and classes about to be shipped."""
    found = set()
    for obj in objects:
        if obj is None:
            continue
        try:
            path = inspect.getsourcefile(obj)
        except (TypeError, OSError):
            path = None
        if path:
            found.add(path)
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        found.add(main)
    with _lock:
        _files.update(found)


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _index_files() -> None:
    with _lock:
        todo = _files - _indexed
        _indexed.update(todo)
    for path in todo:
        source = "".join(linecache.getlines(path))
        if not source:
            continue
        try:
            module = compile(source, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        for code in _code_objects(module):
            lines = [line for _, _, line in code.co_lines() if line is not None]
            if lines:
                with _lock:
                    _index.setdefault(code.co_name, []).append((min(lines), max(lines), path))


def _locate(name: str, line: int) -> str | None:
    matches = {path for first, last, path in _index.get(name, ()) if first <= line <= last}
    return matches.pop() if len(matches) == 1 else None


def restore(text: str | None) -> str | None:
    """Rewrite ``<dynamic-code>`` frames of a remote traceback with the client's files and lines."""
    if not text or "<dynamic-code>" not in text:
        return text
    _index_files()
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        path = _locate(match["name"], int(match["line"])) if match else None
        if match is None or path is None:
            out.append(line)
            continue
        number = int(match["line"])
        out.append(f'{match["indent"]}File "{path}", line {number}, in {match["name"]}')
        source = linecache.getline(path, number).strip()
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if source and following != source:
            out.append(f'{match["indent"]}    {source}')
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
