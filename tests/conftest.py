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
