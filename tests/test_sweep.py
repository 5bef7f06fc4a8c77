"""evaluation.sweep: the Pareto front and the table (pure), a 2-rule x 2-budget sweep on the toy
retrieval setup (its files, its resumption, its refusal to mix settings, the same cells under
torchrun), bad input in one line, and video_tool show under a rule and a budget."""
import csv
import json
import shutil
import subprocess
import sys

import pytest

import video_tool
from evaluation import sweep
from runtime.errors import run_cli
from tests.helpers import REPO_ROOT
from tests.inference_toy import make_toy_setup
from tests.launching import environment, run_together, torchrun_nodes

RETRIEVAL_METRICS = ["txt2video_r1", "txt2video_r5", "txt2video_r10", "txt2video_r_mean", "txt2video_median_rank",
                     "txt2video_mean_rank", "video2txt_r1", "video2txt_r5", "video2txt_r10", "video2txt_r_mean",
                     "video2txt_median_rank", "video2txt_mean_rank", "r_mean"]
# Reachable on the toy encoder (2 blocks, 8 frames x 16 patches): its cheapest schedule costs 54%.
BUDGETS = "1,0.6"


def test_pareto_optimal_keeps_the_cells_nothing_beats():
    points = [(1.0, 80.0), (0.5, 78.0), (0.5, 70.0), (0.3, 78.0), (0.2, 60.0), (0.3, 78.0), (0.6, 81.0)]
    assert sweep.pareto_optimal(points) == [False, False, False, True, True, True, True]
    assert sweep.pareto_optimal([]) == []


def test_table_has_the_plan_timing_and_metric_columns():
    done = {"rule": "tome", "budget": 0.5, "status": "done", "gmacs": 1.0, "schedule": [[1, 2], [0, 3]],
            "metrics": {"accuracy": 40.0, "num_questions": 8}}
    skipped = {"rule": "none", "budget": 0.5, "status": "skipped", "reason": "budget 0.5 is below ..."}
    columns, rows = sweep.csv_table([done, skipped])
    assert columns == [*sweep.CSV_COLUMNS, "accuracy", "num_questions"]
    assert rows[0]["schedule"] == "[[1, 2], [0, 3]]" and rows[0]["accuracy"] == 40.0
    assert rows[1]["gmacs"] is None and "accuracy" not in rows[1] and rows[1]["reason"].startswith("budget")


def test_cells_sort_by_rule_then_budget_from_the_largest():
    cells = [{"rule": rule, "budget": budget} for rule, budget in (("tome", 0.5), ("pool", 0.5), ("tome", 1.0))]
    assert [(c["rule"], c["budget"]) for c in sweep.sort_cells(cells)] == [("pool", 0.5), ("tome", 1.0), ("tome", 0.5)]


def test_settings_differences_name_nested_settings():
    kept = {"k_test": 16, "model": {"merge_rule": "tome", "depth": 2}}
    assert sweep.settings_differences(kept, {"k_test": 4, "model": {"merge_rule": "tome", "depth": 2}}) == \
        ["k_test: 16 -> 4"]
    assert sweep.settings_differences(kept, {**kept, "model": {"merge_rule": "pool", "depth": 2}}) == \
        ["model.merge_rule: 'tome' -> 'pool'"]


