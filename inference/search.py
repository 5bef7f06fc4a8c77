"""Top-k search over an index's ITC embeddings: exact, in chunks, and optionally approximate (faiss).

Exact search (`exact_top_k`) reads the (N, D) embeddings, float32 or float16 and usually a
memory map of the index's file (inference/index.py), `chunk_rows` rows at a time: each chunk is
copied (float16 converted) into one float32 buffer that stays in the CPU's cache, multiplied by
the query (torch.mv, the BLAS call the full product `query @ embeddings.T` makes) and merged into
a running top-k. Memory beyond the map is that buffer and k results, whatever N is.

* The scores are bit-identical to the full product's. MKL's sgemv (torch 2.14 on the CPUs
  measured) computes rows in groups of 4 and the last N mod 4 rows of a call another way, so
  chunks start at multiples of ALIGN rows and the last chunk ends where the full product ends;
  chunks starting elsewhere round differently (tests/test_search.py checks chunk sizes that
  divide N and that do not, and N of every remainder mod 4).
* Ties: equal scores are ordered by row, lower first (the order of a stable descending sort of
  the full scores). torch.topk, which search used before, leaves the order of equal scores to
  its heap (for ten equal scores it returns rows 8, 6, 7, 5, 9); they arise from identical
  videos. Otherwise the rows and their order are those of `query @ embeddings.T` and torch.topk.
* Why copy before multiplying: on the 2-vCPU AMD EPYC of benchmarks/RESULTS.md, MKL's sgemv
  reads embeddings from main memory at about 7 GB/s, from the cache much faster: copying first
  takes 1,000,000 x 256 float32 from 144 ms (the full product) to 88 ms, float16 to 70 ms.

Approximate search (`ApproximateIndex`, `video_tool.py search --approximate`) uses faiss, an
optional dependency (`pip install faiss-cpu`; imported only here and only when asked for): an
inverted-file index with exact inner products in the probed lists (faiss "IVF<nlist>,Flat",
METRIC_INNER_PRODUCT; nlist about sqrt(N), NPROBE_SHARE of the lists probed). It is built from
the index's embeddings on the first approximate search after each index update and kept next
to them (`embeddings-<id>.npy.ivf.faiss`, removed with them by the next update); its candidates
are re-scored exactly as exact search scores them, so a video it finds has the same ITC score
and place as in exact search, and a miss is one the inverted lists did not probe.
"""
from __future__ import annotations

import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

ALIGN = 64  # rows: chunk starts are multiples of this (see the module docstring)
CHUNK_ROWS = 4096  # 4 MiB of float32 at embed_dim 256: within the L2 + L3 share of a core
# torch threads while scoring: the work is reading memory, which one core does at about 30 GB/s on
# the EPYC of RESULTS.md; a second thread adds a synchronisation per chunk, and on a machine whose
# cores are busy with other work every chunk then waits for a descheduled thread (10-20x slower).
SEARCH_THREADS = 1
# Share of the inverted lists probed: recall@10 1.000 on 1,000,000 clustered synthetic embeddings
# (half of it: 0.996; a quarter: 0.956), 9 ms a query (benchmarks/RESULTS.md).
NPROBE_SHARE = 1 / 32
MIN_TRAIN_PER_LIST = 39  # faiss's k-means wants at least this many training vectors per list
TRAIN_PER_LIST = 64  # vectors per list the k-means is trained on (a sample of the rows)


def _as_tensor(rows) -> torch.Tensor:
    """A torch view of a numpy array or memory map (read-only ones included: never written)."""
    if isinstance(rows, torch.Tensor):
        return rows
    with warnings.catch_warnings():  # "not writable": this module only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(rows))


def _query_vector(query, dim: int) -> torch.Tensor:
    query = torch.as_tensor(query).detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if query.numel() != dim:
        raise ValueError(f"the query has {query.numel()} values, the embeddings {dim}")
    return query


