"""The data files of one index generation (inference/index.py), written so that a failure leaves
no half index: each run writes files of its own names, front to back through ordinary files
(a full disk is an OSError naming the file, never a SIGBUS from a memory map), and commits
them by renaming its manifest over the old one.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
# Where video_tool.py index keeps the parts it encoded until its commit (inference/index_processes.py).
PARTS_FOLDER = ".index-parts"


@contextmanager
def _naming(path: Path):
    """A failed write or allocation raises an OSError without the file's name; the message needs it."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def sync_to_disk(handle) -> None:
    """On disk before the manifest names it: a crash must not commit a manifest whose data is lost."""
    handle.flush()
    os.fsync(handle.fileno())


def _reserve(handle, size: int) -> None:
    """Allocate the file's `size` bytes now: a disk too small fails here, with ENOSPC, instead of
    in a write after hours of encoding."""
    allocate = getattr(os, "posix_fallocate", None)  # macOS has none
    if allocate is None:
        return
    try:
        allocate(handle.fileno(), 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: the writes tell
            raise


HEADER_BYTES = 128  # an .npy header of any shape this index writes fits: it is rewritten when the rows are known


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """The .npy (format 1.0) header of an array, padded with spaces to HEADER_BYTES, so the data
    starts at the same offset whatever the number of rows."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    header = buffer.getvalue()
    missing = HEADER_BYTES - len(header)
    if missing < 0:
        raise ValueError(f"the .npy header of shape {shape} needs {len(header)} bytes, over {HEADER_BYTES}")
    # magic and version (8 bytes), the little-endian length of the rest (2), the rest ending in a newline
    length = int.from_bytes(header[8:10], "little") + missing
    return header[:8] + length.to_bytes(2, "little") + header[10:-1] + b" " * missing + b"\n"


class NpyFile:
    """A new .npy array of rows of `row_shape`, appended front to back through an ordinary file:
    writing into a memory map on a full disk kills the process with SIGBUS instead of raising.
    Its header gets the number of rows written when it closes, so the rows need not be known
    ahead (windows of long files); `expected_rows` of them are allocated at once. A file that
    fails as it is created is removed."""

    def __init__(self, path: Path, dtype, row_shape: tuple, expected_rows: int):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        self.handle = open(path, "xb")
        try:
            with _naming(path):
                self.handle.write(_npy_header(self.dtype, (expected_rows, *self.row_shape)))
                self.handle.flush()
                _reserve(self.handle, HEADER_BYTES + expected_rows * self.row_bytes)
        except BaseException:
            self.discard()
            raise

    def append(self, rows) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, not {self.row_shape}")
        with _naming(self.path):
            self.handle.write(rows.data)
        self.rows += len(rows)

    def close(self) -> None:
        """The header with the rows written, the allocation past them freed; on disk before a
        manifest names the file."""
        with _naming(self.path):
            self.handle.truncate(HEADER_BYTES + self.rows * self.row_bytes)
            self.handle.seek(0)
            self.handle.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
            sync_to_disk(self.handle)
            self.handle.close()

    def discard(self) -> None:
        """Close (if open) and remove the file."""
        with suppress(OSError):  # closing flushes, and the disk may be full
            self.handle.close()
        self.path.unlink(missing_ok=True)


class IndexWriter:
    """The data files of one new index generation under this run's own names, committed by
    replacing the manifest. A context: leaving it uncommitted removes every file it wrote."""

    def __init__(self, folder: Path, expected_rows: int, embedding_dtype: str = "float32"):
        """`expected_rows`: the tokens file's first allocation (a file of windows may need more)."""
        self.folder, self.expected_rows, self.embedding_dtype = folder, expected_rows, np.dtype(embedding_dtype)
        self.id = uuid.uuid4().hex[:12]
        self.embeddings, self.files, self.tokens = [], [], None
        self.data_files: list[NpyFile] = []
        self.manifest_temporary = folder / f".{MANIFEST}.{self.id}.tmp"
        self.committed = False

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exception) -> None:
        if not self.committed:
            for data_file in self.data_files:
                data_file.discard()
            self.manifest_temporary.unlink(missing_ok=True)

    def _new_file(self, kind: str, dtype, row_shape: tuple, expected_rows: int) -> NpyFile:
        self.data_files.append(NpyFile(self.folder / f"{kind}-{self.id}.npy", dtype, row_shape, expected_rows))
        return self.data_files[-1]

    def add(self, files: list[dict], embeddings: np.ndarray, tokens=None) -> None:
        if tokens is not None:
            if self.tokens is None:
                self.tokens = self._new_file("tokens", np.float16, tokens.shape[1:], self.expected_rows)
            self.tokens.append(tokens)
        self.files += files
        self.embeddings.append(np.asarray(embeddings, dtype=self.embedding_dtype))

    def commit(self, manifest: dict) -> None:
        embeddings = np.concatenate(self.embeddings)
        embeddings_file = self._new_file("embeddings", self.embedding_dtype, embeddings.shape[1:], len(embeddings))
        embeddings_file.append(embeddings)
        embeddings_file.close()
        manifest["embeddings"] = embeddings_file.path.name
        manifest["tokens"] = None
        if self.tokens is not None:
            self.tokens.close()
            manifest["tokens"] = self.tokens.path.name
        manifest["files"] = self.files
        with _naming(self.manifest_temporary), open(self.manifest_temporary, "x") as handle:
            handle.write(json.dumps(manifest, indent=1))
            sync_to_disk(handle)
        os.replace(self.manifest_temporary, self.folder / MANIFEST)
        self.committed = True
        self._remove_stale(manifest)

    def _remove_stale(self, manifest: dict) -> None:
        """Data files of earlier generations and leftovers of killed runs (the lock rules out a live one)."""
        current = {manifest["embeddings"], manifest["tokens"], MANIFEST}
        for path in self.folder.iterdir():
            if path.name not in current and path.name.lstrip(".").startswith(("embeddings-", "tokens-", MANIFEST)):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.folder / PARTS_FOLDER, ignore_errors=True)  # the run's parts: in the commit
