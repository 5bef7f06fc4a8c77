"""ActivityNet-QA evaluation end to end, from video files to accuracy, against the original's own run.

tests/fixtures/train_e2e/activitynet_qa_ref.pt holds what the original computed on the e2e
clips with the compact QA model (rank inference): its questions, frames, candidate answers,
first-token probabilities, top-k scores, predictions and accuracy (see the folder's README).
The original listed its candidates in Python's set order; this project lists the same answers
in order of first appearance, so scores are compared candidate by candidate, by answer string.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from data.datasets import create_dataset
from data.video import sample_frame_indices
from models import create_model
from tests.helpers import E2E, REPO_ROOT, TRAIN_E2E, train_e2e_config

REF = torch.load(TRAIN_E2E / "activitynet_qa_ref.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def config():
    return train_e2e_config("activitynet_qa")


@pytest.fixture(scope="module")
def test_split(config):
    return create_dataset("activitynet_qa", config, "test")


def test_questions_frames_and_pixels_are_the_originals(test_split):
    counts = json.loads((E2E / "videos" / "frame_counts.json").read_text())
    assert test_split.question_ids == REF["question_ids"]
    assert [item[1] for item in test_split.items] == REF["questions"]
    assert [test_split.answers[qid] for qid in test_split.question_ids] == REF["answers"]
    for index, path in enumerate(REF["video_files"]):
        vlen = counts[path.rsplit("/", 1)[-1]]
        assert vlen == REF["vlen"][index]
        assert sample_frame_indices(vlen, 8, test_split.strategy) == REF["frame_indices"][index].tolist()
        clip, question, question_id = test_split[index]
        frames = clip.permute(1, 2, 3, 0).contiguous()  # (T, H, W, C), as the original's reader returned them
        assert hashlib.sha256(frames.numpy().tobytes()).hexdigest() == REF["video_frames_uint8_sha256"][index]
        assert (question, question_id) == (REF["questions"][index], REF["question_ids"][index])


def test_candidates_are_the_split_answers_in_order_of_first_appearance(test_split):
    assert test_split.candidate_rule == "split"
    assert sorted(test_split.answer_list) == sorted(REF["candidate_answers"])
    assert test_split.answer_list == list(dict.fromkeys(REF["answers"]))
    assert test_split.candidate_coverage() == 100.0


@pytest.mark.slow
def test_candidate_order_does_not_depend_on_string_hashing(config):
    code = ("import json, sys; from data.datasets import create_dataset; "
            "print(json.dumps(create_dataset('activitynet_qa', json.loads(sys.argv[1]), 'test').answer_list))")
    lists = []
    for hash_seed in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO_ROOT, capture_output=True,
                                text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode == 0, result.stderr[-2000:]
        lists.append(json.loads(result.stdout.splitlines()[-1]))
    assert lists[0] == lists[1]


def test_train_answer_rule_lists_training_answers_and_reports_its_coverage(config):
    split = create_dataset("activitynet_qa", {**config, "answer_candidates": "train"}, "test")
    assert split.answer_list == REF["train_answers_first_seen_order"]
    covered = [answer in set(REF["train_answers_first_seen_order"]) for answer in REF["answers"]]
    assert split.candidate_coverage() == pytest.approx(100.0 * sum(covered) / len(covered))
    assert split.candidate_coverage() < 100.0  # 'black', the original's prediction, is not a training answer
    with pytest.raises(ValueError, match="answer_candidates 'all' is unknown"):
        create_dataset("activitynet_qa", {**config, "answer_candidates": "all"}, "test")


def test_validation_keeps_the_originals_shuffled_fiftieth(config):
    assert create_dataset("activitynet_qa", config, "val").question_ids == REF["val_selected_question_ids"]
    every = create_dataset("activitynet_qa", {**config, "val_question_every": 1}, "val")
    assert every.question_ids == REF["question_ids"]  # val = test in this fixture, in file order


@pytest.mark.slow
@pytest.mark.parametrize("k, suffix", [(4, ""), (16, "_kall")])
def test_first_token_probabilities_and_top_k_scores_equal_the_originals(config, test_split, k, suffix):
    model = create_model(config, "qa", config["pretrained"]).eval()
    answers = test_split.answer_list
    ref_column = [REF["candidate_answers"].index(answer) for answer in answers]
    answer_ids, answer_mask, _ = model.tokenize_answers(answers)
    for start in range(0, len(test_split), 2):  # the original's batches of two questions
        rows = range(start, start + 2)
        video = torch.stack([test_split[i][0] for i in rows])
        probs, top_ids, scores = model.score_answers(video, [test_split[i][1] for i in rows], answer_ids,
                                                     answer_mask, k)
        torch.testing.assert_close(probs, REF["first_token_probs"][start:start + 2][:, ref_column], atol=1e-5, rtol=0)
        for row, question in enumerate(rows):
            ours = {answers[i]: score for i, score in zip(top_ids[row].tolist(), scores[row].tolist())}
            if suffix:
                theirs = dict(zip(REF["candidate_answers"], REF["log_probs_by_candidate_kall"][question].tolist()))
            else:
                theirs = {REF["candidate_answers"][i]: score for i, score in
                          zip(REF["topk_candidate_ids"][question].tolist(), REF["topk_log_probs"][question].tolist())}
            assert set(ours) == set(theirs), question
            assert all(abs(ours[answer] - theirs[answer]) <= 1e-5 for answer in ours), question


@pytest.mark.slow
@pytest.mark.parametrize("k, suffix", [(4, ""), (16, "_kall")])
def test_script_predictions_and_accuracy_equal_the_originals(config, tmp_path, k, suffix):
    overrides = [f"{key}={config[key]}" for key in ("video_root", "ann_root", "pretrained", "tokenizer", "med_config")]
    command = [sys.executable, "train_video_qa.py", "--config", str(TRAIN_E2E / "activitynet_qa.yaml"),
               "--output_dir", str(tmp_path), "--evaluate", "--num_workers", "0", "--device", "cpu",
               f"k_test={k}", *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = {p["question_id"]: p["answer"] for p in
                   json.loads((tmp_path / "result" / "test_zero_shot.json").read_text())}
    assert [predictions[qid] for qid in REF["question_ids"]] == REF["predicted_answers" + suffix]
    record = json.loads((tmp_path / "evaluate.txt").read_text().splitlines()[-1])
    assert record["accuracy"] == REF["accuracy_float"] and f"{record['accuracy']:.2f}%" == REF["accuracy" + suffix]
    assert {key.removeprefix("accuracy_"): value for key, value in record.items()
            if key.startswith("accuracy_")} == pytest.approx(REF["accuracy_per_type" + suffix])
    assert record["answer_candidates"] == "split" and record["candidates_cover"] == 100.0
    assert record["num_candidates"] == len(REF["candidate_answers"]) and record["k_test"] == k
