"""FileStore on real files: round trips, refusals, hostile names and planted symlinks."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from clusterpy.errors import ConfigurationError, DependencyError
from clusterpy.filestore import CACHE_DIR, FileStore, validate_comp_id, validate_name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "dest", max_file_size=1 << 20, quota=4 << 20)


def receive(store: FileStore, data: bytes, chunk: int = 1000) -> str:
    h = sha(data)
    inc = store.begin(h, len(data))
    for i in range(0, len(data), chunk):
        inc.write(data[i : i + chunk])
    inc.finish()
    return h


def leftovers(store: FileStore) -> list[str]:
    return os.listdir(store.root / CACHE_DIR / "tmp")


def tree(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


# --- validate_name ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/x",
        "//etc/x",
        "..",
        "../x",
        "a/..",
        "a/../b",
        "a/../../x",
        "a\\b",
        "..\\x",
        "x\x00y",
        "x\ny",
        "x\x7fy",
        "x\x85y",
        ".",
        "./",
        "././.",
        "C:x",
        "x:y",
        "c:/x",
        "a/" * 33 + "b",
        "x" * 256,
        "a/" + "\u00e9" * 128,  # 256 bytes in UTF-8
        "y" * 4097,
        "bad\udcff",
    ],
)
def test_validate_name_refuses(name):
    with pytest.raises(DependencyError, match="unsafe file name") as info:
        validate_name(name)
    assert repr(name)[:50].rstrip("'") in str(info.value)


def test_validate_name_refuses_non_str():
    with pytest.raises(DependencyError, match="not a str"):
        validate_name(b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, normal",
    [
        ("data.csv", "data.csv"),
        ("mypkg/__init__.py", "mypkg/__init__.py"),
        ("a/./b", "a/b"),
        ("./x", "x"),
        ("a//b/", "a/b"),
        (".hidden", ".hidden"),
        ("..x/y..", "..x/y.."),
        ("ab:c", "ab:c"),
        ("a/C:x", "a/C:x"),
        ("caf\u00e9 r\u00e9sum\u00e9.txt", "caf\u00e9 r\u00e9sum\u00e9.txt"),
        ("a/" * 31 + "b", "a/" * 31 + "b"),
        ("x" * 255, "x" * 255),
    ],
)
def test_validate_name_accepts_and_normalizes(name, normal):
    assert validate_name(name) == normal


@pytest.mark.parametrize("comp_id", ["", ".", "..", ".cache", "a/b", "../x", "a b", "x" * 129, "é", "a\x00"])
def test_unsafe_comp_ids_refused(store, comp_id):
    with pytest.raises(DependencyError, match="unsafe computation id"):
        validate_comp_id(comp_id)
    with pytest.raises(DependencyError):
        store.create_computation_dir(comp_id)
    with pytest.raises(DependencyError):
        store.remove_computation(comp_id)


# --- cache -----------------------------------------------------------------------------


def test_round_trip(store):
    data = os.urandom(5000)
    h = sha(data)
    assert not store.has(h)
    with store.begin(h, len(data)) as inc:
        assert store.usage() == 5000  # reserved while in flight
        inc.write(data[:1234])
        inc.write(memoryview(data)[1234:])
        assert inc.written == 5000
        obj = inc.finish()
    assert store.has(h)
    assert obj.read_bytes() == data
    assert store.usage() == 5000
    assert leftovers(store) == []

    comp = store.create_computation_dir("comp-1")
    assert stat.S_IMODE(comp.stat().st_mode) == 0o700
    placed = store.place(comp, "sub/dir/data.bin", h, 0o600)
    assert placed == comp / "sub" / "dir" / "data.bin"
    assert placed.read_bytes() == data
    assert stat.S_IMODE(placed.stat().st_mode) == 0o644
    assert placed.stat().st_ino == obj.stat().st_ino  # hard link
    exe = store.place(comp, "run", h, 0o4777)  # setuid and world-write dropped, x kept
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    assert exe.stat().st_ino != obj.stat().st_ino  # copied: modes differ
    assert exe.read_bytes() == data
    assert store.place(comp, "./sub//dir/data.bin", h, 0o644) == placed  # replaced in place
    assert not [n for n in tree(comp) if "clusterpy-tmp" in n]

    # A second store on the same root finds the cache.
    again = FileStore(store.root)
    assert again.has(h) and again.usage() == 5000


def test_empty_file(store):
    h = receive(store, b"")
    comp = store.create_computation_dir("c")
    assert store.place(comp, "empty", h, 0o644).read_bytes() == b""


def test_no_hardlinks_option(tmp_path):
    s = FileStore(tmp_path / "d", hardlink=False)
    h = receive(s, b"payload")
    comp = s.create_computation_dir("c")
    p = s.place(comp, "f", h, 0o644)
    assert p.stat().st_nlink == 1 and p.read_bytes() == b"payload"


def test_wrong_hash_refused_nothing_left(store):
    data = b"real content"
    wrong = sha(b"something else")
    inc = store.begin(wrong, len(data))
    inc.write(data)
    with pytest.raises(DependencyError, match="hashes to"):
        inc.finish()
    assert not store.has(wrong)
    assert leftovers(store) == []
    assert store.usage() == 0
    assert tree(store.root / CACHE_DIR / "objects") == set()
    with pytest.raises(DependencyError, match="already aborted"):
        inc.write(b"x")


def test_short_transfer_refused(store):
    inc = store.begin(sha(b"abc"), 3)
    inc.write(b"ab")
    with pytest.raises(DependencyError, match="received 2 of the announced 3"):
        inc.finish()
    assert leftovers(store) == [] and store.usage() == 0


def test_too_many_bytes_refused(store):
    inc = store.begin(sha(b"abc"), 3)
    inc.write(b"ab")
    with pytest.raises(DependencyError, match="more than the announced 3"):
        inc.write(b"cd")
    assert leftovers(store) == [] and store.usage() == 0


def test_abort_and_context_manager(store):
    inc = store.begin(sha(b"abc"), 3)
    inc.write(b"a")
    inc.abort()
    inc.abort()
    assert leftovers(store) == [] and store.usage() == 0
    with pytest.raises(RuntimeError):
        with store.begin(sha(b"abc"), 3) as inc:
            inc.write(b"a")
            raise RuntimeError
    assert leftovers(store) == [] and store.usage() == 0


def test_oversize_refused(store):
    with pytest.raises(DependencyError, match="at most 1048576"):
        store.begin("a" * 64, (1 << 20) + 1)
    store.begin("a" * 64, 1 << 20).abort()
    assert store.usage() == 0


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 64 + "\n", "../" + "a" * 61, 123])
def test_bad_hash_refused(store, bad):
    with pytest.raises(DependencyError, match="invalid sha256"):
        store.begin(bad, 1)
    with pytest.raises(DependencyError, match="invalid sha256"):
        store.has(bad)


@pytest.mark.parametrize("size", [-1, True, 1.5, "10"])
def test_bad_size_refused(store, size):
    with pytest.raises(DependencyError, match="invalid size"):
        store.begin("a" * 64, size)


def test_quota(store):
    one_mib = 1 << 20
    blobs = [bytes([i]) * one_mib for i in range(4)]
    for b in blobs[:3]:
        receive(store, b, chunk=1 << 16)
    assert store.usage() == 3 * one_mib
    in_flight = store.begin(sha(blobs[3]), one_mib)  # exactly fills the quota
    with pytest.raises(DependencyError, match="quota"):
        store.begin(sha(b"x"), 1)
    in_flight.abort()
    store.begin(sha(b"x"), 1).abort()  # reservation released
    assert store.usage() == 3 * one_mib
    receive(store, blobs[0])  # already cached: no double counting
    assert store.usage() == 3 * one_mib


class _File:
    def __init__(self, data: bytes) -> None:
        self.sha256, self.size = sha(data), len(data)


def test_begin_missing_starts_each_uncached_hash_once_in_hash_order(store):
    cached, a, b = b"cached", b"a" * 10, b"b" * 20
    receive(store, cached)
    incoming = store.begin_missing([_File(b), _File(cached), _File(a), _File(b)])
    assert list(incoming) == sorted([sha(a), sha(b)])
    for data in (a, b):
        incoming[sha(data)].write(data)
        incoming[sha(data)].finish()
    assert store.has(sha(a)) and store.has(sha(b))


def test_begin_missing_aborts_what_it_began_when_one_cannot_begin(store):
    one_mib = 1 << 20
    fits = [bytes([i]) * one_mib for i in range(3)]
    too_many = fits + [bytes([9]) * one_mib, bytes([10]) * one_mib]  # 5 MiB against a 4 MiB quota
    with pytest.raises(DependencyError, match="quota"):
        store.begin_missing([_File(data) for data in too_many])
    assert leftovers(store) == []  # no temporary file left behind
    store.begin_missing([_File(data) for data in too_many[:4]])  # the whole quota is free again


def test_prune_drops_unplaced(store):
    keep, drop = b"keep", b"drop"
    hk, hd = receive(store, keep), receive(store, drop)
    comp = store.create_computation_dir("c")
    store.place(comp, "k", hk, 0o644)
    assert store.prune() == len(drop)
    assert store.has(hk) and not store.has(hd)
    assert store.usage() == len(keep)


def test_bad_limits_refused(tmp_path):
    for kwargs in ({"quota": 0}, {"max_file_size": -1}, {"quota": True}, {"max_file_size": 1.0}):
        with pytest.raises(ConfigurationError):
            FileStore(tmp_path, **kwargs)


def test_stale_temp_files_removed_on_open(store):
    inc = store.begin(sha(b"abc"), 3)
    inc.write(b"ab")  # a crash here leaves the temp file behind
    assert leftovers(store)
    FileStore(store.root)
    assert leftovers(store) == []


def test_modified_cache_object_not_reused(store):
    """A job writing to its hard-linked input must not poison later computations."""
    data = b"original input"
    h = receive(store, data)
    comp = store.create_computation_dir("c1")
    placed = store.place(comp, "in.txt", h, 0o644)
    placed.write_bytes(b"job scribbled here")  # same inode as the cache object
    assert not store.has(h)
    assert store.usage() == 0
    comp2 = store.create_computation_dir("c2")
    with pytest.raises(DependencyError, match="not in the cache"):
        store.place(comp2, "in.txt", h, 0o644)
    receive(store, data)
    assert store.place(comp2, "in.txt", h, 0o644).read_bytes() == data


def test_place_unknown_hash_refused(store):
    comp = store.create_computation_dir("c")
    with pytest.raises(DependencyError, match="not in the cache"):
        store.place(comp, "x", "b" * 64, 0o644)


def test_place_outside_store_refused(store, tmp_path):
    h = receive(store, b"x")
    with pytest.raises(ValueError):
        store.place(tmp_path, "x", h, 0o644)
    with pytest.raises(ValueError):
        store.place(store.root / CACHE_DIR, "x", h, 0o644)


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x", "x\x00y", "..", "a\\b", "", "sub/../../../x"])
def test_place_hostile_names(store, tmp_path, name):
    h = receive(store, b"evil")
    comp = store.create_computation_dir("c")
    before = tree(tmp_path)
    with pytest.raises(DependencyError, match="unsafe file name"):
        store.place(comp, name, h, 0o644)
    assert tree(tmp_path) == before


# --- symlinks --------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"untouched")
    return d


def test_place_does_not_follow_symlinked_directory(store, outside):
    h = receive(store, b"evil")
    comp = store.create_computation_dir("c")
    (comp / "sub").symlink_to(outside)
    for name in ("sub/victim", "sub/new", "sub/deeper/new"):
        with pytest.raises(DependencyError, match="symlink"):
            store.place(comp, name, h, 0o644)
    assert os.listdir(outside) == ["victim"]
    assert (outside / "victim").read_bytes() == b"untouched"


def test_place_does_not_follow_symlink_deeper_down(store, outside):
    h = receive(store, b"evil")
    comp = store.create_computation_dir("c")
    (comp / "a" / "b").mkdir(parents=True)
    (comp / "a" / "b" / "c").symlink_to(outside)
    with pytest.raises(DependencyError, match="'a/b/c' is a symlink"):
        store.place(comp, "a/b/c/victim", h, 0o755)
    assert (outside / "victim").read_bytes() == b"untouched"


def test_place_does_not_write_through_final_symlink(store, outside):
    h = receive(store, b"evil")
    comp = store.create_computation_dir("c")
    (comp / "victim").symlink_to(outside / "victim")
    for mode in (0o644, 0o755):
        with pytest.raises(DependencyError, match="symlink"):
            store.place(comp, "victim", h, mode)
    assert (outside / "victim").read_bytes() == b"untouched"
    assert os.readlink(comp / "victim") == str(outside / "victim")


def test_place_refuses_file_in_the_way_and_directory_target(store):
    h = receive(store, b"x")
    comp = store.create_computation_dir("c")
    store.place(comp, "f", h, 0o644)
    with pytest.raises(DependencyError, match="not a directory"):
        store.place(comp, "f/g", h, 0o644)
    (comp / "d").mkdir()
    with pytest.raises(DependencyError, match="non-file"):
        store.place(comp, "d", h, 0o644)


def test_computation_dir_symlink_refused(store, outside):
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(DependencyError, match="not a directory"):
        store.create_computation_dir("evil")
    store.remove_computation("evil")  # removes the link only
    assert not os.path.lexists(store.root / "evil")
    assert (outside / "victim").read_bytes() == b"untouched"


def test_remove_computation_does_not_follow_symlinks(store, outside):
    h = receive(store, b"data")
    comp = store.create_computation_dir("c")
    store.place(comp, "a/b/file", h, 0o644)
    (comp / "link_dir").symlink_to(outside)
    (comp / "a" / "link_file").symlink_to(outside / "victim")
    os.chmod(comp / "a" / "b", 0o500)  # a job left a read-only directory behind
    store.remove_computation("c")
    assert not comp.exists()
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"untouched"
    assert store.has(h)  # the cache object survives its placements
    store.remove_computation("c")  # idempotent


def test_create_computation_dir_is_idempotent(store):
    a = store.create_computation_dir("job.1_x-Y")
    (a / "keep").write_bytes(b"")
    assert store.create_computation_dir("job.1_x-Y") == a
    assert (a / "keep").exists()


def test_remove_computation_makes_read_only_dirs_writable(store, outside, monkeypatch):
    """Root ignores permissions, so simulate the first rmtree failing on a read-only dir."""
    import shutil

    comp = store.create_computation_dir("c")
    (comp / "ro" / "inner").mkdir(parents=True)
    (comp / "link").symlink_to(outside)
    os.chmod(comp / "ro" / "inner", 0o500)
    os.chmod(comp / "ro", 0o500)
    os.chmod(outside, 0o500)
    real = shutil.rmtree
    calls = []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        assert stat.S_IMODE(os.lstat(comp / "ro").st_mode) & 0o700 == 0o700
        assert stat.S_IMODE(os.lstat(comp / "ro" / "inner").st_mode) & 0o700 == 0o700
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", flaky)
    store.remove_computation("c")
    assert len(calls) == 2 and not comp.exists()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o500  # not chmod'ed through the link


def test_hostile_chunk_and_mode_types(store):
    inc = store.begin(sha(b"abc"), 3)
    with pytest.raises(DependencyError, match="must be bytes"):
        inc.write("abc")  # type: ignore[arg-type]
    assert leftovers(store) == [] and store.usage() == 0
    h = receive(store, b"abc")
    comp = store.create_computation_dir("c")
    with pytest.raises(DependencyError, match="invalid mode"):
        store.place(comp, "x", h, "0755")  # type: ignore[arg-type]
