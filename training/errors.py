"""One line for a user's mistake, a traceback for a bug."""
import os
import sys
from typing import Callable

import torch.distributed as dist

from configs.keys import ConfigError
from models.checkpoint import CheckpointError

# What a user's input can cause: each is reported in one line.
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError)


class UserError(Exception):
    """A mistake in the user's input (flags, files, config): reported in one line."""


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; user mistakes print one `error: ...` line to stderr and exit 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        main()
    except (UserError, *USER_ERRORS) as error:
        if isinstance(error, FileNotFoundError) and error.filename is not None:
            message = f"file not found: {error.filename}"
        else:
            message = str(error)
        if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
