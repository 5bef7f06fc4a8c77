"""--precision int8 against fp32 (and bf16) on a CPU: the video encoder's speed, and how far
int8 moves the embeddings and the search results.

* speed: the video encoder alone (TimeSformer with the published frame&patch merging schedule,
  by default the real 224 px, 768-wide, 12-block one, random weights) at batch 1 on a generated
  clip, each precision timed in interleaved rounds (common.time_interleaved); int8 is the
  encoder after runtime.precision.quantize_linear_layers, exactly what the tool runs. Also the
  cosine of the mean-pooled output tokens (what ITC projects) to fp32's.
* agreement: a retrieval model loaded twice through inference.api.VideoLanguageModel (fp32 and
  int8, the tool's own path) encodes every video of a corpus; it reports the cosine of each
  video's ITC embedding to fp32's (min and mean) and, for every caption of the corpus as a
  query, the overlap of the top-10 ITC hits (|fp32 top-10 & int8 top-10| / 10, mean and min)
  and how often the top hit is the same. By default a toy corpus (data.toy.write_corpus) and a
  random toy checkpoint; `--checkpoint` (with `--config`, `--corpus`) measures a trained one,
  e.g. what `make toy` leaves. `--compare int8,bf16,fp32-batch1` also puts bf16 and fp32 at
  batch 1 (rounding alone) beside int8: token merging turns small differences into different
  merge decisions wherever two candidates are nearly tied.

`--int8_scheme` picks which linear layers int8 quantises and how (INT8_SCHEMES; default `tool`,
what --precision int8 applies), so other standard torch.ao dynamic-quantisation routes can be
measured by the same two sections: per-channel weight scales, MLP layers only, all but the
attention's qkv projections (the keys token merging compares). Both sections apply the scheme;
`tool` loads the int8 model through the tool's own path.

Targets: int8 at least 1.5x fp32's rate, embeddings at cosine >= 0.99, top-10 overlap >= 90%.

    python -m benchmarks.bench_int8 --sections agreement --compare int8,bf16,fp32-batch1 --clips 300 \\
        --config configs/toy/retrieval.yaml --checkpoint output/toy/retrieval/checkpoint_best.pth \\
        --corpus toy_data --out benchmarks/results/int8_agreement_toy.json
    python -m benchmarks.bench_int8 --sections speed --frames 8,32 --precision fp32,int8,bf16
"""
import copy
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from benchmarks.bench_data import make_long_clip
from benchmarks.bench_encoder import build_encoder
from configs.load import load_config
from data.preprocess import ClipPreprocess
from data.toy import write_corpus
from inference.api import VideoLanguageModel
from models import create_model
from models.timesformer_blocks import Mlp
from runtime.precision import inference_precision, quantize_linear_layers

TARGETS = {"speedup": 1.5, "cosine": 0.99, "top10_overlap": 0.90}
TOY_CONFIG = common.REPO_ROOT + "/configs/toy/retrieval.yaml"
TOY_TEXT = common.REPO_ROOT + "/configs/toy/bert_toy.json"
# --int8_scheme: which nn.Linear layers of the video encoder become dynamic int8, and with which
# weight scales (torch.ao's qconfig_spec dict: module types or names -> qconfig; None keeps fp32).
INT8_SCHEMES = {
    "tool": "what --precision int8 applies (runtime.precision.quantize_linear_layers)",
    "tensor": "every linear layer, one weight scale per tensor (default_dynamic_qconfig)",
    "channel": "every linear layer, one weight scale per output channel (per_channel_dynamic_qconfig)",
    "mlp": "the MLPs' fc1/fc2 only, per-tensor scales; attention and temporal_fc stay fp32",
    "channel-mlp": "the MLPs' fc1/fc2 only, per-channel scales",
    "noqkv": "every linear layer but the attention qkv projections (spatial and temporal), per-tensor",
    "channel-noqkv": "every linear layer but the attention qkv projections, per-channel scales",
}


def quantize_scheme(module: nn.Module, scheme: str) -> nn.Module:
    """`module` with its linear layers dynamically quantised, in place, as INT8_SCHEMES[scheme] says."""
    if scheme == "tool":
        return quantize_linear_layers(module)
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
    qconfig = per_channel_dynamic_qconfig if scheme.startswith("channel") else default_dynamic_qconfig
    layers = scheme.removeprefix("channel").lstrip("-")
    if layers in ("", "tensor"):  # every linear layer
        spec = {nn.Linear: qconfig}
    elif layers == "mlp":  # fc1 and fc2 inherit their Mlp's qconfig
        spec = {Mlp: qconfig}
    elif layers == "noqkv":
        spec = {nn.Linear: qconfig, **{name: None for name, child in module.named_modules()
                                       if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] == "qkv"}}
    else:
        raise ValueError(f"unknown int8 scheme {scheme!r}; expected one of {', '.join(INT8_SCHEMES)}")
    return quantize_linear_layers(module, spec)


