"""Errors caused by the data a user points at (annotation files, videos, video_root).

The entry scripts report a DataError in one `error:` line (training/errors.py). Messages
are kept to one line because a DataLoader worker's error comes back wrapped in the
worker's traceback, and the CLI then shows only that traceback's last line.
"""


def one_line(text) -> str:
    """`text` with its lines joined by single spaces (blank lines and the indentation dropped)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class DataError(RuntimeError):
    """Input data the pipeline cannot use. Takes one message, so that torch's DataLoader can
    re-raise it from a worker as `type(error)(message_with_traceback)`."""
