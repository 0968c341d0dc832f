"""deps.collect / file_entry / iter_chunks on real files."""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
import types

import pytest

from clusterpy import deps
from clusterpy.deps import Dependencies, FileEntry, collect, file_entry, iter_chunks
from clusterpy.errors import DependencyError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(d: Dependencies) -> list[str]:
    return [f.name for f in d.files]


@pytest.fixture
def importer(tmp_path, monkeypatch):
    """Import modules from a fresh directory on sys.path; forget them afterwards."""
    src = tmp_path / "modsrc"
    src.mkdir()
    monkeypatch.syspath_prepend(str(src))
    imported: list[str] = []

    def load(name: str) -> types.ModuleType:
        importlib.invalidate_caches()
        imported.append(name)
        return importlib.import_module(name)

    load.src = src  # type: ignore[attr-defined]
    yield load
    tops = {m.split(".")[0] for m in imported}
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            del sys.modules[name]


def top_level_function(x):
    return x + 1


class TopLevelClass:
    pass


def test_file_entry(tmp_path):
    data = b"a,b\n1,2\n" * 1000
    p = tmp_path / "data.csv"
    p.write_bytes(data)
    os.chmod(p, 0o750)
    e = file_entry(p)
    assert e == FileEntry(name="data.csv", path=str(p), size=len(data), sha256=sha(data), mode=0o750)
    assert file_entry(str(p), "sub/other.csv").name == "sub/other.csv"


def test_collect_file_and_relative_path(tmp_path, monkeypatch):
    (tmp_path / "x.txt").write_bytes(b"hello")
    monkeypatch.chdir(tmp_path)
    d = collect(["x.txt"])
    assert d.files == (FileEntry("x.txt", str(tmp_path / "x.txt"), 5, sha(b"hello"), d.files[0].mode),)
    assert d.objects == ()
    assert d.total_size == 5


def test_hashing_in_chunks_and_memo(tmp_path, monkeypatch):
    data = os.urandom(3 * (1 << 20) + 17)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    os.utime(p, (1_600_000_000, 1_600_000_000))  # old enough to be memoized
    assert file_entry(p).sha256 == sha(data)
    calls = []
    real = deps._hash_fd
    monkeypatch.setattr(deps, "_hash_fd", lambda *a: calls.append(a) or real(*a))
    assert file_entry(p).sha256 == sha(data)
    assert calls == []  # memoized
    p.write_bytes(data[:-1] + b"X")  # same size, new mtime -> rehashed
    os.utime(p, (1_600_000_100, 1_600_000_100))
    assert file_entry(p).sha256 == sha(data[:-1] + b"X")
    assert len(calls) == 1


def test_iter_chunks_streams_and_detects_change(tmp_path):
    data = os.urandom(10_000)
    p = tmp_path / "f"
    p.write_bytes(data)
    e = file_entry(p)
    chunks = list(iter_chunks(e, chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data
    p.write_bytes(b"x" * 10_000)
    with pytest.raises(DependencyError, match="changed"):
        list(iter_chunks(e))
    p.write_bytes(b"x" * 10)
    with pytest.raises(DependencyError, match="shrank"):
        list(iter_chunks(e))
    p.write_bytes(data + b"more")
    with pytest.raises(DependencyError, match="grew"):
        list(iter_chunks(e))


def test_directory(tmp_path):
    top = tmp_path / "proj" / "data"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "__pycache__").mkdir()
    (top / "a.txt").write_bytes(b"a")
    (top / "sub" / "b.txt").write_bytes(b"b")
    (top / "sub" / "deeper" / "c.txt").write_bytes(b"c")
    (top / "__pycache__" / "x.pyc").write_bytes(b"junk")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"do not ship")
    (top / "leak").symlink_to(outside)
    (top / "leakdir").symlink_to(tmp_path)
    (top / "alias.txt").symlink_to(top / "a.txt")
    (top / "dangling").symlink_to(top / "missing")
    (top / "sub" / "loop").symlink_to(top)  # points at an ancestor: not descended
    d = collect([top])
    assert names(d) == ["data/a.txt", "data/alias.txt", "data/sub/b.txt", "data/sub/deeper/c.txt"]
    assert all(f.size == 1 for f in d.files)
    assert d.files[1].sha256 == sha(b"a")
    assert collect([str(top) + "/"]).files == d.files


