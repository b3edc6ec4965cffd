"""Shared fixtures: one single-process gloo runtime for the in-process tests."""
import pytest
import torch


@pytest.fixture(scope="session")
def runtime():
    import megatron_dsv3 as m

    m.runtime.initialize(tp=1, pp=1, ep=1, seed=1234)
    yield m.runtime


@pytest.fixture(autouse=True)
def _fp32_and_seed():
    torch.manual_seed(0)
    yield
