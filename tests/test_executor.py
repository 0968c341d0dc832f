"""The Executor contract, checked against ProcessPoolExecutor and ClusterExecutor alike.

Every test in the parity suite runs twice, once per kind, and expects the same outcome; the
cluster kind uses an embedded local node (real worker processes, real loopback sockets).
The behaviours are those CPython's own executor tests check: submit, map (order, timeouts,
exceptions, chunks), shutdown (wait, cancel_futures), cancel, as_completed, wait, done
callbacks, running(), asyncio.wrap_future, the context manager.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import subprocess
import sys
import threading
import time

import pytest

import clusterpy
from clusterpy import ClusterExecutor, RemoteTraceback

from .conftest import REPO, wait_until

# ---------------------------------------------------------------- functions the calls run


def mul(x, y=1):
    return x * y


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def raiser(message):
    def nested_helper():
        raise ValueError(message)

    nested_helper()


def get_pid(delay=0.0):
    time.sleep(delay)
    return os.getpid()


def fail_on(x, bad):
    if x == bad:
        raise KeyError(x)
    return x


# ---------------------------------------------------------------- the two kinds

KINDS = ["process", "cluster"]


def make_executor(kind: str, workers: int = 2) -> cf.Executor:
    if kind == "process":
        return cf.ProcessPoolExecutor(workers)
    return ClusterExecutor(local=True, local_cpus=workers)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def executor(kind):
    ex = make_executor(kind)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def warm(ex: cf.Executor, workers: int = 2) -> None:
    """Make every worker exist and be idle (a process pool starts its workers lazily)."""
    list(ex.map(sleep_and_return, [0.05] * workers, range(workers)))


# ---------------------------------------------------------------- parity suite


def test_submit_and_result(executor):
    assert executor.submit(mul, 6, 7).result(30) == 42
    assert executor.submit(mul, 3, y=5).result(30) == 15
    future = executor.submit(mul, 2)
    assert isinstance(future, cf.Future)
    assert future.result(30) == 2 and future.done() and not future.cancelled() and future.exception() is None


def test_remote_exception_reraises_with_the_remote_traceback(executor):
    future = executor.submit(raiser, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        future.result(30)
    assert isinstance(future.exception(), ValueError)
    cause = info.value.__cause__
    assert cause is not None and "nested_helper" in str(cause) and "raiser" in str(cause)


def test_map_in_order_and_with_several_iterables(executor):
    assert list(executor.map(mul, range(20), range(20))) == [i * i for i in range(20)]
    # shortest iterable wins, as with the builtin map
    assert list(executor.map(mul, range(5), range(100))) == [0, 1, 4, 9, 16]
    assert list(executor.map(mul, [])) == []


def test_map_with_chunks(executor):
    assert list(executor.map(mul, range(25), range(25), chunksize=4)) == [i * i for i in range(25)]
    with pytest.raises(ValueError):
        executor.map(mul, range(3), chunksize=0)


def test_map_exception_is_raised_when_its_item_is_reached(executor):
    results = executor.map(fail_on, range(6), [3] * 6)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(results)


def test_map_timeout(executor):
    warm(executor)
    results = []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        for value in executor.map(sleep_and_return, [0, 0, 1.2], ["a", "b", "c"], timeout=0.5):
            results.append(value)
    assert results == ["a", "b"]
    assert time.monotonic() - start < 1.1


def test_running_then_cancel_is_refused_pending_cancel_succeeds(executor):
    warm(executor)
    blockers = [executor.submit(sleep_and_return, 0.6, i) for i in range(2)]
    queued = [executor.submit(mul, i) for i in range(8)]
    wait_until(lambda: all(b.running() for b in blockers), timeout=15)
    assert blockers[0].cancel() is False  # running: cannot be cancelled
    last = queued[-1]
    assert last.cancel() is True and last.cancelled() and last.done()
    with pytest.raises(cf.CancelledError):
        last.result()
    assert [b.result(30) for b in blockers] == [0, 1]
    assert [f.result(30) for f in queued[:-1]] == list(range(7))


def test_shutdown_refuses_new_work(executor):
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(mul, 1)
    with pytest.raises(RuntimeError):
        executor.map(mul, range(3))
    executor.shutdown()  # idempotent


def test_shutdown_wait_waits_for_every_call(kind):
    ex = make_executor(kind)
    futures = [ex.submit(sleep_and_return, 0.2, i) for i in range(5)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(5))


def test_shutdown_without_wait_returns_at_once_and_calls_still_finish(kind):
    ex = make_executor(kind)
    warm(ex)
    futures = [ex.submit(sleep_and_return, 0.3, i) for i in range(4)]
    start = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - start < 0.25
    assert [f.result(30) for f in futures] == list(range(4))
    ex.shutdown(wait=True)


def test_shutdown_cancel_futures(kind):
    ex = make_executor(kind)
    warm(ex)
    blockers = [ex.submit(sleep_and_return, 0.8, i) for i in range(2)]
    wait_until(lambda: all(b.running() for b in blockers), timeout=15)
    rest = [ex.submit(sleep_and_return, 0.5, i) for i in range(10)]
    ex.shutdown(wait=True, cancel_futures=True)
    everything = blockers + rest
    assert all(f.done() for f in everything)
    cancelled = [f for f in rest if f.cancelled()]
    assert len(cancelled) >= 5  # a few may have been handed to a worker already
    assert [b.result() for b in blockers] == [0, 1]
    for f in rest:
        assert f.cancelled() or f.result() is not None


def test_context_manager_shuts_down(kind):
    with make_executor(kind) as ex:
        future = ex.submit(sleep_and_return, 0.2, "done")
    assert future.done() and future.result() == "done"
    with pytest.raises(RuntimeError):
        ex.submit(mul, 1)


def test_as_completed_yields_every_future_as_it_ends(executor):
    slow = executor.submit(sleep_and_return, 0.5, "slow")
    fast = executor.submit(sleep_and_return, 0.0, "fast")
    order = list(cf.as_completed([slow, fast], timeout=30))
    assert set(order) == {slow, fast} and order[0] is fast
    late = executor.submit(sleep_and_return, 0.5)
    with pytest.raises(TimeoutError):
        for _ in cf.as_completed([late], timeout=0.1):
            pass
    late.result(30)


def test_wait_first_completed_first_exception_all_completed(executor):
    slow = executor.submit(sleep_and_return, 0.6, 1)
    bad = executor.submit(raiser, "x")
    done, not_done = cf.wait([slow, bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    quick = executor.submit(mul, 1)
    done, _ = cf.wait([quick, slow], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert quick in done
    done, not_done = cf.wait([slow, bad, quick], timeout=30, return_when=cf.ALL_COMPLETED)
    assert not not_done and len(done) == 3


def test_done_callbacks(executor):
    called = threading.Event()
    seen = []

    def callback(future):
        seen.append(future.result())
        called.set()

    future = executor.submit(mul, 21, 2)
    future.add_done_callback(callback)
    assert called.wait(30) and seen == [42]
    # on a future that is already done: called at once, in this thread
    immediate = []
    future.add_done_callback(lambda f: immediate.append(f.result()))
    assert immediate == [42]
    # a raising callback does not break the future or the executor
    future2 = executor.submit(mul, 1)
    future2.add_done_callback(lambda f: 1 / 0)
    assert future2.result(30) == 1 and executor.submit(mul, 2).result(30) == 2


def test_cancelled_future_runs_its_callbacks(executor):
    warm(executor)
    blockers = [executor.submit(sleep_and_return, 0.6) for _ in range(2)]
    queued = [executor.submit(mul, i) for i in range(6)]
    seen = []
    queued[-1].add_done_callback(lambda f: seen.append(f.cancelled()))
    assert queued[-1].cancel()
    assert seen == [True]
    for f in blockers + queued[:-1]:
        f.result(30)


def test_asyncio_wrap_future(executor):
    async def main():
        futures = [asyncio.wrap_future(executor.submit(mul, i, 3)) for i in range(5)]
        return await asyncio.gather(*futures)

    assert asyncio.run(main()) == [0, 3, 6, 9, 12]

    async def failing():
        return await asyncio.wrap_future(executor.submit(raiser, "async"))

    with pytest.raises(ValueError, match="async"):
        asyncio.run(failing())


def test_calls_run_in_other_processes_in_parallel(executor):
    warm(executor)
    start = time.monotonic()
    pids = list(executor.map(get_pid, [0.4, 0.4]))
    assert time.monotonic() - start < 0.75  # both at once, on two workers
    assert os.getpid() not in pids and len(set(pids)) == 2


# ---------------------------------------------------------------- clusterpy only


@pytest.fixture(scope="module")
def cluster():
    with clusterpy.JobCluster(mul, local=True, local_cpus=2) as c:
        yield c


def test_any_function_even_a_lambda_or_a_closure(cluster):
    ex = cluster.executor()
    factor = 7
    assert ex.submit(lambda x: x * factor, 6).result(30) == 42
    assert ex.submit(sorted, [3, 1, 2]).result(30) == [1, 2, 3]
    assert cluster.submit(4, 5)() == 20  # the cluster's own computation still runs


def test_borrowed_executor_shutdown_leaves_the_cluster_open(cluster):
    with cluster.executor() as ex:
        futures = [ex.submit(sleep_and_return, 0.1, i) for i in range(3)]
    assert [f.result(0) for f in futures] == [0, 1, 2]  # shutdown waited for them
    assert cluster.submit(2, 3)() == 6
    with pytest.raises(RuntimeError):
        ex.submit(mul, 1)


def test_map_is_lazy_with_a_bounded_window(cluster):
    ex = cluster.executor()
    pulled = itertools.count()

    def items():
        for i in itertools.count():  # endless
            next(pulled)
            yield i

    results = ex.map(mul, items(), chunksize=10, buffersize=3)
    first = list(itertools.islice(results, 25))
    assert first == list(range(25))
    assert next(pulled) <= 25 + 10 * 4  # what was consumed, plus at most the window
    results.close()  # cancels what is still in flight


def test_function_is_unpickled_once_per_worker(cluster):
    from clusterpy import _remote

    ex = cluster.executor()

    def stats(_):
        import clusterpy._remote as r

        return os.getpid(), r.cache_info()

    list(ex.map(mul, range(40)))
    seen = {}
    for pid, info in ex.map(stats, range(40)):
        seen[pid] = info
    assert all(info["fn_hits"] >= info["fn_loads"] for info in seen.values())
    assert sum(info["fn_hits"] for info in seen.values()) >= 30
    assert _remote.cache_info()["fn_loads"] == 0  # nothing is rebuilt on the client


def test_chunk_failure_names_the_item_and_keeps_earlier_results(cluster):
    ex = cluster.executor()
    got = []
    with pytest.raises(TypeError) as info:  # None * 1, in the second chunk
        for value in ex.map(mul, [1, 2, 3, 4, 5, None, 7], [1] * 7, chunksize=4):
            got.append(value)
    assert got == [1, 2, 3, 4, 5]  # the chunk's items before the failing one come first
    notes = getattr(info.value, "__notes__", [])
    assert any("item 5 of the map" in n and "None" in n for n in notes), notes
    assert info.value.clusterpy_map_index == 5
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_owned_executor_refuses_after_shutdown():
    ex = ClusterExecutor(local=True, local_cpus=1)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(mul, 1)


def test_max_workers_starts_a_local_node_of_that_size():
    with ClusterExecutor(max_workers=1) as ex:
        assert ex.submit(mul, 2, 2).result(30) == 4
        assert [n["cpus"] for n in ex.cluster.nodes()] == [1]
    with pytest.raises(ValueError):
        ClusterExecutor(max_workers=0)


def test_executor_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "executor.py")], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out.stdout
    assert "ValueError" in out.stdout and "ok" in out.stdout