def refused(argv, capsys) -> str:
    """The one `error:` line of sweep.main(argv) run as the command line runs it (exit status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: sweep.main([str(arg) for arg in argv]))
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.splitlines()  # building a model says its merge plan on stderr first
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, lines
    return lines[-1]


@pytest.mark.parametrize("option, message", [
    (["--rules", "testa,bogus"], "--rules: unknown rule 'bogus'; the rules are testa, "),
    (["--budgets", "1,1.5"], "--budgets: 1.5 is outside (0, 1]"),
    (["--budgets", "0"], "--budgets: 0 is outside (0, 1]"),
    (["--budgets", "half"], "--budgets: 'half' is not a number"),
    (["--rules", "none", "--budgets", "0.5"], "no cell of the sweep can run: merge_budget 0.5, merge_token_budget "
                                              "None: budget 0.5 is below the lowest reachable cost fraction 1.0000"),
])
def test_bad_input_is_one_line_before_any_model(option, message, tmp_path, capsys):
    checkpoint = tmp_path / "never_read.pth"
    checkpoint.write_bytes(b"")
    argv = ["--config", REPO_ROOT / "configs/toy/retrieval.yaml", "--checkpoint", checkpoint, "--output_dir",
            tmp_path / "out", *option]
    assert message in refused(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["--config", REPO_ROOT / "configs/toy/retrieval.yaml", "--checkpoint", tmp_path / "missing.pth",
            "--output_dir", tmp_path / "out"]
    assert refused(argv, capsys) == f"error: file not found: {tmp_path / 'missing.pth'}"


def test_a_pretraining_config_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "never_read.pth"
    checkpoint.write_bytes(b"")
    argv = ["--config", REPO_ROOT / "configs/toy/pretrain.yaml", "--checkpoint", checkpoint, "--output_dir", tmp_path]
    assert "is no retrieval or video QA config" in refused(argv, capsys)


@pytest.mark.slow
def test_command_line_refuses_a_bad_budget_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "evaluation.sweep", "--config", "configs/toy/retrieval.yaml",
                           "--checkpoint", tmp_path / "missing.pth", "--budgets", "2", "--output_dir", tmp_path],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "error: --budgets: 2 is outside (0, 1]: a budget is a fraction " \
                                                   "of the unmerged encoder's GMACs, 1 merging nothing\n"


# -- the toy pipeline ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("sweep"))


def sweep_argv(toy, output_dir, budgets=BUDGETS, *extra):
    return [str(arg) for arg in ["--config", toy.configs["retrieval"], "--checkpoint", toy.checkpoints["retrieval"],
                                 "--rules", "testa,pool", "--budgets", budgets, "--output_dir", output_dir,
                                 "--device", "cpu", *toy.overrides, *extra]]


@pytest.fixture
def measured(monkeypatch):
    """The cells this test's sweeps measured, by (rule, budget); the pytest process's allocator is left alone."""
    cells, measure = [], sweep.measure_cell

    def counted(config, *args):
        cells.append((config["merge_rule"], config["merge_budget"]))
        return measure(config, *args)
    monkeypatch.setattr(sweep, "measure_cell", counted)
    monkeypatch.setattr(sweep, "return_freed_memory_to_os", lambda: False)
    return cells


def read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def swept(toy, tmp_path_factory):
    """A finished 2 x 2 sweep's output folder."""
    output_dir = tmp_path_factory.mktemp("swept")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "return_freed_memory_to_os", lambda: False)
        sweep.main(sweep_argv(toy, output_dir))
    return output_dir


@pytest.mark.slow
def test_sweep_writes_every_cell_to_csv_json_and_a_frontier(swept):
    columns, rows = read_csv(swept / "sweep.csv")
    assert columns == [*sweep.CSV_COLUMNS, *RETRIEVAL_METRICS]
    assert [(row["rule"], row["budget"], row["status"]) for row in rows] == \
        [("pool", "1.0", "done"), ("pool", "0.6", "done"), ("testa", "1.0", "done"), ("testa", "0.6", "done")]
    unmerged, merged = rows[2], rows[3]
    assert float(unmerged["cost_fraction"]) == 1 and json.loads(unmerged["schedule"]) == [[0, 0], [0, 0]]
    assert abs(float(merged["cost_fraction"]) - 0.6) <= 0.02 * 0.6 and float(merged["token_fraction"]) < 1
    assert float(merged["gmacs"]) < float(unmerged["gmacs"]) == float(unmerged["unmerged_gmacs"])
    assert all(float(row["seconds_per_clip"]) > 0 and int(row["clips_timed"]) > 0 for row in rows)
    assert all(row["peak_memory_kind"] == "cpu peak RSS (VmHWM)" and float(row["peak_memory_mib"]) > 0 for row in rows)
    assert all(0 <= float(row["r_mean"]) <= 100 for row in rows)

    result = json.loads((swept / "sweep.json").read_text())
    assert result["task"] == "retrieval" and result["metric"] == "r_mean" and result["clip"] == {"frames": 8,
                                                                                              "patches": 16}
    assert [cell["metrics"]["r_mean"] for cell in result["cells"]] == [float(row["r_mean"]) for row in rows]
    assert sorted(path.name for path in (swept / "cells").iterdir()) == \
        ["pool_0.6.json", "pool_1.json", "testa_0.6.json", "testa_1.json"]
    assert (swept / "frontier.png").read_bytes().startswith(b"\x89PNG")


@pytest.fixture
def rerun_dir(swept, tmp_path):
    """A copy of the finished sweep's folder, for a test to sweep into again."""
    return shutil.copytree(swept, tmp_path / "swept")


