"""Use a trained model on your own videos: index a folder and search it, ask, caption, show.

    python video_tool.py index VIDEOS --index IDX --config CFG --checkpoint CKPT [--tokens] [--embedding_dtype float16]
    python video_tool.py search --index IDX "a red circle moves left" [-k 10] [--rerank 16] [--json] [--report DIR]
        [--approximate]
    python video_tool.py ask VIDEO "what moves first?" --config CFG --checkpoint QA_CKPT [--answers FILE] [--index IDX]
    python video_tool.py caption VIDEO --config CFG --checkpoint PRETRAIN_CKPT [--sample --seed 0] [--index IDX]
    python video_tool.py show VIDEO --out agg.png --config CFG --checkpoint CKPT [--per_block] [--gif] [--scale 4]
        [--rule NAME] [--budget FRACTION]
    ask, caption and show also take [--start SECONDS] [--end SECONDS]: that span of the video only.

`index --window SECONDS [--stride SECONDS]` indexes files longer than the window as windows
(stride: half the window by default), each a search hit with its start and end; without
--window a new index holds one embedding per file, and an update keeps the index's windows.

`index` and `search` take the config and checkpoint from the index when not given. A
mistake in the input or a failing environment (a full disk) prints one `error:` line and
exits with status 1; numbers out of range, missing files and an unusable --report folder are
refused before any model is loaded. Ctrl-C prints one `error: interrupted ...` line and exits
with status 130. Only a command's result goes to stdout (the table, the JSON, the answer, the
caption, the pictures' paths, the index's summary); everything else (progress, warnings, what
loading prints, the report's path) goes to stderr, so `search --json` prints JSON alone.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

from configs.keys import MERGE_RULES
from runtime.errors import Interrupted, UserError, check_exists, run_cli

# (least, most) of each numeric flag; None: no bound. Beyond a --scale of 32 a 224 px frame is
# over 7,000 px wide, more memory than a picture is worth. torch seeds are 64-bit.
NUMBER_RANGES = {"k": (1, None), "rerank": (0, None), "batch_size": (1, None), "num_workers": (0, None),
                 "scale": (1, 32), "seed": (0, 2**64 - 1), "budget": (0, 1), "window": (0.1, None),
                 "stride": (0.1, None), "start": (0, None), "end": (0, None)}
# runtime.precision.INFERENCE_PRECISIONS (not imported here: it imports torch, which --help does not need).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# The model each command needs; `show` pictures the video encoder of any family.
COMMAND_TASKS = {"index": "retrieval", "search": "retrieval", "ask": "QA", "caption": "pre-training", "show": None}


STORED_TOKENS_HELP = ("an index made with --tokens that holds VIDEO: its stored tokens are used instead of decoding "
                      "the file, where the same video encoder made them (else the file is decoded; stderr says which)")


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="the model's YAML config")
    parser.add_argument("--checkpoint", required=required, help="a checkpoint file (training or released)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto (default) says what it picks on stderr; int8: the video encoder quantised, CPU only")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --options num_frm_test=16")


def add_span_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", type=float, default=None, metavar="SECONDS",
                        help="use the video from here on (default: its beginning), read as a clip of its own")
    parser.add_argument("--end", type=float, default=None, metavar="SECONDS",
                        help="use the video up to here (default: its end)")


def span_of(args) -> tuple | None:
    """(start, end) seconds of --start/--end (None: the video's beginning, its end), None for the whole video."""
    if args.start is None and args.end is None:
        return None
    return args.start, args.end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="index (or update the index of) a folder of videos")
    index.add_argument("folder")
    index.add_argument("--index", required=True, help="the index folder")
    index.add_argument("--tokens", action="store_true", help="also store the ITM tokens (fast re-ranking, large)")
    index.add_argument("--embedding_dtype", choices=("float32", "float16"), default=None,
                       help="how the ITC embeddings are stored (default: the index's, float32 for a new one); "
                            "float16 halves their size and search time, rounding the ITC scores")
    index.add_argument("--batch_size", type=int, default=None)
    index.add_argument("--num_workers", type=int, default=None, help="decoding processes (default: the config's)")
    index.add_argument("--window", type=float, default=None, metavar="SECONDS",
                       help="index files longer than this as windows of this many seconds, each its own search hit "
                            "with its time range (default: the index's; none for a new one: one embedding per file)")
    index.add_argument("--stride", type=float, default=None, metavar="SECONDS",
                       help="seconds between the starts of windows (default: half the window)")
    add_model_options(index, required=False)
    search = commands.add_parser("search", help="the videos of an index that best match a text")
    search.add_argument("query")
    search.add_argument("--index", required=True)
    search.add_argument("-k", type=int, default=10, help="hits to show")
    search.add_argument("--rerank", type=int, default=16, help="ITC candidates re-ranked by ITM (0: ITC only)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--report", default=None, metavar="OUT_DIR", help="also write an HTML report there")
    search.add_argument("--approximate", action="store_true",
                        help="faiss inverted-file search instead of exact search, for millions of videos (needs "
                             "pip install faiss-cpu; built on first use and kept in the index folder)")
    add_model_options(search, required=False)
    ask = commands.add_parser("ask", help="answer a question about a video (QA checkpoint)")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--answers", default=None, help="candidate answers: a JSON list or one per line")
    ask.add_argument("--index", default=None, help=STORED_TOKENS_HELP)
    add_span_options(ask)
    add_model_options(ask)
    caption = commands.add_parser("caption", help="caption a video (pre-training checkpoint)")
    caption.add_argument("video")
    caption.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    caption.add_argument("--seed", type=int, default=None, help="makes --sample repeatable")
    caption.add_argument("--index", default=None, help=STORED_TOKENS_HELP)
    add_span_options(caption)
    add_model_options(caption)
    show = commands.add_parser("show", help="picture the token aggregation of a video")
    show.add_argument("video")
    show.add_argument("--out", required=True, help="the PNG to write")
    show.add_argument("--per_block", action="store_true", help="one picture per encoder block")
    show.add_argument("--gif", action="store_true", help="also an animated GIF")
    show.add_argument("--scale", type=int, default=1, help="enlarge the frames this many times (64 px toy frames: 4)")
    show.add_argument("--rule", default=None, metavar="NAME",
                      help=f"the token-reduction rule (config key merge_rule): {', '.join(MERGE_RULES)} "
                           "(default: the config's)")
    show.add_argument("--budget", type=float, default=None, metavar="FRACTION",
                      help="the encoder's GMACs as a fraction of the unmerged encoder's, in (0, 1] (config key "
                           "merge_budget; default: the config's)")
    add_span_options(show)
    add_model_options(show)
    return parser