def test_directory_symlink_inside_is_followed(tmp_path):
    top = tmp_path / "data"
    (top / "real").mkdir(parents=True)
    (top / "real" / "f").write_bytes(b"f")
    (top / "link").symlink_to(top / "real")
    assert names(collect([top])) == ["data/link/f", "data/real/f"]


def test_plain_module(importer):
    (importer.src / "clientonly_mod.py").write_text("VALUE = 42\n")
    mod = importer("clientonly_mod")
    d = collect([mod])
    assert names(d) == ["clientonly_mod.py"]
    assert d.files[0].path == str(importer.src / "clientonly_mod.py")
    assert d.files[0].sha256 == sha(b"VALUE = 42\n")


def test_package_and_submodule(importer):
    pkg = importer.src / "clientonly_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("Y = 2\n")
    (pkg / "table.dat").write_bytes(b"\x00\x01")
    (pkg / "__pycache__").mkdir()  # bytecode may be disabled here (PYTHONDONTWRITEBYTECODE)
    (pkg / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"junk")
    mod = importer("clientonly_pkg.sub.leaf")  # also imports the package
    d = collect([sys.modules["clientonly_pkg"]])
    assert names(d) == [
        "clientonly_pkg/__init__.py",
        "clientonly_pkg/sub/__init__.py",
        "clientonly_pkg/sub/leaf.py",
        "clientonly_pkg/table.dat",
        "clientonly_pkg/util.py",
    ]
    assert names(collect([mod])) == ["clientonly_pkg/sub/leaf.py"]
    assert names(collect([sys.modules["clientonly_pkg.sub"]])) == [
        "clientonly_pkg/sub/__init__.py",
        "clientonly_pkg/sub/leaf.py",
    ]


def test_unshippable_modules(importer):
    with pytest.raises(DependencyError, match="'sys'.*builtin"):
        collect([sys])
    (importer.src / "clientonly_ns").mkdir()
    with pytest.raises(DependencyError, match="namespace package"):
        collect([importer("clientonly_ns")])
    if math.__dict__.get("__file__"):
        with pytest.raises(DependencyError, match="extension module"):
            collect([math])
    fake = types.ModuleType("fake")
    fake.__file__ = str(importer.src / "fake.pyc")
    with pytest.raises(DependencyError, match="not Python source"):
        collect([fake])


def test_program(tmp_path):
    prog = tmp_path / "run.sh"
    prog.write_text("#!/bin/sh\necho hi\n")
    os.chmod(prog, 0o755)
    d = collect([], program=prog)
    assert names(d) == ["run.sh"]
    assert d.files[0].mode & 0o111
    with pytest.raises(DependencyError, match="does not exist or is not a file"):
        collect([], program=tmp_path / "missing")
    with pytest.raises(DependencyError, match="does not exist or is not a file"):
        collect([], program=tmp_path)


def test_functions_and_classes():
    lam = lambda: 1  # noqa: E731
    d = collect([top_level_function, TopLevelClass, lam, top_level_function])
    assert d.objects == (top_level_function, TopLevelClass, lam)
    assert d.files == ()


@pytest.mark.parametrize("bad", [42, None, b"bytes-path", 3.5, object(), len, [1], {"a": 1}, TopLevelClass()])
def test_bad_objects_refused(bad):
    with pytest.raises(DependencyError, match="depends accepts") as info:
        collect([bad])
    assert repr(bad)[:20] in str(info.value)


def test_single_path_instead_of_list_refused(tmp_path):
    with pytest.raises(DependencyError, match="must be a list"):
        collect(str(tmp_path))


def test_missing_path_refused(tmp_path):
    with pytest.raises(DependencyError, match="does not exist"):
        collect([tmp_path / "nope.txt"])


def test_unsafe_file_name_refused_on_client(tmp_path):
    p = tmp_path / "bad\\name.txt"
    p.write_bytes(b"x")
    with pytest.raises(DependencyError, match="backslash"):
        collect([p])


def test_duplicate_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "data.csv").write_bytes(b"one")
    (tmp_path / "b" / "data.csv").write_bytes(b"two")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "data.csv").write_bytes(b"one")
    d = collect([tmp_path / "a" / "data.csv", tmp_path / "c" / "data.csv"])  # same content: once
    assert names(d) == ["data.csv"]
    with pytest.raises(DependencyError, match="two different files.*'data.csv'"):
        collect([tmp_path / "a" / "data.csv", tmp_path / "b" / "data.csv"])
    prog = tmp_path / "b" / "data.csv"
    with pytest.raises(DependencyError, match="two different files"):
        collect([tmp_path / "a" / "data.csv"], program=prog)
