"""Shared pytest setup: `gpu` tests skip without CUDA; the debug config and dist harness live in
pmp_megatron.testing so tests, tools and benchmarks share them."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """A test that leaves torch.distributed initialised in the pytest process fails itself, not whichever
    later test first needs a fresh group (in-process distributed work belongs in testing.spawn)."""
    import torch.distributed as dist

    was = dist.is_available() and dist.is_initialized()
    yield
    if not was and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("this test left a torch.distributed process group initialised in the pytest process")
