"""Shared test setup: the repo root on sys.path, one loopback tool server, the committed tasks."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import env  # noqa: E402
import server  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
STB_QUERIES = os.path.join(FIXTURES, "stb_queries.json")  # our own StableToolBench-format queries
SHARED = os.path.join(os.path.dirname(ROOT), "shared")     # reference data; absent in a user's clone


@pytest.fixture(scope="session")
def tool_server():
    """One embedded-benchmark server on an ephemeral loopback port, for the whole session."""
    srv = server.start_in_thread(port=0)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def test_tasks():
    return env.load_tasks(os.path.join(ROOT, "data", "bench_test.json"))


@pytest.fixture(scope="session")
def train_tasks():
    return env.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))
