"""Search latency: ITC top-k over an index's stored embeddings (inference.api.itc_shortlist, what
`video_tool.py search` runs), and the ITM re-ranking of the top candidates
(models.testa_retrieval.rerank_scores, the evaluation's code) with the toy and the real-size
(BERT-base, 12 layers) text encoder against the 1,041 tokens a 224 px 32-frame video keeps.
Text encoding of the query and reading the index are not included.

    python -m benchmarks.bench_search --out benchmarks/results/search_cpu.json
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from configs.load import load_config
from inference.api import itc_shortlist
from models import create_model
from models.testa_retrieval import rerank_scores

# (name, config, overrides, video tokens per candidate). The video encoder is unused here: one block.
TEXT_ENCODERS = (("toy", "configs/toy/retrieval.yaml", ["depth=1", "testa_r=[1, 2]"], None),
                 ("real (BERT-base)", "configs/retrieval_didemo_f32.yaml", ["depth=1", "testa_r=[1, 12]"], 1041))


def itc_latency_ms(num_videos: int, embed_dim: int, k: int, device, runs: int, warmup: int) -> dict:
    embeddings = F.normalize(torch.randn(num_videos, embed_dim), dim=1).numpy().astype(np.float32)
    query = F.normalize(torch.randn(1, embed_dim), dim=1)
    timing = common.time_call(lambda: itc_shortlist(query, embeddings, k), device, runs, warmup)
    return {"median_ms": 1000 * timing["median_s"], "min_ms": 1000 * timing["min_s"]}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=100_000, help="embeddings in the index")
    parser.add_argument("--embed_dim", type=int, default=256)
    parser.add_argument("-k", type=int, default=16, help="the shortlist: max(k, rerank) of search")
    parser.add_argument("--rerank", type=int, default=16, help="candidates re-ranked by ITM")
    parser.add_argument("--runs", type=int, default=20, help="timed ITC searches")
    parser.add_argument("--rerank_runs", type=int, default=2,
                        help="timed re-rankings per text encoder (BERT-base takes seconds on a CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    itc_ms = itc_latency_ms(args.videos, args.embed_dim, args.k, device, args.runs, 3)
    reranks = [(name, *rerank_latency_ms(config, overrides, tokens, args.rerank, device, args.rerank_runs, 1))
               for name, config, overrides, tokens in TEXT_ENCODERS]
    machine = common.machine_info(device)
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads), "
          f"device {device}, fp32")
    print(f"ITC top-{args.k} over {args.videos:,} x {args.embed_dim} float32 embeddings: "
          f"{itc_ms['median_ms']:.2f} ms median, {itc_ms['min_ms']:.2f} ms min")
    for name, ms, shape in reranks:
        print(f"ITM re-ranking of {args.rerank} candidates, {name} text encoder, {shape[0]} tokens x {shape[1]} "
              f"per video: {ms['median_ms']:.1f} ms median, {ms['min_ms']:.1f} ms min")
    if args.out:
        results = {"itc_ms": itc_ms, "rerank": [{"text_encoder": name, "ms": ms, "video_tokens": shape}
                                                for name, ms, shape in reranks]}
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "results": results},
                                             indent=1))


if __name__ == "__main__":
    main()