def check_numbers(args) -> None:
    """Every numeric flag within its range (NUMBER_RANGES), and --end after --start, before a model is loaded."""
    for name, (least, most) in NUMBER_RANGES.items():
        number = getattr(args, name, None)
        if number is None or (number >= least and (most is None or number <= most)):
            continue
        flag = f"-{name}" if len(name) == 1 else f"--{name}"
        allowed = f"at least {least}" if most is None else f"from {least} to {most}"
        raise UserError(f"{flag} must be {allowed}, got {number}")
    start, end = getattr(args, "start", None), getattr(args, "end", None)
    if start is not None and end is not None and end <= start:  # the video's duration is checked as it is read
        raise UserError(f"--end {end:g} must be after --start {start:g}")


def load_model(args, manifest: dict | None = None):
    """The model the command needs, of --config/--checkpoint, or of the index's manifest where they
    are not given; a checkpoint of another family is refused before the model is built."""
    from inference.api import VideoLanguageModel
    if manifest is None and not (args.config and args.checkpoint):
        raise UserError(f"{args.command} needs --config and --checkpoint (or an existing --index)")
    config = args.config or manifest["config"]
    checkpoint = args.checkpoint or manifest["checkpoint"]["path"]
    precision = args.precision
    if manifest is not None:  # index, search: 'auto' takes the index's precision where it can
        from runtime.distributed import choose_device
        from runtime.precision import precision_for_index
        precision, reason = precision_for_index(args.precision, manifest.get("precision"), choose_device(args.device),
                                                args.index, updating=args.command == "index")
        if reason:
            print(f"precision: auto -> {precision} ({reason})", file=sys.stderr, flush=True)
    return VideoLanguageModel.load(config, checkpoint, args.device, precision, args.options,
                                   task=COMMAND_TASKS[args.command], purpose=args.command)