def quantised_layers(module: nn.Module) -> tuple[int, int]:
    """(int8 linear layers, fp32 linear layers) of `module`."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    modules = list(module.modules())
    return (sum(isinstance(m, DynamicLinear) for m in modules),
            sum(type(m) is nn.Linear for m in modules))


def speed_rows(args, device) -> list[dict]:
    """Clips/s of the video encoder at every frame count and precision, interleaved."""
    size = dict(embed_dim=args.width, depth=args.depth, num_heads=args.heads, img_size=args.img_size,
                patch_size=args.patch_size)
    rows = []
    for frames in common.parse_list(args.frames, int):
        torch.manual_seed(0)
        testa_r = [1, args.patch_merge] * args.depth
        encoder = build_encoder(size, frames, True, device, testa_r=testa_r)
        quantised = quantize_scheme(copy.deepcopy(encoder), args.int8_scheme)
        layers_int8, layers_fp32 = quantised_layers(quantised)
        # A generated video clip (bench_data.make_long_clip) as the encoder sees it, not noise.
        video = clip_tensor(args, frames, device)
        forwards = {}
        for precision in common.parse_list(args.precision):
            model = quantised if precision == "int8" else encoder
            autocast = inference_precision(precision, device).autocast

            def forward(model=model, autocast=autocast):
                with torch.inference_mode(), autocast():
                    return model(video)
            forwards[precision] = forward
        outputs = {name: forward().float() for name, forward in forwards.items()}
        load_before = os.getloadavg()[0]
        timings = common.time_interleaved(forwards, device, runs=args.runs, warmup=args.warmup)
        load_after = os.getloadavg()[0]
        reference = timings["fp32"]["median_s"] if "fp32" in timings else None
        reference_cpu = timings["fp32"]["median_cpu_s"] if "fp32" in timings else None
        for name, timing in timings.items():
            cosine = F.cosine_similarity(outputs["fp32"].mean(1), outputs[name].mean(1), dim=-1).min().item() \
                if "fp32" in outputs else None
            rows.append({"section": "speed", "frames": frames, "precision": name,
                         "int8_scheme": args.int8_scheme if name == "int8" else None,
                         "int8_layers": [layers_int8, layers_fp32] if name == "int8" else None,
                         "median_s": timing["median_s"],
                         "min_s": timing["min_s"], "times_s": timing["times_s"],
                         "median_cpu_s": timing["median_cpu_s"], "clips_per_s": 1 / timing["median_s"],
                         "speedup_vs_fp32": reference / timing["median_s"] if reference else None,
                         "cpu_speedup_vs_fp32": reference_cpu / timing["median_cpu_s"] if reference_cpu else None,
                         "pooled_cosine_vs_fp32": cosine, "tokens_out": outputs[name].shape[1],
                         "load_average_1min": [round(load_before, 2), round(load_after, 2)]})
        del encoder, quantised
    return rows


def clip_tensor(args, frames: int, device) -> torch.Tensor:
    """(1, 3, frames, S, S) uint8: a 320x240 generated clip decoded and resized as evaluation does."""
    folder = Path(common.scratch_folder("bench_int8_clip_"))
    path = folder / "clip.mp4"
    make_long_clip(path, 4, 30, 320, 240, seed=0)
    config = load_config(TOY_CONFIG, [f"image_size={args.img_size}", f"num_frm_test={frames}",
                                      f"num_frames={frames}", "num_workers=0"])
    return ClipPreprocess(config)(path).unsqueeze(0).to(device)


def corpus_captions(corpus: Path, videos: list[Path]) -> dict[str, set[int]]:
    """Every distinct caption of the corpus's annotation files (ann/*.jsonl) whose video is among
    `videos`, with the positions in `videos` of the videos it describes."""
    positions = {path.stem: number for number, path in enumerate(videos)}
    captions = {}
    for annotation in sorted((corpus / "ann").glob("*.jsonl")):
        for line in annotation.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("clip_name") in positions:
                captions.setdefault(entry["caption"], set()).add(positions[entry["clip_name"]])
    return captions


def near_ties(queries: torch.Tensor, videos: torch.Tensor, k: int) -> dict:
    """How close fp32's ranking is to a tie, which is what a small change of the embeddings can
    reorder: the mean cosine between two videos, and per query (medians) the gap between the k-th
    and the next ITC score against the spread (standard deviation) of all its scores."""
    scores = queries @ videos.T
    between = videos @ videos.T
    gap = (scores.topk(k + 1, dim=1).values[:, k - 1] - scores.topk(k + 1, dim=1).values[:, k]) \
        if len(videos) > k else torch.zeros(len(queries))
    return {"fp32_video_cosine_mean": between[~torch.eye(len(videos), dtype=torch.bool)].mean().item(),
            f"fp32_gap_{k}_{k + 1}_median": gap.median().item(), "fp32_score_std_median": scores.std(dim=1).median().item()}


def recall_at(top: torch.Tensor, relevant: list[set[int]], ks=(1, 5, 10)) -> list[float]:
    """Text-to-video recall@k: the share of queries with one of their videos among the first k hits."""
    return [sum(bool(set(hits[:k].tolist()) & videos) for hits, videos in zip(top, relevant)) / len(relevant)
            for k in ks]


def agreement_rows(args, device) -> list[dict]:
    scratch = Path(common.scratch_folder("bench_int8_agreement_"))
    overrides = ["num_workers=0", *args.options]
    config_path = args.config or TOY_CONFIG
    if args.corpus:
        corpus = Path(args.corpus)
    else:
        corpus = scratch / "corpus"
        write_corpus(corpus, num_clips=args.clips, frames=16, size=64, seed=0, num_images=1)
    videos = sorted((corpus / "videos").glob("*.mp4"))[:args.clips]
    if args.checkpoint:
        checkpoint, weights = Path(args.checkpoint), "checkpoint"
    else:
        overrides.append(f"med_config={TOY_TEXT}")
        config = load_config(config_path, overrides)
        torch.manual_seed(0)
        checkpoint, weights = scratch / "random.pth", "random"
        torch.save({"model": create_model(config, "retrieval").state_dict()}, checkpoint)
    load = lambda precision: VideoLanguageModel.load(config_path, checkpoint, device, precision,  # noqa: E731
                                                     overrides, task="retrieval")

    def load_int8():
        """The tool's int8 model, or (another --int8_scheme) the fp32 one with that scheme applied."""
        if args.int8_scheme == "tool":
            return load("int8")
        model = load("fp32")
        model.model.visual_encoder = quantize_scheme(model.model.visual_encoder, args.int8_scheme)
        return model
    reference_model = load("fp32")
    reference = reference_model.encode_videos(videos, batch_size=args.batch_size)
    assert not reference.failed, reference.failed
    captions = corpus_captions(corpus, videos)
    queries = reference_model.encode_texts(list(captions))  # the text side: fp32 at every precision compared
    relevant = list(captions.values())
    candidates, int8_layers = {}, None
    for name in common.parse_list(args.compare):
        if name == "fp32-batch1":  # the floor: fp32 itself, other batch shapes round differently
            candidates[name] = reference_model.encode_videos(videos, batch_size=1)
        elif name == "int8":
            int8_model = load_int8()
            int8_layers = list(quantised_layers(int8_model.model.visual_encoder))
            candidates[name] = int8_model.encode_videos(videos, batch_size=args.batch_size)
            del int8_model
        else:
            candidates[name] = load(name).encode_videos(videos, batch_size=args.batch_size)
    k = min(10, len(videos))
    top_reference = (queries @ reference.embeddings.T).topk(k, dim=1).indices
    ties = near_ties(queries, reference.embeddings, k)
    rows = []
    for name, encoding in candidates.items():
        assert encoding.paths == reference.paths
        cosines = F.cosine_similarity(reference.embeddings, encoding.embeddings, dim=-1)
        top = (queries @ encoding.embeddings.T).topk(k, dim=1).indices
        overlaps = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_reference, top)]
        rows.append({"section": "agreement", "precision": name,
                     "int8_scheme": args.int8_scheme if name == "int8" else None,
                     "int8_layers": int8_layers if name == "int8" else None,
                     "config": os.path.relpath(config_path, common.REPO_ROOT),
                     "checkpoint": str(checkpoint), "weights": weights, "options": args.options,
                     "videos": len(videos), "queries": len(captions), "k": k,
                     "cosine_min": cosines.min().item(), "cosine_mean": cosines.mean().item(),
                     "top10_overlap_mean": statistics.mean(overlaps), "top10_overlap_min": min(overlaps),
                     "same_top1": sum(int(a[0] == b[0]) for a, b in zip(top_reference, top)) / len(captions),
                     # what the search is for: the captions' own videos found, at this precision and at fp32
                     "recall_1_5_10": recall_at(top, relevant), "recall_1_5_10_fp32": recall_at(top_reference, relevant),
                     **ties,
                     "config_values": {key: reference_model.config.get(key) for key in
                                       ("image_size", "vision_width", "depth", "num_frm_test", "token_merging",
                                        "testa_r")}})
    return rows


