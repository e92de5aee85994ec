"""Suite-wide guards."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def no_ray_left_in_the_test_process(request):
    """A test must not leave pytest's own process connected to Ray. Such a process is a Ray driver: when a later
    test stops that cluster (``ray stop``, a killed daemon), Ray's core worker ends the whole pytest process with
    exit code 1 and no report, 60 s later, inside whichever test then runs (CI died that way in the DeepSpeed
    end-to-end test, after a shard-safety test had started Ray through the quickstart path). Tests that need a
    Ray driver run it in a subprocess: even after ``ray.shutdown()`` its threads outlive the session, and CI's
    pytest once died at exit with a segmentation fault after every test had passed."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} left this process connected to Ray (now shut down)", pytrace=False)
