"""The suite's shared expensive pieces, each started once per session on first use: one Ray
cluster that the sweep and serving tests join, and one headless Chromium whose pages (tabs)
the browser tests open. (A local server's port comes from the product's own
``omninet.sweep.localservers.free_port``, as do its PostgreSQL and MLflow servers,
``LocalPostgres`` and ``LocalMlflowServer``: one per module that needs them. Byte and text
tasks in tests name their corpus, ``hf_models.CORPUS`` or a folder of their own, instead of
listing the whole standard library, the default that one test checks on purpose.)

Starting a Ray cluster costs seconds of two busy cores, and the suite used to start about
eleven (one per module, one per ``run_sweep`` call). :func:`ray_cluster` joins one session
cluster instead: a 2-CPU head (what an embedded Ray is on the 2-core CI machine), to which a
module adds the nodes its topology needs (a fake GPU, custom resources) and from which they are
removed again at its end. The driver is connected while such a module runs and disconnected
after it, so every other test sees the process as before (``ray.is_initialized()`` false). A
test that needs a Ray of its own says why where it starts one (``test_sweep_real``:
``run_sweep`` must start and shut down its own embedded Ray; subprocess drivers started with
``--num-cpus``: the entry point's own embedded start). Under pytest-xdist (``make test``: two
workers, ``--dist loadfile``) each worker has its own session cluster, and a module runs whole
in one worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: The session cluster's head: two CPUs, as an embedded Ray on the 2-core CI machine.
RAY_HEAD = {"num_cpus": 2, "include_dashboard": False}


@pytest.fixture(scope="session")
def _ray_session_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args=RAY_HEAD)
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


class ModuleCluster:
    """The session cluster as one test module sees it: ``add_node`` nodes stay until the module
    ends (or ``remove_node``); ``address`` is what a second driver (``sweeps/run.py
    --address``) joins."""

    def __init__(self, cluster) -> None:
        self._cluster = cluster
        self.added: list = []

    @property
    def address(self) -> str:
        return self._cluster.address

    def add_node(self, **node_args):
        node = self._cluster.add_node(**node_args)
        self.added.append(node)
        return node

    def remove_node(self, node) -> None:
        self._cluster.remove_node(node)
        self.added.remove(node)

    def wait_for_nodes(self, timeout: float = 60) -> None:
        self._cluster.wait_for_nodes(timeout)


@pytest.fixture(scope="module")
def ray_cluster(_ray_session_cluster):
    """The session Ray cluster with this process's driver connected to it for the module:
    ``run_sweep`` (no address) joins the Ray it finds initialised and leaves it running."""
    import ray

    if not ray.is_initialized():
        ray.init(address=_ray_session_cluster.address, log_to_driver=False)  # worker logs would reach capsys
    view = ModuleCluster(_ray_session_cluster)
    try:
        yield view
    finally:
        for node in list(view.added):
            view.remove_node(node)
        # the next module sees only the head: not a node Ray has yet to find dead (Serve, for
        # one, places a proxy on every node it believes alive)
        _ray_session_cluster.wait_for_nodes()
        ray.shutdown()  # the driver only: the session cluster stays for the next module


@pytest.fixture(scope="session")
def _chromium_process(tmp_path_factory):
    from cdp import CHROMIUM, Browser

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
    with Browser(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


@pytest.fixture
def chromium(_chromium_process):
    """The session's one headless Chromium (tests/cdp.py): a test opens its own pages (tabs),
    whose console errors and screenshots are its own, and they are closed after it."""
    yield _chromium_process
    for page in list(_chromium_process.pages):
        page.close()


def pytest_collection_modifyitems(config, items):
    """``slow`` (more than a few seconds, deselected by ``make test-fast``) also follows from a
    test's fixtures: every test that joins the Ray cluster, and every test that uses a fixture
    its module names in ``SLOW_FIXTURES`` (a trained base, a trial run once for the module)."""
    for item in items:
        slow = {"ray_cluster"} | set(getattr(item.module, "SLOW_FIXTURES", ()))
        if slow & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