def merge_top_k(best_scores: torch.Tensor, best_rows: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running top-k and new (score, row) pairs whose rows all come after its rows:
    higher score first, lower row first among equal scores."""
    merged_scores = torch.cat([best_scores, scores])
    merged_rows = torch.cat([best_rows, rows])
    order = torch.sort(merged_scores, descending=True, stable=True).indices[:k]
    return merged_scores[order], merged_rows[order]


def exact_top_k(query, embeddings, k: int, chunk_rows: int = CHUNK_ROWS,
                threads: int | None = SEARCH_THREADS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of `embeddings` (N, D; float32 or float16; numpy array, memory map or
    tensor) for `query` (D,) or (1, D) by inner product: (scores float32 (min(k, N),), rows int64),
    best first, ties by lower row. See the module docstring for exactness and speed. `threads`:
    torch's thread count while scoring (restored after; None: torch's own setting)."""
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        return _exact_top_k(query, embeddings, k, chunk_rows)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _exact_top_k(query, embeddings, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    source = _as_tensor(embeddings)
    if source.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got {tuple(source.shape)}")
    count, dim = source.shape
    query = _query_vector(query, dim)
    k = min(max(int(k), 0), count)
    best_scores, best_rows = torch.empty(0), torch.empty(0, dtype=torch.long)
    if k == 0:
        return best_scores, best_rows
    chunk_rows = ALIGN * max(1, math.ceil(chunk_rows / ALIGN))
    buffer = torch.empty(min(chunk_rows, count), dim)
    chunk_scores = torch.empty(len(buffer))
    for start in range(0, count, chunk_rows):
        rows = source[start:start + chunk_rows]
        block, scores = buffer[:len(rows)], chunk_scores[:len(rows)]
        block.copy_(rows)  # float16 -> float32 here; the multiply then reads the cache, not memory
        torch.mv(block, query, out=scores)
        if len(best_rows) == k:  # a later row must beat the k-th best: it loses a tie
            candidates = torch.nonzero(scores > best_scores[-1]).flatten()
        else:
            candidates = torch.arange(len(rows))
        if len(candidates) > k:  # keep this chunk's k best (and rows tied with its k-th)
            kth = torch.topk(scores[candidates], k, sorted=False).values.min()
            candidates = candidates[scores[candidates] >= kth]
        if len(candidates):
            best_scores, best_rows = merge_top_k(best_scores, best_rows, scores[candidates], candidates + start, k)
    return best_scores, best_rows


def score_rows(query, embeddings, rows) -> torch.Tensor:
    """The scores of `rows` (sorted, no repeats) exactly as exact_top_k computes them, reading only
    the ALIGN-row blocks that hold them: the blocks are multiplied stacked in row order, so each
    row has the place in its group of rows that it has in exact_top_k's chunk, and the last block
    of the embeddings, if read, ends the product as it ends the last chunk."""
    source = _as_tensor(embeddings)
    count, dim = source.shape
    query = _query_vector(query, dim)
    rows = torch.as_tensor(rows, dtype=torch.long)
    if len(rows) == 0:
        return torch.empty(0)
    starts = torch.unique(rows // ALIGN) * ALIGN
    blocks = [source[start:start + ALIGN] for start in starts.tolist()]
    stacked = torch.cat(blocks).to(torch.float32)
    block_of = torch.searchsorted(starts, rows, right=True) - 1
    return torch.mv(stacked, query)[block_of * ALIGN + rows - starts[block_of]]


def rescore(query, embeddings, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` of `embeddings` (any order, no repeats) scored and ordered as exact_top_k scores and
    orders them: (scores, rows), higher score first, lower row first among equal scores."""
    rows = torch.as_tensor(rows, dtype=torch.long).flatten().sort().values
    scores = score_rows(query, embeddings, rows)
    order = torch.sort(scores, descending=True, stable=True).indices
    return scores[order], rows[order]


# -- approximate search (faiss, optional) ---------------------------------------------------


def import_faiss():
    """faiss, or a UserError saying how to install it (it is not in requirements.txt)."""
    try:
        import faiss
    except ImportError:
        from runtime.errors import UserError
        raise UserError("approximate search needs faiss, an optional package: pip install faiss-cpu "
                        "(or search without --approximate: exact search)") from None
    return faiss


def list_count(rows: int) -> int:
    """Inverted lists for `rows` vectors: a power of two near sqrt(rows), with enough vectors per
    list to train (1,000,000 rows: 1,024 lists)."""
    lists = 2 ** round(math.log2(math.sqrt(max(rows, 1))))
    while lists > 1 and rows < MIN_TRAIN_PER_LIST * lists:
        lists //= 2
    return lists


class ApproximateIndex:
    """A faiss IVF-flat inner-product index over an index's embeddings."""

    def __init__(self, index, nprobe: int | None = None):
        self.index = index
        self.nlist = index.nlist
        self.nprobe = nprobe or max(1, round(self.nlist * NPROBE_SHARE))

    @classmethod
    def build(cls, embeddings, nlist: int | None = None, seed: int = 0, nprobe: int | None = None,
              chunk_rows: int = 65536) -> ApproximateIndex:
        """Train the coarse quantizer on a sample of TRAIN_PER_LIST rows per list, then add every
        row (in chunks, converted to float32: a memory map is never read whole into memory)."""
        faiss = import_faiss()
        source = _as_tensor(embeddings)
        count, dim = source.shape
        nlist = nlist or list_count(count)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if count:
            sample = min(count, TRAIN_PER_LIST * nlist)
            picked = np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))
            index.cp.seed = seed
            index.train(np.ascontiguousarray(np.asarray(embeddings)[picked], dtype=np.float32))
            for start in range(0, count, chunk_rows):
                index.add(source[start:start + chunk_rows].float().numpy())
        return cls(index, nprobe)

    def save(self, path: Path) -> None:
        """Written to a temporary file of its own and renamed: a reader never sees half a file."""
        faiss = import_faiss()
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            faiss.write_index(self.index, str(temporary))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, nprobe: int | None = None) -> ApproximateIndex:
        """Memory-mapped: its vectors are read only where the probed lists lie."""
        faiss = import_faiss()
        return cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), nprobe)

    def search(self, query, count: int) -> np.ndarray:
        """Candidate rows for `query`, about the `count` best, in faiss's order (no rescoring)."""
        if count <= 0 or self.index.ntotal == 0:
            return np.empty(0, np.int64)
        self.index.nprobe = min(self.nprobe, self.nlist)
        _, rows = self.index.search(_query_vector(query, self.index.d).numpy()[None], count)
        return rows[0][rows[0] >= 0]  # -1: fewer than `count` vectors in the probed lists


def approximate_top_k(query, embeddings, k: int, approximate: ApproximateIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_top_k's result where the inverted lists hold it: faiss's k candidates, re-scored and
    ordered exactly as exact_top_k scores and orders."""
    return rescore(query, embeddings, approximate.search(query, k))


def approximate_index_path(index) -> Path:
    """Where the approximate index of an index folder's embeddings is kept: named after their file
    (a new one each update), so that the update's clean-up removes it with them."""
    return Path(index.folder) / f"{index.manifest['embeddings']}.ivf.faiss"


def open_approximate(index, nprobe: int | None = None, log=None) -> ApproximateIndex:
    """The approximate index of `index` (an inference.index.VideoIndex), built and kept on first use."""
    path = approximate_index_path(index)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if path.is_file():
        try:
            return ApproximateIndex.load(path, nprobe)
        except RuntimeError as error:  # faiss's error for a damaged file: it is derived data, build it again
            log(f"search: approximate index {path.name} unreadable ({str(error).strip().splitlines()[-1]}); "
                "building it again")
    started = time.perf_counter()
    log(f"search: building the approximate index of {len(index.embeddings):,} videos (once per index update)")
    built = ApproximateIndex.build(index.embeddings, nprobe=nprobe)
    try:
        built.save(path)
    except OSError as error:  # a read-only index folder: use it, but it is built again next time
        log(f"search: approximate index not kept ({error}); it is built again each search")
        return built
    log(f"search: approximate index {path.name}: {built.nlist} lists, {time.perf_counter() - started:.1f} s")
    return built
