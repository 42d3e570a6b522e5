"""Two hosts made from network namespaces, and the tiny corpus and config of the engine tests."""

from __future__ import annotations

import os

import pytest

from tests.engines.conftest import corpus, tiny_config  # noqa: F401  (fixtures shared with the engine tests)
from tests.multinode.hosts import Hosts, can_make_hosts

REASON = can_make_hosts()


@pytest.fixture
def hosts():
    """Two fresh hosts; their processes, namespaces and links are removed even when the test fails."""
    if REASON:
        if os.environ.get("CI") == "true":  # CI runs as root with iproute2: a skip there would hide a broken setup
            pytest.fail(f"two hosts cannot be made on this CI machine: {REASON}")
        pytest.skip(f"two hosts cannot be made on this machine: {REASON}")
    made = Hosts.make()
    try:
        yield made
    finally:
        made.close()
