"""Search latency: ITC top-k over an index's stored embeddings (inference.api.itc_shortlist, what
`video_tool.py search` runs), and the ITM re-ranking of the top candidates
(models.testa_retrieval.rerank_scores, the evaluation's code) with the toy and the real-size
(BERT-base, 12 layers) text encoder against the 1,041 tokens a 224 px 32-frame video keeps.
Text encoding of the query and reading the index are not included.

    python -m benchmarks.bench_search --out benchmarks/results/search_cpu.json

`--sections large` searches millions of stored embeddings (inference/search.py): written to
.npy files (float32 and float16) as an index stores them and opened as memory maps as
VideoIndex opens them; exact search in chunks (the first search of a process, then repeated
ones, at each --threads count) with the memory it holds, checked to give the rows, order and
scores of the full product in memory (search before inference/search.py, timed too), and the
optional faiss inverted-file index (`search --approximate`): build time, size, query time and
recall@10 against exact search at several nprobe.

    python -m benchmarks.bench_search --sections large --large_videos 1000000 \\
        --out benchmarks/results/search_large_cpu.json

The embeddings are not uniform noise, which no index can cluster and no real model produces:
normalised sums of a direction all videos share (anisotropy: unrelated videos score about
0.14), one of --clusters topic centres with Zipf-like sizes (of 2,000 topics the largest holds
5.4% of the videos) and per-video noise (same-topic videos score about 0.71). Queries are drawn
the same way with their own noise. The embedding model is not involved.
"""
import argparse
import functools
import gc
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from configs.load import load_config
from inference.api import itc_shortlist
from inference.index_files import NpyFile
from inference.search import CHUNK_ROWS, SEARCH_THREADS, ApproximateIndex, approximate_top_k, exact_top_k
from models import create_model
from models.testa_retrieval import rerank_scores

# (name, config, overrides, video tokens per candidate). The video encoder is unused here: one block.
TEXT_ENCODERS = (("toy", "configs/toy/retrieval.yaml", ["depth=1", "testa_r=[1, 2]"], None),
                 ("real (BERT-base)", "configs/retrieval_didemo_f32.yaml", ["depth=1", "testa_r=[1, 12]"], 1041))
SECTIONS = ("itc", "rerank", "large")
DTYPES = {"float32": np.float32, "float16": np.float16}
# The synthetic embeddings (module docstring): weights of the shared direction and of the noise
# against the unit topic centre; topic sizes fall as rank ** -ZIPF.
SHARED, NOISE, ZIPF = 0.5, 0.7, 0.8
GENERATE_ROWS = 65536


def full_product_shortlist(text_embedding, video_embeddings, count):
    """ITC search before inference/search.py: the full product over embeddings in memory, torch.topk."""
    itc = text_embedding @ torch.from_numpy(np.asarray(video_embeddings, np.float32)).T
    return itc[0].topk(min(count, itc.shape[1]))


def itc_latency_ms(num_videos: int, embed_dim: int, k: int, device, runs: int, warmup: int) -> dict:
    embeddings = F.normalize(torch.randn(num_videos, embed_dim), dim=1).numpy().astype(np.float32)
    query = F.normalize(torch.randn(1, embed_dim), dim=1)
    timings = common.time_interleaved({"chunked": lambda: itc_shortlist(query, embeddings, k),
                                       "full_product": lambda: full_product_shortlist(query, embeddings, k)},
                                      device, runs, warmup)
    chunked, full = timings["chunked"], timings["full_product"]
    return {"median_ms": 1000 * chunked["median_s"], "min_ms": 1000 * chunked["min_s"],
            "full_product_median_ms": 1000 * full["median_s"], "full_product_min_ms": 1000 * full["min_s"]}


@torch.no_grad()
def rerank_latency_ms(config_path: str, overrides: list, tokens_per_video, candidates: int, device, runs: int,
                      warmup: int) -> tuple[dict, list]:
    config = load_config(Path(common.REPO_ROOT) / config_path, overrides)
    model = create_model(config, "retrieval").to(device).eval()
    if tokens_per_video is None:  # what this config's encoder keeps (the toy's own size)
        frames, size = config["num_frm_test"], config["image_size"]
        tokens_per_video = model.visual_encoder(torch.zeros(1, 3, frames, size, size, device=device)).shape[1]
    width = model.visual_encoder.embed_dim
    tokens = torch.randn(candidates, tokens_per_video, width, device=device).half()  # as an index stores them
    sims = torch.rand(1, candidates, device=device)
    input_ids, attention_mask = model.tokenize(["a red circle moves left then a blue square moves up"])

    def rerank():
        return rerank_scores(model, sims, candidates, tokens, input_ids, attention_mask, torch.tensor([0]),
                             video_rows=False)

    timing = common.time_call(rerank, device, runs, warmup)
    return {"median_ms": 1000 * timing["median_s"], "min_ms": 1000 * timing["min_s"]}, [tokens_per_video, width]


