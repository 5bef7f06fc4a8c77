"""The three entry scripts end to end on a generated toy corpus: single process and torchrun
(2 gloo processes), resume, sharded evaluation, and one-line errors for bad input."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from ruamel.yaml import YAML

from data.toy import write_corpus
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # every test runs the entry scripts: not in make test-fast

# A smaller model than configs/toy so the tests stay quick.
SMALL = ["depth=2", "max_epoch=1", "num_workers=0", "batch_size_test=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=24, frames=8, size=64, seed=0, num_images=4)
    return root


def run_script(script, *args, nproc=None, check=True):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + [script, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def last_json_line(path):
    return json.loads(path.read_text().splitlines()[-1])


def retrieval_args(corpus, out, *extra):
    return ["--config", "configs/toy/retrieval.yaml", "--output_dir", out, f"video_root={corpus}/videos",
            f"ann_root={corpus}/ann", "batch_size_train=4", *SMALL, *extra]


@pytest.fixture(scope="module")
def finetuned_retrieval(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval")
    run_script("train_video_retrieval.py", *retrieval_args(corpus, out))
    return out


def test_retrieval_trains_validates_and_tests(finetuned_retrieval):
    out = finetuned_retrieval
    for name in ("config.yaml", "log.txt", "checkpoint_best.pth", "checkpoint_last.pth", "test_results.txt"):
        assert (out / name).is_file(), name
    epoch = last_json_line(out / "log.txt")
    assert epoch["epoch"] == 0 and {"train_loss_ita", "train_loss_itm", "val_r_mean"} <= set(epoch)
    result = last_json_line(out / "test_results.txt")
    assert result["split"] == "test" and result["frames"] == 8 and result["k_test"] == 16
    for direction in ("txt2video", "video2txt"):
        for metric in ("r1", "r5", "r10", "r_mean", "median_rank", "mean_rank"):
            assert f"{direction}_{metric}" in result
    checkpoint = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert {"model", "optimizer", "config", "epoch"} <= set(checkpoint)


def test_test_results_name_the_best_checkpoint_they_tested(finetuned_retrieval):
    result = last_json_line(finetuned_retrieval / "test_results.txt")
    assert result["checkpoint"] == str(finetuned_retrieval / "checkpoint_best.pth")


def test_the_run_records_its_settings_and_provenance(finetuned_retrieval):
    """config.yaml, log.txt's first line, the checkpoints and test_results.txt (tests/test_run_record.py)."""
    out = finetuned_retrieval
    settings = {"mixed_precision_method": "none", "accumulation_steps": 1, "max_grad_norm": None}
    config = YAML(typ="safe").load((out / "config.yaml").read_text())
    assert {name: config[name] for name in settings} == settings
    assert (out / "config.yaml").read_text().startswith("# provenance:")
    first_line = json.loads((out / "log.txt").read_text().splitlines()[0])
    result = last_json_line(out / "test_results.txt")
    assert first_line["settings"] == result["settings"] == {**settings, "precision": "fp32"}
    checkpoint = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert first_line["provenance"] == result["provenance"] == checkpoint["provenance"]
    assert result["provenance"]["world_size"] == 1 and result["provenance"]["versions"]["torch"]


def test_zero_shot_evaluate_is_the_same_under_torchrun(corpus, finetuned_retrieval, tmp_path):
    pretrained = f"pretrained={finetuned_retrieval / 'checkpoint_best.pth'}"
    single, double = tmp_path / "single", tmp_path / "double"
    run_script("train_video_retrieval.py", *retrieval_args(corpus, single, pretrained), "--evaluate")
    run_script("train_video_retrieval.py", *retrieval_args(corpus, double, pretrained), "--evaluate", nproc=2)
    one, two = last_json_line(single / "evaluate.txt"), last_json_line(double / "evaluate.txt")
    assert (one.pop("provenance")["world_size"], two.pop("provenance")["world_size"]) == (1, 2)
    assert one == two and one["checkpoint"].endswith("checkpoint_best.pth")
    scores_one = torch.load(single / "scores_test.pt", weights_only=True)
    scores_two = torch.load(double / "scores_test.pt", weights_only=True)
    for direction in ("txt2video", "video2txt"):
        assert torch.equal(scores_one[direction], scores_two[direction]), direction
    assert not (double / "checkpoint_last.pth").exists()


