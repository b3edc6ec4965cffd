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


@pytest.fixture(autouse=True)
def _fresh_moe_metrics():
    """megatron-core's MoE metrics tracker is process-global and sized by the first model's depth."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().metrics.clear()
    yield


@pytest.fixture(autouse=True)
def _fresh_aux_loss_scales():
    """megatron-core keeps the MoE/MTP aux-loss gradient scales as class attributes; start each test unset."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # its class default
    yield
