"""One line for a user's mistake or a failing environment, a traceback for a bug."""
import errno
import io
import os
import re
import sys
import time
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (flags, files, config, data, checkpoints): reported in one
    line. Takes one message, so that torch's DataLoader can re-raise one from a worker as
    `type(error)(message_with_traceback)`; the message is kept to one line for the same reason
    (the CLI shows only the last line of a worker's traceback)."""


class ConfigError(UserError, ValueError):
    """A config key that is unknown, of the wrong type, or missing where it is needed."""


class DataError(UserError, RuntimeError):
    """Input data the pipeline cannot use: broken annotation files (data.annotations.AnnotationError),
    undecodable videos (data.video.VideoReadError), splits without any video."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or cannot be loaded into the requested model."""


class NonFiniteError(Exception):
    """A NaN or inf in a feature, score, loss, gradient or weight (a broken checkpoint, a run
    that diverged): the run stops, naming the tensor and where, instead of reporting or saving
    numbers computed from it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stopped and what it left on disk as its message."""


# What a user's input can cause: each is reported in one line.
USER_ERRORS = (UserError, FileNotFoundError, NonFiniteError)

# The shell's status for a process ended by SIGINT (128 + 2): scripts and schedulers can tell
# an interrupted run from a failed one.
INTERRUPTED_EXIT_CODE = 130

# OSErrors that are about the paths the user gave or the machine (an unwritable or
# non-creatable --output_dir, a full disk), not about the code.
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}

# torch.save reports a failed write through its zip writer without the file or the cause.
_TORCH_WRITE_FAILURE = re.compile(r"inline_container\.cc|PytorchStreamWriter failed")
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"
# How long a rank other than 0 waits, after a user error, for rank 0 to report it.
QUIET_WAIT_S = 5.0
# gloo's error in the ranks left waiting for a process that has exited: the consequence of a
# failure that the exited process has reported already.
_PEER_EXITED = re.compile(r"Connection (closed|reset) by peer")


def check_exists(path, kind: str = "video") -> None:
    """A missing `path` is `file not found: PATH` (user_message); one of the other kind (a folder
    given for a video, a file for a folder) says so. Cheap: callers check before loading a model."""
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if kind == "folder" and not os.path.isdir(path):
        raise UserError(f"not a folder: {path}; index takes the folder that holds the videos")
    if kind == "video" and os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a video file")


def one_line(text) -> str:
    """`text` with its lines joined by single spaces (blank lines and the indentation dropped)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _original_message(text: str) -> str:
    """torch's DataLoader re-raises a worker's error as `type(error)(message)`, where the message
    holds the worker's whole traceback; its last line is `module.Class: original message`."""
    if _WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def _file_being_written(error: BaseException):
    """The innermost file the failing code was writing: the open file object in a frame of
    its traceback (a write() error carries no file name), or the path handed to torch.save."""
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        for name, local in frame.f_locals.items():
            name_of_file = getattr(local, "name", None)
            if isinstance(local, io.IOBase) and isinstance(name_of_file, str) and not name_of_file.startswith("<") \
                    and set(getattr(local, "mode", "")) & set("wax+"):  # "<stderr>" is no file to blame
                found = name_of_file
            elif name == "f" and frame.f_code.co_name == "save" and isinstance(local, (str, os.PathLike)) \
                    and frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py")):
                found = os.fspath(local)
        traceback = traceback.tb_next
    return found


def _os_reason(error: OSError) -> str:
    return (error.strerror or os.strerror(error.errno)).lower()


def user_message(error: BaseException):
    """The one line for an error caused by the user's input or the environment; None for a bug."""
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return f"file not found: {error.filename}"
    if isinstance(error, USER_ERRORS):
        return one_line(_original_message(str(error)))
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        path = error.filename or _file_being_written(error) or "(file unknown)"
        return one_line(f"{path}: {_os_reason(error)}")
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(error)):
        # torch's own text ("unexpected pos 704 vs 598") hides the cause: the OSError it
        # caught while writing, when there is one; a short write is most often a full disk.
        cause = error.__context__ or error.__cause__
        reason = _os_reason(cause) if isinstance(cause, OSError) and cause.errno else \
            "write failed, most likely no space left on device"
        return one_line(f"{_file_being_written(error) or '(file unknown)'}: {reason} (saving with torch.save failed)")
    return None


def _report(message: str) -> None:
    # Not print(): the distributed set-up silences print() on every rank but 0.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _launched_as_rank_zero() -> bool:
    # The launcher's RANK (torchrun, or srun's as init_distributed sets it), not the process
    # group's: an error can come before the group exists, and the group is gone by the report.
    return int(os.environ.get("RANK", 0)) == 0


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; user mistakes and environment failures print one `error: ...` line to
    stderr and exit 1, Ctrl-C one `error: interrupted ...` line and exit 130. Under torchrun
    rank 0 reports; the other ranks exit quietly.

    Anything else is a bug and keeps its traceback.
    """
    try:
        main()
    except KeyboardInterrupt as interrupt:
        # Ctrl-C reaches every process of the terminal's group, torchrun's workers included:
        # rank 0 says where the run stopped (Interrupted's message), the others stay quiet.
        if _launched_as_rank_zero():
            _report(str(interrupt) if isinstance(interrupt, Interrupted) else "interrupted")
        # An object the interrupt cut short while it was being built (a video decoder, say) can
        # fail again when it is freed: that noise says nothing the line above does not.
        sys.unraisablehook = lambda unraisable: None
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as error:
        message = user_message(error)
        if message is None and isinstance(error, RuntimeError) and _PEER_EXITED.search(str(error)):
            sys.exit(1)
        if message is None:
            raise
        if not _launched_as_rank_zero():
            # One line, not one per process: rank 0 meets the same error, reports it and exits,
            # and torchrun then stops this process during the wait. Exiting at once instead
            # could get rank 0 stopped before it prints. A rank still alive after the wait has
            # an error of its own (a bad video in its shard) and reports it.
            time.sleep(QUIET_WAIT_S)
        _report(message)
        sys.exit(1)
    finally:
        # Not imported here: a process group needs torch.distributed imported already, and an import
        # of torch that Ctrl-C cut short would fail again, with a traceback (configs.keys imports
        # this module and stays torch-free as well).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
