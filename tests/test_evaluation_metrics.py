"""Retrieval and QA metrics against hand-computed cases."""
import numpy as np
import pytest

from evaluation.metrics import best_ground_truth_ranks, qa_accuracy, retrieval_metrics
from evaluation.qa import merge_rank_results

# 3 videos, 4 texts; video 0 has two captions.
TXT2VIDEO = [0, 0, 1, 2]
VIDEO2TXT = [[0, 1], [2], [3]]
SCORES_T2V = np.array([
    [0.9, 0.1, 0.2],  # text 0 -> video 0 first: rank 1
    [0.5, 0.5, 0.1],  # tie with video 1: pessimistic rank 2
    [0.3, 0.2, 0.8],  # two videos above its video 1: rank 3
    [0.1, 0.2, 0.3],  # rank 1
])
SCORES_V2T = np.array([
    [0.1, 0.7, 0.7, 0.2],  # best caption (text 1) ties with text 2: rank 2
    [0.9, 0.9, 0.9, 0.1],  # its text 2 ties with texts 0 and 1: rank 3
    [0.0, 0.0, 0.0, 1.0],  # rank 1
])


def test_pessimistic_ranks_with_ties_and_several_texts():
    def ranks(scores, truth):
        return best_ground_truth_ranks(scores, truth, "pessimistic").tolist()
    assert ranks(SCORES_T2V, [[v] for v in TXT2VIDEO]) == [1, 2, 3, 1]
    assert ranks(SCORES_V2T, VIDEO2TXT) == [2, 3, 1]
    # A tie between two ground truths is no penalty: only non-ground-truth candidates count.
    assert ranks([[0.4, 0.4, 0.1]], [[0, 1]]) == [1]


def test_original_rule_ranks_a_later_tied_index_first():
    # argsort(row)[::-1]: among equal scores the higher index comes first (the original's order).
    assert best_ground_truth_ranks(SCORES_T2V, [[v] for v in TXT2VIDEO], "original").tolist() == [1, 2, 3, 1]
    assert best_ground_truth_ranks([[0.5, 0.5, 0.1]], [[1]], "original").tolist() == [1]
    # Video 0: text 2 (tied with its text 1) comes first; video 1: its text 2 is the last of three ties.
    assert best_ground_truth_ranks(SCORES_V2T, VIDEO2TXT, "original").tolist() == [2, 1, 1]
    # The -100 fill outside the re-ranked top k: ground truth 0 sits behind the tied 1, 2 and 3.
    assert best_ground_truth_ranks([[-100.0, -100.0, -100.0, -100.0, 2.0]], [[0]]).tolist() == [5]
    assert best_ground_truth_ranks([[-100.0, -100.0, -100.0, -100.0, 2.0]], [[3]]).tolist() == [2]
    with pytest.raises(ValueError, match="tie_rule"):
        best_ground_truth_ranks(SCORES_T2V, [[v] for v in TXT2VIDEO], "optimistic")


def test_retrieval_metrics_hand_computed():
    metrics = retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VIDEO, VIDEO2TXT, "pessimistic")
    expected = {
        "txt2video_r1": 50.0, "txt2video_r5": 100.0, "txt2video_r10": 100.0,
        "txt2video_r_mean": 250.0 / 3, "txt2video_median_rank": 1.5, "txt2video_mean_rank": 1.75,
        "video2txt_r1": 100.0 / 3, "video2txt_r5": 100.0, "video2txt_r10": 100.0,
        "video2txt_r_mean": (100.0 / 3 + 200.0) / 3, "video2txt_median_rank": 2.0,
        "video2txt_mean_rank": 2.0,
    }
    expected["r_mean"] = (expected["txt2video_r_mean"] + expected["video2txt_r_mean"]) / 2
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_recall_at_5_and_10_thresholds():
    scores = np.arange(12, 0, -1, dtype=float)[None].repeat(3, axis=0)  # candidate c has rank c+1
    ranks = best_ground_truth_ranks(scores, [[4], [6], [10]], "pessimistic")
    assert ranks.tolist() == [5, 7, 11]
    metrics = retrieval_metrics(scores, scores, [4, 6, 10], [[4], [6], [10]])
    assert (metrics["txt2video_r1"], metrics["txt2video_r5"], metrics["txt2video_r10"]) == \
        (0.0, pytest.approx(100 / 3), pytest.approx(200 / 3))


def test_retrieval_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VIDEO[:3], VIDEO2TXT)


def test_qa_accuracy_overall_and_per_type():
    answers = {1: "yes", 2: "dog", 3: "red", 4: "2"}
    types = {1: "yes_no", 2: "what", 3: "color", 4: "what"}
    predictions = {1: "yes", 2: "cat", 3: " red ", 5: "extra"}  # 4 is missing: counted wrong
    result = qa_accuracy(predictions, answers, types)
    assert result == {"accuracy": 50.0, "num_questions": 4, "accuracy_color": 100.0,
                      "accuracy_what": 0.0, "accuracy_yes_no": 100.0}
    assert qa_accuracy({1: "Yes"}, {1: "yes"}) == {"accuracy": 0.0, "num_questions": 1}


def test_merge_rank_results_deduplicates_and_sorts():
    results = [{"question_id": 3, "answer": "a"}, {"question_id": 1, "answer": "b"},
               {"question_id": 3, "answer": "a"}]
    assert [r["question_id"] for r in merge_rank_results(results)] == [1, 3]


def test_metrics_accept_torch_tensors_in_half_precision():
    import torch
    metrics = retrieval_metrics(torch.tensor(SCORES_T2V, dtype=torch.bfloat16),
                                      torch.tensor(SCORES_V2T), TXT2VIDEO, VIDEO2TXT, "pessimistic")
    assert metrics["txt2video_mean_rank"] == 1.75 and metrics["video2txt_mean_rank"] == 2.0