def test_resumed_run_continues_the_uninterrupted_loss_curve(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("train_video_retrieval.py", *retrieval_args(corpus, straight), "max_epoch=2")
    run_script("train_video_retrieval.py", *retrieval_args(corpus, resumed), "max_epoch=1")
    run_script("train_video_retrieval.py", *retrieval_args(corpus, resumed), "max_epoch=2")
    full = [json.loads(line) for line in (straight / "log.txt").read_text().splitlines()]
    pieces = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in pieces] == [0, 1]
    for key in ("train_loss_ita", "train_loss_itm", "train_lr", "val_r_mean"):
        assert [r[key] for r in pieces] == [r[key] for r in full], key


def test_pretrain_with_separate_image_loader_under_torchrun(corpus, tmp_path):
    out = tmp_path / "pretrain"
    image_config = tmp_path / "images.yaml"
    image_config.write_text(f"train_file: [{corpus}/ann/pretrain_images.json]\nnum_frm_train: 2\nbatch_size: 2\n")
    run_script("video_pretrain.py", "--config", "configs/toy/pretrain.yaml", "--output_dir", out, "--sep_img",
               "--img_config", image_config, f"video_root={corpus}",
               f"train_file=[{corpus}/ann/pretrain.json]", "batch_size=4", *SMALL, nproc=2)
    record = last_json_line(out / "log.txt")
    assert {"train_loss_ita", "train_loss_itm", "train_loss_lm"} <= set(record)
    assert (out / "checkpoint_00.pth").is_file() and (out / "checkpoint_last.pth").is_file()


def test_qa_trains_and_writes_predictions_without_duplicates(corpus, tmp_path):
    out = tmp_path / "qa"
    run_script("train_video_qa.py", "--config", "configs/toy/qa.yaml", "--output_dir", out,
               f"video_root={corpus}/videos", f"ann_root={corpus}/ann", "batch_size_train=4", *SMALL, nproc=2)
    result = last_json_line(out / "test_results.txt")
    assert 0 <= result["accuracy"] <= 100 and "accuracy_color" in result
    predictions = json.loads((out / "result" / "test_best.json").read_text())
    questions = json.loads((corpus / "ann" / "test_q.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
    assert result["num_questions"] == len(questions)


@pytest.mark.parametrize("case, args, message", [
    ("config key typo", ["k_tset=4"], "unknown config key 'k_tset'"),
    ("missing annotations", ["ann_root=/nonexistent/annotations"], "/nonexistent/annotations"),
    ("missing checkpoint", ["--checkpoint", "/nonexistent/checkpoint.pth"], "/nonexistent/checkpoint.pth"),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, case, args, message):
    result = run_script("train_video_retrieval.py", *retrieval_args(corpus, tmp_path / "out", *args), check=False)
    assert result.returncode == 1, case
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_checkpoint_of_another_model_is_one_clear_line(corpus, tmp_path, fixtures_dir):
    # The fixture's retrieval model is 32 wide; the toy config builds a 64-wide one.
    result = run_script("train_video_retrieval.py",
                        *retrieval_args(corpus, tmp_path / "out", f"pretrained={fixtures_dir / 'retrieval.pth'}"),
                        "--evaluate", check=False)
    assert result.returncode == 1
    assert "shape mismatch" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["video_pretrain.py", "train_video_retrieval.py", "train_video_qa.py"])
def test_help_documents_every_flag(script):
    text = run_script(script, "--help").stdout
    for flag in ("--config", "--output_dir", "--mixed_precision_method", "--checkpoint", "--evaluate",
                 "--allow_random_weights", "--device",
                 "--seed", "--accumulation_steps", "--max_grad_norm", "--num_workers", "--k_test_batch_size",
                 "--low_resource_eval"):
        assert flag in text, flag
    if script == "video_pretrain.py":
        assert "--sep_img" in text and "--img_config" in text


def test_condensed_movies_test_split_writes_a_submission(corpus, tmp_path):
    out = tmp_path / "cm"
    run_script("train_video_retrieval.py", *retrieval_args(corpus, out, "dataset=retrieval_condensedmovies",
                                                           f"video_root={corpus}/videos_mkv"),
               "--evaluate", "--allow_random_weights", "--low_resource_eval")  # the format is what counts
    with zipfile.ZipFile(out / "submission.zip") as archive:
        scores = np.load(io.BytesIO(archive.read("sim_matrix_test.npy")))
    test_rows = (corpus / "ann" / "test_challf0.csv").read_text().splitlines()[1:]
    assert scores.shape == (len(test_rows), len(test_rows)) and np.isfinite(scores).all()