# -- millions of embeddings -------------------------------------------------------------------


class ClusteredEmbeddings:
    """Normalised synthetic embeddings with topics (module docstring), drawn reproducibly."""

    def __init__(self, dim: int, clusters: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.generator = dim, generator
        self.shared = F.normalize(torch.randn(dim, generator=generator), dim=0)
        self.centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
        self.weights = torch.arange(1, clusters + 1, dtype=torch.float64) ** -ZIPF

    def draw(self, count: int) -> torch.Tensor:
        topics = torch.multinomial(self.weights, count, replacement=True, generator=self.generator)
        noise = torch.randn(count, self.dim, generator=self.generator) / math.sqrt(self.dim)
        return F.normalize(SHARED * self.shared + self.centres[topics] + NOISE * noise, dim=1)


def write_embeddings(folder: Path, rows: int, data: ClusteredEmbeddings, dtypes) -> dict:
    """One .npy file per dtype of the same `rows` embeddings, written front to back as an index's."""
    files = {name: NpyFile(folder / f"embeddings-{name}.npy", DTYPES[name], (data.dim,), rows) for name in dtypes}
    for start in range(0, rows, GENERATE_ROWS):
        chunk = data.draw(min(GENERATE_ROWS, rows - start)).numpy()
        for npy in files.values():
            npy.append(chunk)
    for npy in files.values():
        npy.close()
    return {name: npy.path for name, npy in files.items()}


def memory_mib() -> dict:
    """This process's resident memory: private (anonymous) and mapped from files (page cache)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[field].split()[0]) / 1024 for key, field in (("private", "RssAnon"), ("file", "RssFile"))}


def held_since(before: dict) -> dict:
    now = memory_mib()
    return {f"held_{key}_mib": round(now[key] - before[key], 1) for key in now}


def timed_ms(function, device, runs: int) -> dict:
    timing = common.time_call(function, device, runs, warmup=1)
    return {"median_ms": 1000 * timing["median_s"], "min_ms": 1000 * timing["min_s"],
            "median_cpu_ms": 1000 * timing["median_cpu_s"]}


def exact_rows(paths: dict, queries: torch.Tensor, args, device) -> tuple[list, dict]:
    """Exact search over each memory-mapped file at each thread count, its memory, and its exactness
    against the full product in memory; that product's own time and memory (float32)."""
    rows, truth = [], {}
    default_threads = torch.get_num_threads()
    for name, path in paths.items():
        gc.collect()  # the previous storage's map closed: what follows is this one's
        before = memory_mib()
        mapped = np.load(path, mmap_mode="r")
        started = time.perf_counter()
        exact_top_k(queries[0], mapped, args.k, CHUNK_ROWS)
        first_ms = 1000 * (time.perf_counter() - started)
        settings = list(itertools.product(args.chunk_rows, args.threads))
        searches = {setting: functools.partial(exact_top_k, queries[1], mapped, args.k, setting[0], threads=setting[1])
                    for setting in settings}
        # interleaved rounds: a change in the other jobs' load hits every setting alike
        timings = common.time_interleaved(searches, device, args.runs, warmup=1)
        held = held_since(before)
        for chunk_rows, threads in settings:
            timing = timings[(chunk_rows, threads)]
            row = {"storage": name, "search": "exact, memory map, chunks", "threads": threads,
                   "chunk_rows": chunk_rows, "buffer_mib": chunk_rows * mapped.shape[1] * 4 / 2 ** 20,
                   "median_ms": 1000 * timing["median_s"], "min_ms": 1000 * timing["min_s"],
                   "median_cpu_ms": 1000 * timing["median_cpu_s"]}
            if (chunk_rows, threads) == (CHUNK_ROWS, SEARCH_THREADS):  # what search runs
                row["first_search_ms"] = first_ms  # mapping the file's pages: the first search of a process
            rows.append({**row, **held})
        results = [exact_top_k(query, mapped, max(args.k, args.recall_k)) for query in queries]
        truth[name] = [found for _, found in results]
        del mapped, searches
        gc.collect()
        before = memory_mib()
        in_memory = np.load(path).astype(np.float32)  # search before: everything in memory
        identical = sum(torch.equal(found, full.indices) and torch.equal(scores, full.values)
                        for (scores, found), full in
                        zip(results, (full_product_shortlist(query[None], in_memory, max(args.k, args.recall_k))
                                      for query in queries)))
        rows[-1]["identical_to_full_product"] = f"{identical}/{len(queries)}"
        if name == "float32":
            rows.append({"storage": name, "search": "full product in memory (before)", "threads": default_threads,
                         **timed_ms(lambda array=in_memory: full_product_shortlist(queries[1][None], array, args.k),
                                    device, args.runs), **held_since(before)})
        del in_memory
    return rows, truth


def approximate_rows(path: Path, queries: torch.Tensor, truth: list, args, device) -> dict:
    """Build, keep, reopen and query the faiss index over the float32 embeddings; recall@k."""
    mapped = np.load(path, mmap_mode="r")
    started = time.perf_counter()
    built = ApproximateIndex.build(mapped)
    build_s = time.perf_counter() - started
    kept = path.with_name(path.name + ".ivf.faiss")
    built.save(kept)
    del built
    before = memory_mib()
    started = time.perf_counter()
    loaded = ApproximateIndex.load(kept)
    load_ms = 1000 * (time.perf_counter() - started)
    result = {"index": f"IVF{loaded.nlist},Flat (inner product)", "nlist": loaded.nlist, "build_s": build_s,
              "file_mib": kept.stat().st_size / 2 ** 20, "load_ms": load_ms, "default_nprobe": loaded.nprobe,
              "by_nprobe": []}
    for nprobe in sorted({*args.nprobe, loaded.nprobe}):
        loaded.nprobe = nprobe
        found = [approximate_top_k(query, mapped, args.recall_k, loaded)[1] for query in queries]
        recall = np.mean([len(set(rows.tolist()) & set(exact[:args.recall_k].tolist())) / args.recall_k
                          for rows, exact in zip(found, truth)])
        query_ms = []
        for query in queries[:args.runs]:
            started = time.perf_counter()
            approximate_top_k(query, mapped, args.k, loaded)
            query_ms.append(1000 * (time.perf_counter() - started))
        result["by_nprobe"].append({"nprobe": nprobe, f"recall@{args.recall_k}": float(recall),
                                    "median_ms": float(np.median(query_ms)), "min_ms": float(np.min(query_ms))})
    result.update(held_since(before))
    return result


def large_section(args, device) -> dict:
    folder = Path(common.scratch_folder("bench_search_"))
    data = ClusteredEmbeddings(args.embed_dim, args.clusters, seed=0)
    started = time.perf_counter()
    paths = write_embeddings(folder, args.large_videos, data, args.dtypes)
    queries = data.draw(args.queries)
    print(f"wrote {args.large_videos:,} x {args.embed_dim} embeddings ({', '.join(paths)}) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    exact, truth = exact_rows(paths, queries, args, device)
    result = {"videos": args.large_videos, "embed_dim": args.embed_dim, "k": args.k, "queries": args.queries,
              "data": {"clusters": args.clusters, "shared": SHARED, "noise": NOISE, "zipf": ZIPF},
              "exact": exact}
    if args.approximate == "off":
        result["approximate"] = "not run (--approximate off)"
    elif "float32" not in paths:
        result["approximate"] = "not run (needs the float32 file)"
    else:
        try:
            import faiss
        except ImportError as error:
            result["approximate"] = f"not run: faiss does not import ({error}); pip install faiss-cpu"
        else:
            result["approximate"] = {"faiss": faiss.__version__,
                                     **approximate_rows(paths["float32"], queries, truth["float32"], args, device)}
    return result


def print_large(large: dict) -> None:
    print(f"exact top-{large['k']} over {large['videos']:,} x {large['embed_dim']} stored embeddings:")
    for row in large["exact"]:
        first = f", first search {row['first_search_ms']:.1f} ms" if "first_search_ms" in row else ""
        same = f", identical to the full product {row['identical_to_full_product']}" \
            if "identical_to_full_product" in row else ""
        chunks = f", {row['chunk_rows']} rows a chunk" if "chunk_rows" in row else ""
        print(f"  {row['storage']}, {row['search']}{chunks}, {row['threads']} threads: "
              f"{row['median_ms']:.1f} ms median, {row['min_ms']:.1f} ms min{first}; "
              f"held {row['held_private_mib']:.0f} MiB private + {row['held_file_mib']:.0f} MiB mapped{same}")
    approximate = large["approximate"]
    if isinstance(approximate, str):
        print(f"  approximate: {approximate}")
        return
    print(f"  approximate, faiss {approximate['faiss']} {approximate['index']}: built in "
          f"{approximate['build_s']:.1f} s, {approximate['file_mib']:.0f} MiB, "
          f"opened in {approximate['load_ms']:.1f} ms")
    for row in approximate["by_nprobe"]:
        recall = next(value for key, value in row.items() if key.startswith("recall@"))
        print(f"    nprobe {row['nprobe']}: recall {recall:.3f}, {row['median_ms']:.2f} ms median, "
              f"{row['min_ms']:.2f} ms min")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="itc,rerank", help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--videos", type=int, default=100_000, help="embeddings in the index")
    parser.add_argument("--embed_dim", type=int, default=256)
    parser.add_argument("-k", type=int, default=16, help="the shortlist: max(k, rerank) of search")
    parser.add_argument("--rerank", type=int, default=16, help="candidates re-ranked by ITM")
    parser.add_argument("--runs", type=int, default=20, help="timed ITC searches")
    parser.add_argument("--rerank_runs", type=int, default=2,
                        help="timed re-rankings per text encoder (BERT-base takes seconds on a CPU)")
    parser.add_argument("--large_videos", type=int, default=1_000_000, help="large: embeddings stored")
    parser.add_argument("--dtypes", default="float32,float16", help="large: storage of the embeddings")
    parser.add_argument("--threads", default="1,2", help="large: torch thread counts for exact search")
    parser.add_argument("--chunk_rows", default=str(CHUNK_ROWS), help="large: rows per chunk of exact search")
    parser.add_argument("--clusters", type=int, default=2000, help="large: topics of the synthetic embeddings")
    parser.add_argument("--queries", type=int, default=100, help="large: queries for exactness and recall")
    parser.add_argument("--recall_k", type=int, default=10)
    parser.add_argument("--approximate", choices=("auto", "off"), default="auto",
                        help="large: the faiss index too, where faiss imports")
    parser.add_argument("--nprobe", default="8,16,32,64", help="large: inverted lists probed, to trade recall")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sections = common.parse_list(args.sections)
    if "large" in sections:
        common.return_freed_memory_to_os()  # freed arrays leave the RSS: what a search holds is measurable
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.dtypes = common.parse_list(args.dtypes)
    if set(args.dtypes) - set(DTYPES):
        parser.error(f"--dtypes: {', '.join(DTYPES)}")
    args.threads = common.parse_list(args.threads, int)
    args.chunk_rows = common.parse_list(args.chunk_rows, int)
    args.nprobe = common.parse_list(args.nprobe, int)
    device = torch.device(args.device)

    results = {}
    machine = common.machine_info(device)
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads), "
          f"device {device}, fp32")
    if "itc" in sections:
        itc_ms = results["itc_ms"] = itc_latency_ms(args.videos, args.embed_dim, args.k, device, args.runs, 3)
        print(f"ITC top-{args.k} over {args.videos:,} x {args.embed_dim} float32 embeddings: "
              f"{itc_ms['median_ms']:.2f} ms median, {itc_ms['min_ms']:.2f} ms min (the full product in memory, "
              f"as before: {itc_ms['full_product_median_ms']:.2f} / {itc_ms['full_product_min_ms']:.2f} ms)")
    if "rerank" in sections:
        reranks = [(name, *rerank_latency_ms(config, overrides, tokens, args.rerank, device, args.rerank_runs, 1))
                   for name, config, overrides, tokens in TEXT_ENCODERS]
        for name, ms, shape in reranks:
            print(f"ITM re-ranking of {args.rerank} candidates, {name} text encoder, {shape[0]} tokens x {shape[1]} "
                  f"per video: {ms['median_ms']:.1f} ms median, {ms['min_ms']:.1f} ms min")
        results["rerank"] = [{"text_encoder": name, "ms": ms, "video_tokens": shape} for name, ms, shape in reranks]
    if "large" in sections:
        results["large"] = large_section(args, device)
        print_large(results["large"])
    if args.out:
        settings = {key: value for key, value in vars(args).items()}
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": settings, "results": results},
                                             indent=1))


if __name__ == "__main__":
    main()
