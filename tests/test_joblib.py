"""The "clusterpy" joblib backend: joblib.Parallel (and scikit-learn's n_jobs) on the cluster."""

from __future__ import annotations

import os

import pytest

joblib = pytest.importorskip("joblib", reason="joblib is an optional extra: pip install clusterpy[joblib]")

import clusterpy  # noqa: E402
import clusterpy.joblib as cjoblib  # noqa: E402


def double(i):
    return 2 * i


def pid_of(_):
    return os.getpid()


def fails_on_13(i):
    if i == 13:
        raise ValueError("thirteen")
    return i


@pytest.fixture(scope="module")
def cluster():
    cjoblib.register()
    with clusterpy.JobCluster(double, local=True, local_cpus=2) as c:
        yield c


def test_parallel_1000_delayed_calls(cluster):
    before = cluster.stats()["jobs_submitted"]
    with joblib.parallel_backend("clusterpy", cluster=cluster):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(double)(i) for i in range(1000))
    assert results == [2 * i for i in range(1000)]
    jobs = cluster.stats()["jobs_submitted"] - before
    assert 1 <= jobs < 1000  # joblib batched the tiny calls: one job per batch


def test_calls_run_in_the_cluster_workers(cluster):
    with joblib.parallel_backend("clusterpy", cluster=cluster):
        pids = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(pid_of)(i) for i in range(20))
    assert os.getpid() not in pids


def test_n_jobs_counts_the_cluster_cpus(cluster):
    backend = cjoblib.ClusterBackend(cluster=cluster)
    assert backend.effective_n_jobs(-1) == 2
    assert backend.effective_n_jobs(-2) == 1
    assert backend.effective_n_jobs(5) == 5
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)
    with pytest.raises(clusterpy.ConfigurationError, match="needs a cluster"):
        cjoblib.ClusterBackend()


def test_exception_propagates_and_generator_output(cluster):
    with joblib.parallel_backend("clusterpy", cluster=cluster):
        with pytest.raises(ValueError, match="thirteen"):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fails_on_13)(i) for i in range(40))
        gen = joblib.Parallel(n_jobs=2, return_as="generator")(joblib.delayed(double)(i) for i in range(30))
        assert sum(gen) == 2 * sum(range(30))


def test_executor_as_the_backend_target():
    cjoblib.register()
    with clusterpy.ClusterExecutor(local=True, local_cpus=1) as ex:
        with joblib.parallel_backend("clusterpy", cluster=ex):
            assert joblib.Parallel(n_jobs=-1)(joblib.delayed(double)(i) for i in range(10)) == list(range(0, 20, 2))


def test_scikit_learn_grid_search(cluster):
    sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed (the [test] extra installs it)")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.tree import DecisionTreeClassifier

    X, y = load_iris(return_X_y=True)
    before = cluster.stats()["jobs_done"]
    with joblib.parallel_backend("clusterpy", cluster=cluster):
        search = GridSearchCV(DecisionTreeClassifier(random_state=0), {"max_depth": [1, 2, 3, 4]}, cv=3, n_jobs=-1)
        search.fit(X, y)
    assert search.best_params_["max_depth"] in (2, 3, 4) and search.best_score_ > 0.9
    assert cluster.stats()["jobs_done"] > before  # the fits ran on the cluster
    assert sklearn.__version__
