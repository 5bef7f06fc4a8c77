"""The accuracy-cost frontier of the token-reduction rules: one checkpoint evaluated under every
(rule, budget) cell, in one command.

    python -m evaluation.sweep --config C --checkpoint P --rules testa,tome,pool --budgets 1,0.5,0.25 \
        --output_dir D [key=value ...]

Each cell builds the model of the config's task (its `dataset` names it) with the overrides
`merge_rule=RULE merge_budget=BUDGET` after the command line's own, loads the checkpoint (read
once for every cell) and evaluates the test split as the training scripts' `--evaluate` does:
the same loaders, evaluate_retrieval or evaluate_qa, at the config's mixed_precision_method.
What it writes in D (rank 0 only):

- cells/RULE_BUDGET.json: one finished cell and the settings it was measured under, written
  atomically as the cell ends. A rerun skips the cells kept there; a kept cell measured under
  other settings (the evaluation protocol, the checkpoint's contents, the precision, the
  device) stops the sweep in one line instead of mixing two models' numbers.
- sweep.csv and sweep.json: every cell, sorted by rule, then budget from the largest (CSV_COLUMNS,
  then the metrics: retrieval_metrics' keys, or qa_accuracy's).
- frontier.png: accuracy (mean recall, or QA accuracy) against counted GMACs, a line per rule,
  Pareto-optimal cells circled in black.

The cost columns come from the encoder's merge plan for a test clip (num_frm_test frames,
(image_size / patch_size)^2 patches). seconds_per_clip times the video encoder's forwards during
the evaluation (after one untimed forward per cell: first-call costs), synchronised on CUDA;
peak memory is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs) on a Linux CPU, where freed tensors are handed back to the OS
(a fixed malloc mmap threshold) so that each cell's peak is its own; peak_memory_kind says which.
Under torchrun every rank runs every cell, the evaluation sharding the clips as `--evaluate`
does; the timing sums every rank's encoder time and clips, the memory is the largest rank's.

A budget a rule cannot reach is found before any weights or data are read (the plan of every
cell is computed on an encoder built on the meta device): the cell is recorded as skipped with
the reason, and the others run; a sweep in which no cell can run is refused. An unknown rule, a
budget outside (0, 1] and a missing checkpoint are refused in one line before anything is built.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import itertools
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from configs.keys import ConfigError, check, check_values, task_of, value
from configs.load import apply_overrides, load_config
from data.loader import create_split_loaders
from evaluation import evaluation_protocol
from evaluation.qa import evaluate_qa, qa_protocol
from evaluation.retrieval import RetrievalSettings, evaluate_retrieval, withholds_test_labels
from models import create_model
from models.checkpoint import read_checkpoint
from models.rules import RULES
from models.timesformer import build_video_encoder
from runtime.distributed import gather_objects, get_rank, get_world_size, init_distributed, is_main_process
from runtime.errors import UserError, check_exists, run_cli
from runtime.machine import device_name, peak_memory_kind, peak_memory_mib, reset_peak_memory, return_freed_memory_to_os
from runtime.precision import make_precision
from runtime.progress import ProgressLine
from runtime.run_lock import acquire_run_lock, release_run_lock
from utils import atomic_write_bytes, file_sha256

DEFAULT_RULES = "testa,tome,vid_tldr,pitome,adjacent,pool,random"
DEFAULT_BUDGETS = "1,0.5,0.35,0.25,0.15"
# What each task's frontier plots, and its axis label.
ACCURACY = {"retrieval": ("r_mean", "mean recall, R@1/5/10 both directions (%)"), "qa": ("accuracy", "accuracy (%)")}
# The columns of sweep.csv before the metrics (a skipped cell leaves the measured ones empty).
CSV_COLUMNS = ("rule", "budget", "status", "gmacs", "unmerged_gmacs", "cost_fraction", "token_fraction", "tokens_out",
               "schedule", "seconds_per_clip", "clips_timed", "device", "peak_memory_mib", "peak_memory_kind",
               "reason")


# -- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    add = parser.add_argument
    add("--config", required=True, help="the model's YAML config (retrieval or video QA)")
    add("--checkpoint", required=True, help="the weights to evaluate in every cell")
    add("--rules", default=DEFAULT_RULES, help=f"comma-separated rule names (default: {DEFAULT_RULES})")
    add("--budgets", default=DEFAULT_BUDGETS,
        help=f"comma-separated merge_budget values in (0, 1]: the encoder's GMACs as a fraction of the unmerged "
             f"encoder's (default: {DEFAULT_BUDGETS})")
    add("--output_dir", required=True, help="folder for cells/, sweep.csv, sweep.json and frontier.png (created)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: %(default)s); under torchrun each process uses cuda:LOCAL_RANK")
    add("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied to every cell")
    return parser


def parse_rules(text: str) -> list[str]:
    """The rule names of --rules, in order, each once; an unknown one is refused naming the known."""
    rules = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not rules:
        raise UserError("--rules names no rule")
    unknown = [name for name in rules if name not in RULES]
    if unknown:
        raise UserError(f"--rules: unknown rule {unknown[0]!r}; the rules are {', '.join(RULES)}")
    return rules


def parse_budgets(text: str) -> list[float]:
    """The budgets of --budgets, each once, as floats in (0, 1]."""
    budgets = []
    for item in (item.strip() for item in text.split(",") if item.strip()):
        try:
            budget = float(item)
        except ValueError:
            raise UserError(f"--budgets: {item!r} is not a number") from None
        if not 0 < budget <= 1:
            raise UserError(f"--budgets: {item} is outside (0, 1]: a budget is a fraction of the unmerged "
                            "encoder's GMACs, 1 merging nothing")
        budgets.append(budget)
    if not budgets:
        raise UserError("--budgets names no budget")
    return list(dict.fromkeys(budgets))


# -- pure parts: the cells, the front, the table ------------------------------------------------
def cell_name(rule: str, budget: float) -> str:
    return f"{rule}_{budget:g}"


def sort_cells(cells: list[dict]) -> list[dict]:
    """By rule, then budget from the largest (the unmerged end of each rule's line first)."""
    return sorted(cells, key=lambda cell: (cell["rule"], -cell["budget"]))


def pareto_optimal(points: list[tuple[float, float]]) -> list[bool]:
    """For each (cost, accuracy) point, whether no other point is at least as cheap and at least
    as accurate while better in one of the two. Equal points are optimal together."""
    return [not any(cost_b <= cost and accuracy_b >= accuracy and (cost_b, accuracy_b) != (cost, accuracy)
                    for cost_b, accuracy_b in points)
            for cost, accuracy in points]


def csv_table(cells: list[dict]) -> tuple[list[str], list[dict]]:
    """sweep.csv's columns (CSV_COLUMNS, then every metric in the order first met) and rows;
    the schedule as JSON text."""
    metrics = list(dict.fromkeys(name for cell in cells for name in cell.get("metrics", {})))
    rows = [{**{column: cell.get(column) for column in CSV_COLUMNS}, **cell.get("metrics", {}),
             "schedule": None if cell.get("schedule") is None else json.dumps(cell["schedule"])}
            for cell in cells]
    return [*CSV_COLUMNS, *metrics], rows


def settings_differences(kept: dict, now: dict, prefix: str = "") -> list[str]:
    """'name: kept -> now' for each setting that differs (nested settings by dotted name)."""
    differences = []
    for name in sorted(kept.keys() | now.keys()):
        before, after = kept.get(name), now.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += settings_differences(before, after, f"{prefix}{name}.")
        elif before != after:
            differences.append(f"{prefix}{name}: {before!r} -> {after!r}")
    return differences


# -- files --------------------------------------------------------------------------------------
def kept_cells(cells_dir: Path, settings_of: dict[str, dict]) -> dict[str, dict]:
    """The finished cells of this sweep kept in `cells_dir` (by cell name); one measured under
    other settings than `settings_of[name]` stops the sweep, naming the differences."""
    kept = {}
    for name, settings in settings_of.items():
        path = cells_dir / f"{name}.json"
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is not a sweep cell (damaged JSON): delete it to measure the cell again") from None
        differences = settings_differences(stored.get("settings", {}), settings)
        if differences:
            raise UserError(f"{path} was measured under other settings ({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}): use another --output_dir, or delete "
                            f"{cells_dir} to measure every cell again")
        kept[name] = stored["cell"]
    return kept


def write_tables(output_dir: Path, cells: list[dict], header: dict) -> None:
    """sweep.csv and sweep.json (every cell, sorted), atomically."""
    columns, rows = csv_table(cells)
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(output_dir / "sweep.csv", text.getvalue().encode())
    atomic_write_bytes(output_dir / "sweep.json", (json.dumps({**header, "cells": cells}, indent=1) + "\n").encode())


def draw_frontier(cells: list[dict], metric: str, metric_label: str, title: str, path: Path) -> None:
    """Accuracy against counted GMACs, one line per rule, the Pareto-optimal cells circled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [cell for cell in cells if cell["status"] == "done"]
    figure, axes = plt.subplots(figsize=(8, 5))
    for rule, marker in zip(sorted({cell["rule"] for cell in done}), itertools.cycle("osD^v<>ph*")):
        line = sorted((cell["gmacs"], cell["metrics"][metric]) for cell in done if cell["rule"] == rule)
        axes.plot(*zip(*line), marker=marker, markersize=5, label=rule)  # markers tell overlapping lines apart
    points = [(cell["gmacs"], cell["metrics"][metric]) for cell in done]
    front = [point for point, optimal in zip(points, pareto_optimal(points)) if optimal]
    if front:
        axes.scatter(*zip(*front), s=160, facecolors="none", edgecolors="black", linewidths=1.6, zorder=3,
                     label="Pareto-optimal")
    axes.set_xlabel("video encoder cost per clip (counted GMACs)")
    axes.set_ylabel(metric_label)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


# -- measuring ----------------------------------------------------------------------------------
class EncoderClock:
    """Wall time of the video encoder's forwards and the clips they encoded, by forward hooks
    (synchronised on CUDA), while the block runs."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        self.encoder, self.device = encoder, device
        self.seconds, self.clips, self._started = 0.0, 0, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, module, inputs) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, module, inputs, output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.clips += inputs[0].shape[0]

    def __enter__(self) -> EncoderClock:
        self._handles = [self.encoder.register_forward_pre_hook(self._start),
                         self.encoder.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


# -- the tasks ----------------------------------------------------------------------------------
@dataclass
class Task:
    """How a cell's model is evaluated (`evaluate(model) -> metrics`) and what else its protocol records."""
    name: str
    evaluate: Callable[[torch.nn.Module], dict]
    protocol_extra: dict


def retrieval_task(config: dict, dataset, loader, device: torch.device, autocast) -> Task:
    """train_video_retrieval.py --evaluate's test: evaluate_retrieval's metrics."""
    if withholds_test_labels(config):
        raise UserError(f"{value(config, 'dataset')} keeps its test labels private (--evaluate writes a challenge "
                        "submission instead of metrics): a sweep has no accuracy to plot there")
    settings = RetrievalSettings.from_config(config)

    def evaluate(model) -> dict:
        return evaluate_retrieval(model, loader, dataset, device, autocast, settings)[0]
    return Task("retrieval", evaluate, {})


def qa_task(config: dict, dataset, loader, device: torch.device, autocast) -> Task:
    """train_video_qa.py --evaluate's test: evaluate_qa's metrics."""
    inference, k_test = value(config, "inference"), value(config, "k_test", "video QA")

    def evaluate(model) -> dict:
        return evaluate_qa(model, loader, dataset, device, autocast, inference, k_test)[0]
    return Task("qa", evaluate, qa_protocol(inference, dataset))


TASKS = {"retrieval": retrieval_task, "qa": qa_task}


# -- the sweep ----------------------------------------------------------------------------------
def cell_config(base: dict, rule: str, budget: float) -> dict:
    """The config of one cell, its values checked as a file's are."""
    config = apply_overrides(dict(base), [f"merge_rule={rule}", f"merge_budget={budget}"])
    check(config, "the sweep's cell")
    check_values(config, lambda name: "the sweep's cell")
    return config


def plan_cell(config: dict, frames: int, patches: int) -> dict:
    """A cell's plan fields, from an encoder built on the meta device (no weights); a budget the
    rule cannot reach gives a skipped cell with the reason."""
    try:
        with torch.device("meta"):
            plan = build_video_encoder(config, verbose=False).merge_plan(frames, patches)
    except ValueError as error:  # a budget out of reach (a ConfigError when built), said in one line
        return {"status": "skipped", "reason": str(error)}
    return {"status": "planned", **plan.fields(), "plan": plan.describe()}


@torch.no_grad()
def measure_cell(config: dict, task: Task, checkpoint, device: torch.device, autocast, frames: int) -> dict:
    """Build and load the cell's model, evaluate it, and time its encoder; measured on every rank."""
    model = create_model(config, task.name, checkpoint=checkpoint, verbose=False).to(device).eval()
    size, batch = value(config, "image_size"), value(config, "batch_size_test")
    with autocast():  # first-call costs (kernel choice for the batch shape, allocator growth) stay untimed
        model.visual_encoder(torch.zeros((batch, 3, frames, size, size), dtype=torch.uint8, device=device))
    reset_peak_memory(device)
    with EncoderClock(model.visual_encoder, device) as clock:
        metrics = task.evaluate(model)
    measured = (clock.seconds, clock.clips, peak_memory_mib(device))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds, clips, peaks = zip(*gather_objects(measured))
    return {"status": "done", "seconds_per_clip": sum(seconds) / max(sum(clips), 1), "clips_timed": sum(clips),
            "device": device_name(device), "peak_memory_mib": None if None in peaks else max(peaks),
            "peak_memory_kind": peak_memory_kind(device), "metrics": metrics}


@contextmanager
def sweep_folder(output_dir: Path, settings_of: dict[str, dict]):
    """The kept cells of `output_dir`, while rank 0 holds its lock (released at the end: another
    sweep may follow in the same process). Every rank gets the cells, or stops with rank 0's
    refusal, so that no rank waits at a collective for one that has gone."""
    kept, refusal, lock = {}, None, None
    if is_main_process():
        try:
            (output_dir / "cells").mkdir(parents=True, exist_ok=True)
            lock = acquire_run_lock(output_dir)
            kept = kept_cells(output_dir / "cells", settings_of)
        except UserError as error:
            refusal = str(error)
    try:
        kept, refusal = gather_objects((kept, refusal))[0]
        if refusal is not None:
            raise UserError(refusal)
        yield kept
    finally:
        if lock is not None:
            release_run_lock(lock)


def cell_line(cell: dict, metric: str) -> str:
    if cell["status"] == "skipped":
        return f"{cell['rule']} {cell['budget']:g}: skipped ({cell['reason']})"
    return (f"{cell['rule']} {cell['budget']:g}: {cell['gmacs']:.3f} GMACs ({cell['cost_fraction']:.0%}), "
            f"{metric} {cell['metrics'][metric]:.2f}, {cell['seconds_per_clip'] * 1e3:.1f} ms/clip")


def write_outputs(output_dir: Path, cells: list[dict], header: dict, title: str) -> None:
    """sweep.csv, sweep.json and frontier.png of every cell (rank 0)."""
    ordered = sort_cells(cells)
    write_tables(output_dir, ordered, header)
    metric, metric_label = ACCURACY[header["task"]]
    draw_frontier(ordered, metric, metric_label, title, output_dir / "frontier.png")
    print(f"wrote {output_dir / 'sweep.csv'}, {output_dir / 'sweep.json'}, {output_dir / 'frontier.png'}", flush=True)


@dataclass
class SweepPlan:
    """Everything known before any weights or data are read."""
    config: dict  # the config file with the command line's overrides
    task: str
    frames: int  # of a test clip
    patches: int  # per frame
    configs: dict[str, dict]  # cell name -> the cell's config
    cells: dict[str, dict]  # cell name -> its record: the plan's fields, or skipped with the reason


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Check the command line and plan every cell; refuse, in one line, a sweep that cannot run."""
    rules, budgets = parse_rules(args.rules), parse_budgets(args.budgets)
    check_exists(args.checkpoint, "file")
    config = load_config(args.config, args.overrides)
    task = task_of(config)
    if task not in TASKS:
        raise ConfigError(f"{args.config} is no retrieval or video QA config (its `dataset` names the task); "
                          "a sweep evaluates one of those")
    frames = value(config, "num_frm_test")
    patches = (value(config, "image_size") // value(config, "patch_size")) ** 2
    configs = {cell_name(rule, budget): cell_config(config, rule, budget) for rule in rules for budget in budgets}
    cells = {name: {"rule": cell["merge_rule"], "budget": cell["merge_budget"], **plan_cell(cell, frames, patches)}
             for name, cell in configs.items()}
    if all(cell["status"] == "skipped" for cell in cells.values()):
        raise UserError(f"no cell of the sweep can run: {next(iter(cells.values()))['reason']}")
    return SweepPlan(config, task, frames, patches, configs, cells)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    plan = plan_sweep(args)
    cells, configs = plan.cells, plan.configs
    device = init_distributed(args.device)
    if device.type == "cpu":
        return_freed_memory_to_os()
    precision = make_precision(value(plan.config, "mixed_precision_method"), device)
    machine = device_name(device)
    checkpoint_path = Path(args.checkpoint).resolve()
    checkpoint_sha256 = gather_objects(file_sha256(checkpoint_path) if is_main_process() else None)[0]
    datasets, loaders = create_split_loaders(value(plan.config, "dataset"), plan.config, ["test"], get_world_size(),
                                             get_rank(), pin_memory=device.type == "cuda")
    task = TASKS[plan.task](plan.config, datasets["test"], loaders["test"], device, precision.autocast)
    settings_of = {name: json.loads(json.dumps(evaluation_protocol(
        configs[name], str(checkpoint_path), checkpoint_sha256=checkpoint_sha256, precision=precision.label,
        device=machine, **task.protocol_extra))) for name, cell in cells.items() if cell["status"] != "skipped"}
    metric = ACCURACY[plan.task][0]
    output_dir = Path(args.output_dir)
    with sweep_folder(output_dir, settings_of) as kept:
        pending = [name for name in settings_of if name not in kept]
        skipped = [cell for cell in cells.values() if cell["status"] == "skipped"]
        print(f"sweep: {len(cells)} cells ({len(kept)} kept, {len(pending)} to measure, {len(skipped)} skipped) "
              f"on {machine}", flush=True)
        for cell in skipped:
            print(cell_line(cell, metric), flush=True)
        checkpoint = read_checkpoint(checkpoint_path) if pending else None
        progress = ProgressLine("sweep:", len(settings_of), "cells", every_s=0, start=len(kept))
        for done, name in enumerate(pending, len(kept) + 1):
            cells[name].update(measure_cell(configs[name], task, checkpoint, device, precision.autocast, plan.frames))
            if is_main_process():
                record = json.dumps({"settings": settings_of[name], "cell": cells[name]}, indent=1) + "\n"
                atomic_write_bytes(output_dir / "cells" / f"{name}.json", record.encode())
            progress.update(done, cell_line(cells[name], metric))
        cells.update(kept)
        if is_main_process():
            header = {"config": str(args.config), "checkpoint": str(checkpoint_path), "task": plan.task,
                      "metric": metric, "clip": {"frames": plan.frames, "patches": plan.patches}, "device": machine}
            write_outputs(output_dir, list(cells.values()), header,
                          f"{Path(args.config).name}, {checkpoint_path.name}\n{machine}")


if __name__ == "__main__":
    run_cli(main)