def stored_tokens(model, args, span: tuple | None = None):
    """The video's tokens (of seconds `span` of it) from `--index` where they stand for this model's
    (inference/stored.py), else None: the file is decoded. Says which on stderr."""
    if not args.index:
        return None
    from inference.index import VideoIndex
    from inference.stored import stored_tokens as lookup
    found = lookup(model, VideoIndex.open(args.index), args.video, span)
    print(found.note, file=sys.stderr, flush=True)
    return found.tokens


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_index(args, out) -> None:
    from inference.index import VIDEO_SUFFIXES, read_manifest
    from inference.index_processes import join_processes, launched_on_processes, update_index_on_processes
    check_exists(args.folder, "folder")
    try:
        if launched_on_processes():  # under torchrun: the processes share the encoding, rank 0 commits
            args.device = str(join_processes(args.device))
        model = load_model(args, read_manifest(args.index))
        # in parts, on one process too: an interrupted run keeps what it encoded, and the same command resumes
        summary = update_index_on_processes(model, args.folder, args.index, args.batch_size, args.num_workers,
                                            args.tokens, args.embedding_dtype, window=args.window, stride=args.stride)
    except Interrupted:  # update_index says what the index folder holds
        raise
    except KeyboardInterrupt:  # before update_index began its work: loading, importing
        raise Interrupted(f"interrupted: index {args.index} not updated (nothing of this run was committed)") \
            from None
    videos = summary.kept + summary.added
    print(f"index {args.index}: {videos} videos ({summary.added} encoded, {summary.kept} "
          f"unchanged, {summary.dropped} dropped), {summary.unreadable} unreadable"
          + ("" if summary.windows is None else f"; {summary.windows} windows"), file=out)
    for path, reason in summary.failed.items():
        print(f"unreadable: {path}: {reason}", file=out)
    if videos + summary.unreadable == 0:  # every file found is kept, encoded or unreadable: none was found
        warn(f"no videos in {args.folder} (looked for {', '.join(VIDEO_SUFFIXES)} files, in any case, in it and its "
             f"subfolders); the index {args.index} holds none")


def run_search(args, out) -> None:
    from inference.index import VideoIndex
    from inference.report import check_replaceable
    if args.report:
        check_replaceable(args.report)  # before the search: an unusable folder is known at once
    index = VideoIndex.open(args.index)
    if args.approximate:
        from inference.search import import_faiss
        import_faiss()  # an optional package: its absence is one line, before the model is loaded
    model = load_model(args, index.manifest)
    hits = [hit.as_dict() for hit in model.search(args.query, index, args.k, args.rerank, args.approximate)]
    if args.json:
        print(json.dumps({"query": args.query, "hits": [{"rank": n, **hit} for n, hit in enumerate(hits, 1)]},
                         indent=1), file=out)
    else:
        print_hits(hits, index.windowed, out)
    out.flush()
    if args.report:
        print(f"report: {write_search_report(model, args.report, args.query, hits)}", file=sys.stderr)


