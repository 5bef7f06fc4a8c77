"""Use a trained model on your own videos: index a folder and search it, ask, caption, show.

    python video_tool.py index VIDEOS --index IDX --config CFG --checkpoint CKPT [--tokens]
    python video_tool.py search --index IDX "a red circle moves left" [-k 10] [--rerank 16] [--json] [--report DIR]
    python video_tool.py ask VIDEO "what moves first?" --config CFG --checkpoint QA_CKPT [--answers FILE]
    python video_tool.py caption VIDEO --config CFG --checkpoint PRETRAIN_CKPT [--sample --seed 0]
    python video_tool.py show VIDEO --out agg.png --config CFG --checkpoint CKPT [--per_block] [--gif] [--scale 4]

`index` and `search` take the config and checkpoint from the index when not given. A
mistake in the input or a failing environment (a full disk) prints one `error:` line and
exits with status 1; numbers out of range are refused before any work.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

from runtime.errors import UserError, run_cli

# (least, most) of each numeric flag; None: no bound. Beyond a --scale of 32 a 224 px frame is
# over 7,000 px wide, more memory than a picture is worth. torch seeds are 64-bit.
NUMBER_RANGES = {"k": (1, None), "rerank": (0, None), "batch_size": (1, None), "num_workers": (0, None),
                 "scale": (1, 32), "seed": (0, 2**64 - 1)}
# The model each command needs; `show` pictures the video encoder of any family.
COMMAND_TASKS = {"index": "retrieval", "search": "retrieval", "ask": "QA", "caption": "pre-training", "show": None}


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="the model's YAML config")
    parser.add_argument("--checkpoint", required=required, help="a checkpoint file (training or released)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --options num_frm_test=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="index (or update the index of) a folder of videos")
    index.add_argument("folder")
    index.add_argument("--index", required=True, help="the index folder")
    index.add_argument("--tokens", action="store_true", help="also store the ITM tokens (fast re-ranking, large)")
    index.add_argument("--batch_size", type=int, default=None)
    index.add_argument("--num_workers", type=int, default=None, help="decoding processes (default: the config's)")
    add_model_options(index, required=False)
    search = commands.add_parser("search", help="the videos of an index that best match a text")
    search.add_argument("query")
    search.add_argument("--index", required=True)
    search.add_argument("-k", type=int, default=10, help="hits to show")
    search.add_argument("--rerank", type=int, default=16, help="ITC candidates re-ranked by ITM (0: ITC only)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--report", default=None, metavar="OUT_DIR", help="also write an HTML report there")
    add_model_options(search, required=False)
    ask = commands.add_parser("ask", help="answer a question about a video (QA checkpoint)")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--answers", default=None, help="candidate answers: a JSON list or one per line")
    add_model_options(ask)
    caption = commands.add_parser("caption", help="caption a video (pre-training checkpoint)")
    caption.add_argument("video")
    caption.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    caption.add_argument("--seed", type=int, default=None, help="makes --sample repeatable")
    add_model_options(caption)
    show = commands.add_parser("show", help="picture the token aggregation of a video")
    show.add_argument("video")
    show.add_argument("--out", required=True, help="the PNG to write")
    show.add_argument("--per_block", action="store_true", help="one picture per encoder block")
    show.add_argument("--gif", action="store_true", help="also an animated GIF")
    show.add_argument("--scale", type=int, default=1, help="enlarge the frames this many times (64 px toy frames: 4)")
    add_model_options(show)
    return parser


def check_numbers(args) -> None:
    """Every numeric flag within its range (NUMBER_RANGES), before a model is loaded."""
    for name, (least, most) in NUMBER_RANGES.items():
        number = getattr(args, name, None)
        if number is None or (number >= least and (most is None or number <= most)):
            continue
        flag = f"-{name}" if len(name) == 1 else f"--{name}"
        allowed = f"at least {least}" if most is None else f"from {least} to {most}"
        raise UserError(f"{flag} must be {allowed}, got {number}")


def load_model(args, manifest: dict | None = None):
    """The model the command needs, of --config/--checkpoint, or of the index's manifest where they
    are not given; a checkpoint of another family is refused before the model is built."""
    from inference.api import VideoLanguageModel
    if manifest is None and not (args.config and args.checkpoint):
        raise UserError(f"{args.command} needs --config and --checkpoint (or an existing --index)")
    config = args.config or manifest["config"]
    checkpoint = args.checkpoint or manifest["checkpoint"]["path"]
    return VideoLanguageModel.load(config, checkpoint, args.device, args.precision, args.options,
                                   task=COMMAND_TASKS[args.command], purpose=args.command)


def run_index(args) -> None:
    from inference.index import read_manifest, update_index
    model = load_model(args, read_manifest(args.index))
    summary = update_index(model, args.folder, args.index, args.batch_size, args.num_workers, args.tokens)
    print(f"index {args.index}: {summary.kept + summary.added} videos ({summary.added} encoded, {summary.kept} "
          f"unchanged, {summary.dropped} dropped), {summary.unreadable} unreadable")
    for path, reason in summary.failed.items():
        print(f"unreadable: {path}: {reason}")


def run_search(args) -> None:
    from inference.index import VideoIndex
    index = VideoIndex.open(args.index)
    model = load_model(args, index.manifest)
    hits = [hit.as_dict() for hit in model.search(args.query, index, args.k, args.rerank)]
    if args.json:
        print(json.dumps({"query": args.query, "hits": [{"rank": n, **hit} for n, hit in enumerate(hits, 1)]},
                         indent=1))
    else:
        print(f"{'rank':>4}  {'score':>8}  {'itc':>7}  path")
        for rank, hit in enumerate(hits, 1):
            score = "-" if hit["score"] is None else f"{hit['score']:.4f}"
            print(f"{rank:>4}  {score:>8}  {hit['itc_score']:>7.4f}  {shown_path(hit['path'])}")
    if args.report:
        print(f"report: {write_search_report(model, args.report, args.query, hits)}")


def shown_path(path: str) -> str:
    """A path below the working folder relative to it (shorter to read), others as they are."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def write_search_report(model, out_dir, query: str, hits: list[dict]) -> Path:
    from inference.aggregation import render_aggregation
    from inference.report import write_report

    clip_of = functools.lru_cache(maxsize=None)(model.load_clip)  # the strip and the picture: one decode

    def picture_of(path, out_png):
        clip = clip_of(path)
        return render_aggregation(model.model.visual_encoder, clip.tensor.to(model.device), clip.frames, out_png)[0]

    return write_report(Path(out_dir), query, hits, lambda path: clip_of(path).frames, picture_of)


