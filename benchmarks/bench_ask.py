"""Index once, ask many: the latency of `ask` on a video from its file (decode, encode, answer)
against from the tokens an index stored with `--tokens` (read, answer; inference/stored.py).

The QA model is configs/vqa_activitynet.yaml's (TESTA-base: 224 px, 12 blocks, 32 frames, BERT-base
question encoder and answer decoder) with random weights; the index is made by a retrieval model
with the same video encoder weights (copied in), as stored tokens require. Videos are 10 s, 30 fps,
320x240 generated clips (bench_data.make_long_clip). Each (video, mode) is asked from the file
and from the index in interleaved rounds; `generate` decodes an answer by beam search, `rank`
scores an answer list. It also checks that both ways give the same answer.

    python -m benchmarks.bench_ask --out benchmarks/results/ask_cpu.json
    python -m benchmarks.bench_ask --size toy --frames 8 --depth 2 --runs 1   # a quick trial
"""
import statistics
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_data import make_long_clip
from configs.load import load_config
from inference.api import VideoLanguageModel
from inference.index import VideoIndex, update_index
from inference.stored import stored_tokens
from models import create_model

# (QA config, retrieval config, BERT config of the QA model) of each --size; the retrieval model's
# text side is unused (it only indexes): the toy BERT keeps its checkpoint small.
SIZES = {"base": ("configs/vqa_activitynet.yaml", "configs/retrieval_didemo_f32.yaml", "configs/med_config.json"),
         "toy": ("configs/toy/qa.yaml", "configs/toy/retrieval.yaml", "configs/toy/bert_toy.json")}
TOY_TEXT = common.REPO_ROOT + "/configs/toy/bert_toy.json"
ANSWERS = ["yes", "no", "red", "blue", "green", "left", "right", "up", "down", "a circle", "a square", "two",
           "three", "in a room", "outdoors", "running", "walking", "a man", "a woman", "nothing"]
QUESTION = "what moves across the video?"


def models(folder: Path, args):
    """The QA model and a retrieval model sharing its video encoder weights, both loaded as the tool loads them."""
    qa_config, retrieval_config, text = (common.REPO_ROOT + "/" + path for path in SIZES[args.size])
    merged = 12 if args.size == "base" else 2  # patches merged per block: the published schedule, the toy one
    encoder = [f"num_frames={args.frames}", f"num_frm_test={args.frames}", f"depth={args.depth}",
               f"testa_r={[1, merged] * args.depth}", "num_workers=0", "video_root=", "ann_root="]
    qa_overrides = [*encoder, f"med_config={text}", "k_test=8"]
    retrieval_overrides = [*encoder, f"med_config={TOY_TEXT}"]
    torch.manual_seed(0)
    qa = create_model(load_config(qa_config, qa_overrides), "qa").state_dict()
    retrieval = create_model(load_config(retrieval_config, retrieval_overrides), "retrieval").state_dict()
    retrieval.update({key: tensor for key, tensor in qa.items() if key.startswith("visual_encoder.")})
    torch.save({"model": qa}, folder / "qa.pth")
    torch.save({"model": retrieval}, folder / "retrieval.pth")
    del qa, retrieval
    load = lambda config, name, overrides: VideoLanguageModel.load(  # noqa: E731
        config, folder / name, args.device, args.precision, overrides)
    return load(qa_config, "qa.pth", qa_overrides), load(retrieval_config, "retrieval.pth", retrieval_overrides)


def main():
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--depth", type=int, default=12, help="video encoder blocks (default: the real 12)")
    parser.add_argument("--size", default="base", choices=sorted(SIZES),
                        help="base: TESTA-base (224 px, BERT-base); toy: configs/toy (64 px), for a quick trial")
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--modes", default="generate,rank")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.set_defaults(device="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = Path(common.scratch_folder("bench_ask_"))
    videos = folder / "videos"
    videos.mkdir()
    for seed in range(args.videos):
        make_long_clip(videos / f"video{seed}.mp4", 10, 30, 320, 240, seed)
    qa, retrieval = models(folder, args)
    update_index(retrieval, videos, folder / "index", num_workers=0, with_tokens=True)
    del retrieval
    index = VideoIndex.open(folder / "index")

    def from_file(path, answers):
        return lambda: qa.ask(path, QUESTION, answers)

    def from_index(path, answers):
        def ask():
            found = stored_tokens(qa, VideoIndex.open(index.folder), path)  # opened per call, as the tool does
            assert found.tokens is not None, found.note
            return qa.ask(path, QUESTION, answers, tokens=found.tokens)
        return ask

    rows = []
    for mode in common.parse_list(args.modes):
        answers = ANSWERS if mode == "rank" else None
        functions = {}
        for path in sorted(videos.glob("*.mp4")):
            functions[(path.name, "file")] = from_file(path, answers)
            functions[(path.name, "index")] = from_index(path, answers)
        same = all(functions[(name, "file")]() == functions[(name, "index")]() for name, way in functions
                   if way == "file")
        timings = common.time_interleaved(functions, device, runs=args.runs, warmup=args.warmup)
        for way in ("file", "index"):
            seconds = [timing["median_s"] for (name, kind), timing in timings.items() if kind == way]
            cpu = [timing["median_cpu_s"] for (name, kind), timing in timings.items() if kind == way]
            rows.append({"mode": mode, "from": way, "median_s": statistics.median(seconds),
                         "median_cpu_s": statistics.median(cpu), "same_answers": same})
        file_row, index_row = rows[-2], rows[-1]
        index_row["speedup_vs_file"] = file_row["median_s"] / index_row["median_s"]
        index_row["cpu_speedup_vs_file"] = file_row["median_cpu_s"] / index_row["median_cpu_s"]
    common.print_table(rows, ["mode", "from", "median_s", "median_cpu_s", "speedup_vs_file", "cpu_speedup_vs_file",
                              "same_answers"],
                       title=f"ask, {args.size} model, {args.frames} frames, depth {args.depth}, {args.precision}, "
                             f"{args.videos} videos, median of {args.runs} rounds")
    machine = common.machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads")
    common.write_json(args.out, {"machine": machine, "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
