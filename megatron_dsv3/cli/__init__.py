"""What every command line shares: one-line usage errors, Megatron-LM's parser with the dsv3 flags, and the
mapping from Megatron-LM flags to `DSV3Config` and megatron-core's transformer config, how a command starts
(`launch`: the console scripts' entry points) and how a finished one exits (`exit.exit_after`)."""
from megatron_dsv3.cli.errors import UsageError, exit_on_usage_error

__all__ = ["UsageError", "exit_on_usage_error"]