def read_answers(path) -> list[str]:
    text = Path(path).read_text()
    try:
        answers = json.loads(text)
    except json.JSONDecodeError:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path} must hold a non-empty JSON list of strings, or one answer per line")
    return answers


def run_ask(args) -> None:
    model = load_model(args)
    print(model.ask(args.video, args.question, read_answers(args.answers) if args.answers else None))


def run_caption(args) -> None:
    model = load_model(args)
    print(model.caption(args.video, "nucleus" if args.sample else "beam", seed=args.seed))


def run_show(args) -> None:
    from PIL import Image

    from inference.aggregation import render_aggregation
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {args.out}: not a picture file name; use a .png name")
    model = load_model(args)
    clip = model.load_clip(args.video)
    for path in render_aggregation(model.model.visual_encoder, clip.tensor.to(model.device), clip.frames,
                                   Path(args.out), per_block=args.per_block, gif=args.gif, scale=args.scale):
        print(path)


COMMANDS = {"index": run_index, "search": run_search, "ask": run_ask, "caption": run_caption, "show": run_show}


def run(args) -> None:
    check_numbers(args)
    COMMANDS[args.command](args)


def main(argv=None) -> None:
    """Run a subcommand; a user's mistake (bad file, config, checkpoint) is one line and status 1."""
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