@pytest.mark.slow
def test_rerun_skips_kept_cells_and_records_unreachable_ones(toy, rerun_dir, measured, capsys):
    kept = {path.name: path.stat().st_mtime_ns for path in (rerun_dir / "cells").iterdir()}
    sweep.main(sweep_argv(toy, rerun_dir, "1,0.6,0.2"))
    assert measured == []
    assert {path.name: path.stat().st_mtime_ns for path in (rerun_dir / "cells").iterdir()} == kept
    out, err = capsys.readouterr()
    assert "merge plan" not in err  # planning the cells says nothing: a model says its plan when it is built
    assert "sweep: 6 cells (4 kept, 0 to measure, 2 skipped)" in out
    assert "testa 0.2: skipped (" in out and "budget 0.2 is below the lowest reachable cost fraction" in out
    _, rows = read_csv(rerun_dir / "sweep.csv")
    assert [(row["rule"], row["budget"], row["status"]) for row in rows][-3:] == \
        [("testa", "1.0", "done"), ("testa", "0.6", "done"), ("testa", "0.2", "skipped")]


@pytest.mark.slow
def test_rerun_under_other_settings_refuses_instead_of_mixing(toy, rerun_dir, measured, capsys):
    error = refused(sweep_argv(toy, rerun_dir, BUDGETS, "k_test=4"), capsys)
    assert "was measured under other settings (k_test: 16 -> 4)" in error and "use another --output_dir" in error
    assert measured == []


@pytest.mark.slow
def test_torchrun_ranks_measure_the_same_cells(toy, swept, tmp_path):
    """Two processes shard the clips of every cell; rank 0 alone writes, and the metrics are one process's."""
    script = ["-m", "evaluation.sweep", *sweep_argv(toy, tmp_path, "0.6")]
    run_together(torchrun_nodes(script, nnodes=1, nproc_per_node=2), [environment()])
    one_process = json.loads((swept / "cells" / "pool_0.6.json").read_text())["cell"]
    two_processes = json.loads((tmp_path / "cells" / "pool_0.6.json").read_text())["cell"]
    assert two_processes["metrics"] == one_process["metrics"]
    assert two_processes["schedule"] == one_process["schedule"] and two_processes["gmacs"] == one_process["gmacs"]
    assert two_processes["clips_timed"] == one_process["clips_timed"]  # each clip once (rank shards, summed)
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert [(row["rule"], row["budget"]) for row in rows] == [("pool", "0.6"), ("testa", "0.6")]


@pytest.mark.slow
def test_show_pictures_a_rule_at_a_budget(toy, tmp_path, capsys):
    video = sorted(toy.videos.glob("*.mp4"))[0]
    model = ["--config", toy.configs["retrieval"], "--checkpoint", toy.checkpoints["retrieval"], "--precision", "fp32",
             "--options", *toy.overrides]
    video_tool.main([str(arg) for arg in ["show", video, "--out", tmp_path / "tome.png", "--rule", "tome",
                                          "--budget", "0.6", *model]])
    printed = capsys.readouterr()
    assert printed.out == f"{tmp_path / 'tome.png'}\n" and (tmp_path / "tome.png").is_file()
    assert "merge plan (tome, clips of 8 frames): budget 0.60: " in printed.err  # said when the model is built
    assert "(59." in printed.err  # the cost fraction the budget reached

    with pytest.raises(SystemExit) as stopped:
        video_tool.main([str(arg) for arg in ["show", video, "--out", tmp_path / "x.png", "--budget", "0.2", *model]])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert "budget 0.2 is below the lowest reachable cost fraction" in error and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_a_qa_config_sweeps_the_accuracy(toy, tmp_path):
    argv = ["--config", toy.configs["qa"], "--checkpoint", toy.checkpoints["qa"], "--rules", "tome",
            "--budgets", "1,0.6", "--output_dir", tmp_path, "--device", "cpu", *toy.overrides]
    sweep.main([str(arg) for arg in argv])
    header, rows = read_csv(tmp_path / "sweep.csv")
    assert "accuracy" in header and "r_mean" not in header
    assert [(row["budget"], row["status"]) for row in rows] == [("1.0", "done"), ("0.6", "done")]
    assert (tmp_path / "frontier.png").is_file()


@pytest.mark.slow
def test_evaluate_at_another_rule_and_budget_writes_its_plan_next_to_the_metrics(toy, tmp_path):
    done = subprocess.run([sys.executable, "train_video_retrieval.py", "--config", str(toy.configs["retrieval"]),
                           "--output_dir", str(tmp_path), "--evaluate", "--device", "cpu",
                           f"pretrained={toy.checkpoints['retrieval']}", "merge_rule=tome", "merge_budget=0.6",
                           *toy.overrides], cwd=REPO_ROOT, env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merge plan (tome, clips of 8 frames): budget 0.60: " in done.stderr
    result = json.loads((tmp_path / "evaluate.txt").read_text().splitlines()[-1])
    assert result["merge"]["rule"] == "tome" and result["merge"]["budget"] == 0.6
    assert abs(result["merge"]["cost_fraction"] / 0.6 - 1) <= 0.02
    assert result["model"]["merge_rule"] == "tome" and result["model"]["merge_budget"] == 0.6
