"""Bad command-line input: one line `PROG: error: ...` on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class UsageError(ValueError):
    """Bad command-line input: reported as one line and exit code 2."""


def report_usage_error(prog: str, err: Exception) -> None:
    """Print `prog: error: message` as one line on stderr."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


@contextmanager
def exit_on_usage_error(prog: str, *errors: type):
    """Turn a UsageError (or any of `errors`) raised inside into `prog: error: message` and exit 2."""
    try:
        yield
    except (UsageError, *errors) as err:
        report_usage_error(prog, err)
        raise SystemExit(2) from None