def print_hits(hits: list[dict], windowed: bool, out) -> None:
    """The hits as a table; an index with windows adds each moment's start and end seconds (a file
    no longer than a window: 0 to its duration)."""
    span_header = f"{'start':>8}  {'end':>8}  " if windowed else ""
    print(f"{'rank':>4}  {'score':>8}  {'itc':>7}  {span_header}path", file=out)
    for rank, hit in enumerate(hits, 1):
        score = "-" if hit["score"] is None else f"{hit['score']:.4f}"
        span = f"{hit['start']:>8.2f}  {hit['end']:>8.2f}  " if windowed else ""
        print(f"{rank:>4}  {score:>8}  {hit['itc_score']:>7.4f}  {span}{shown_path(hit['path'])}", file=out)


def shown_path(path: str) -> str:
    """A path below the working folder relative to it (shorter to read), others as they are."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def write_search_report(model, out_dir, query: str, hits: list[dict]) -> Path:
    from inference.aggregation import render_aggregation
    from inference.report import write_report

    clip_of = functools.lru_cache(maxsize=None)(model.load_clip)  # the strip and the picture: one decode

    def picture_of(path, out_png, span=None):
        clip = clip_of(path, span)
        return render_aggregation(model.model.visual_encoder, clip.tensor.to(model.device), clip.frames, out_png)[0]

    return write_report(Path(out_dir), query, hits, lambda path, span=None: clip_of(path, span).frames, picture_of)


def read_answers(path) -> list[str]:
    text = Path(path).read_text()
    try:
        answers = json.loads(text)
    except json.JSONDecodeError:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path} must hold a non-empty JSON list of strings, or one answer per line")
    return answers


def run_ask(args, out) -> None:
    check_exists(args.video, "video")
    answers = read_answers(args.answers) if args.answers else None
    span = span_of(args)
    model = load_model(args)
    print(model.ask(args.video, args.question, answers, tokens=stored_tokens(model, args, span), span=span), file=out)


def run_caption(args, out) -> None:
    check_exists(args.video, "video")
    span = span_of(args)
    model = load_model(args)
    print(model.caption(args.video, "nucleus" if args.sample else "beam", seed=args.seed,
                        tokens=stored_tokens(model, args, span), span=span), file=out)


def run_show(args, out) -> None:
    from PIL import Image

    from inference.aggregation import render_aggregation
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {args.out}: not a picture file name; use a .png name")
    check_exists(args.video, "video")
    # --rule and --budget stand for config overrides, after --options so that they win.
    args.options = [*args.options, *(f"{key}={setting}" for key, setting in
                                     (("merge_rule", args.rule), ("merge_budget", args.budget)) if setting is not None)]
    span = span_of(args)
    model = load_model(args)
    clip = model.load_clip(args.video, span)
    encoder = model.model.visual_encoder
    if not encoder.budgeted:  # with a budget, building the encoder said its plan
        _, _, frames, height, width = clip.tensor.shape
        patch = encoder.patch_embed.proj.kernel_size[0]
        print(f"merge plan: {encoder.merge_plan(frames, (height // patch) * (width // patch)).describe()}",
              file=sys.stderr, flush=True)
    for path in render_aggregation(encoder, clip.tensor.to(model.device), clip.frames,
                                   Path(args.out), per_block=args.per_block, gif=args.gif, scale=args.scale):
        print(path, file=out)


COMMANDS = {"index": run_index, "search": run_search, "ask": run_ask, "caption": run_caption, "show": run_show}


def run(args) -> None:
    """The command, its result printed to stdout (`out`) and everything else to stderr: print()
    anywhere below (progress lines, warnings, the libraries' own) writes to stderr, as Unix tools
    keep their messages out of the output that scripts read."""
    from runtime.interrupts import interrupts_not_swallowed
    check_numbers(args)
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), interrupts_not_swallowed():
        COMMANDS[args.command](args, out)


def main(argv=None) -> None:
    """Run a subcommand; a user's mistake (bad file, config, checkpoint) is one line and status 1."""
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