def checks(rows: list[dict]) -> list[dict]:
    found = []
    for row in rows:
        if row["section"] == "speed" and row["precision"] == "int8":
            found.append({"target": f"int8 {row['frames']}f speed >= {TARGETS['speedup']}x fp32",
                          "value": row["speedup_vs_fp32"], "met": row["speedup_vs_fp32"] >= TARGETS["speedup"]})
        if row["section"] == "agreement" and row["precision"] == "int8":
            found.append({"target": f"int8 ITC embedding cosine >= {TARGETS['cosine']} ({row['weights']} weights)",
                          "value": row["cosine_min"], "met": row["cosine_min"] >= TARGETS["cosine"]})
            found.append({"target": f"int8 top-10 overlap >= {TARGETS['top10_overlap']:.0%} ({row['weights']} "
                                    "weights, mean over queries)",
                          "value": row["top10_overlap_mean"],
                          "met": row["top10_overlap_mean"] >= TARGETS["top10_overlap"]})
    return found


def main():
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="speed,agreement", help="speed, agreement (comma separated)")
    parser.add_argument("--frames", default="8", help="frames per clip for the speed section, comma separated")
    parser.add_argument("--precision", default="fp32,int8", help="precisions timed: fp32 first, then int8, bf16")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--patch_merge", type=int, default=12, help="patch tokens merged per block (frame&patch)")
    parser.add_argument("--config", default=None, help="agreement: the retrieval config (default: the toy one)")
    parser.add_argument("--checkpoint", default=None, help="agreement: a retrieval checkpoint (default: random)")
    parser.add_argument("--corpus", default=None,
                        help="agreement: a toy corpus folder (videos/, ann/*.jsonl; default: a generated one)")
    parser.add_argument("--clips", type=int, default=64, help="agreement: videos encoded (at most)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--compare", default="int8",
                        help="agreement: what is compared with fp32, comma separated: int8, bf16, fp32-batch1 (fp32 "
                             "at batch 1: the floor set by rounding alone)")
    parser.add_argument("--int8_scheme", default="tool", choices=list(INT8_SCHEMES),
                        help="which linear layers int8 quantises, and how: "
                             + "; ".join(f"{name}: {text}" for name, text in INT8_SCHEMES.items()))
    parser.add_argument("--options", nargs="*", default=[], help="agreement: config overrides KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 makes CPU time a fair measure on a shared machine")
    parser.set_defaults(device="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type != "cpu":
        parser.error("int8 runs on the CPU only: --device cpu")
    sections = common.parse_list(args.sections)
    rows = []
    if "speed" in sections:
        rows += speed_rows(args, device)
        common.print_table([row for row in rows if row["section"] == "speed"],
                           ["frames", "precision", "int8_scheme", "median_s", "median_cpu_s", "clips_per_s",
                            "speedup_vs_fp32", "cpu_speedup_vs_fp32", "pooled_cosine_vs_fp32", "tokens_out"],
                           title=f"video encoder, {args.img_size} px, width {args.width}, depth {args.depth}, "
                                 "batch 1, random weights")
    if "agreement" in sections:
        rows += agreement_rows(args, device)
        common.print_table([row for row in rows if row["section"] == "agreement"],
                           ["precision", "int8_scheme", "weights", "videos", "queries", "cosine_min", "cosine_mean",
                            "top10_overlap_mean", "top10_overlap_min", "same_top1", "recall_1_5_10",
                            "recall_1_5_10_fp32"], title="against fp32: ITC embeddings and top-10 hits")
    found = checks(rows)
    for check in found:
        print(f"{'met' if check['met'] else 'MISSED'}: {check['target']}: {check['value']:.4g}")
    machine = common.machine_info(device)
    auto = inference_precision("auto", device)
    machine.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), auto_choice=f"{auto.name} ({auto.reason})",
                   isa_env={key: os.environ[key] for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                             "FBGEMM_ENABLE_INSTRUCTIONS", "MKL_ENABLE_INSTRUCTIONS")
                            if key in os.environ})
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
          f"capability {machine['cpu_capability']} {machine['isa_env'] or ''}; auto -> {machine['auto_choice']}")
    common.write_json(args.out, {"machine": machine, "settings": vars(args), "rows": rows, "checks": found})


if __name__ == "__main__":
    main()
