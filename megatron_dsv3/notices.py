"""Third-party notices that do not concern a dsv3 user, silenced by message (nothing else is hidden).

megatron-core announces on import that optional GPU extras are absent (Transformer Engine, Apex, absl) and that
GPTModel is deprecated; torch reports that no CUDA runtime exists; Megatron-LM suggests a ModelConfig and a
one_logger package. On the CPU machines this plugin supports, these are the expected state.
"""
from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    r"(Transformer Engine and Apex are|Apex is) not installed",
    r"absl\.logging is not installed",
    r"Only transformer-engine>=.* supports MoE experts, but your version is 0\.0\.0",
    r".*GPTModel is deprecated",
    r"\s*It is recommended to use a ModelConfig",
    r".*MimoModelConfig",
    r".*(is deprecated|scope is deprecated)",
    r"Could not determine rank from torch\.distributed",
    r"Disabling sequence parallelism because tensor model parallelism is disabled",
)
# Log records (logger -> message start) of the same kind.
_LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.rerun_state_machine": ("Implicit initialization of Rerun State Machine",
                                          "RerunStateMachine initialized in mode"),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence_irrelevant_notices() -> None:
    """Install the message filters and quiet torch's no-CUDA-runtime log line; called on package import."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for name, starts in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


# What torch.distributed.checkpoint says on every one-process load (dsv3-generate, dsv3-convert).
_CLI_MESSAGES = (
    r"torch\.distributed is disabled, unavailable or uninitialized",
    r"The argument order of load has been changed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
)


def quiet_third_party() -> None:
    """For the command lines: megatron-core logs every parameter and config at INFO; keep stderr for us."""
    silence_irrelevant_notices()
    for message in _CLI_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
