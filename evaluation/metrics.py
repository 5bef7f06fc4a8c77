"""Retrieval rank metrics and QA accuracy: pure functions of score matrices and answers."""
from collections import defaultdict

import numpy as np
import torch


TIE_RULES = ("original", "pessimistic")


def best_ground_truth_ranks(scores, ground_truth: list[list[int]], tie_rule: str = "original") -> np.ndarray:
    """1-based rank of the best-ranked ground truth for each query (row of `scores`).

    tie_rule decides where a ground truth lands among exactly equal scores:
    - "original": its position in ``numpy.argsort(row)[::-1]``, the original's metric, so
      published numbers reproduce (for short rows the later index comes first among ties;
      numpy promises no order for ties in general);
    - "pessimistic": 1 + the number of non-ground-truth candidates scoring at least as
      high as the best ground truth (a ground truth left at the fill value outside the
      re-ranked top k ranks last).
    Other ground truths never push a query's rank down under either rule. A NaN or inf score
    is refused (ValueError): ranks computed from it would be meaningless.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie_rule {tie_rule!r}; expected one of {TIE_RULES}")
    scores = scores.detach().float().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(ground_truth):
        raise ValueError(f"scores must be (num_queries, num_candidates) with one ground-truth "
                         f"list per query; got shape {scores.shape} and {len(ground_truth)} lists")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores hold NaN or inf (first in query {int(np.nonzero(~np.isfinite(scores))[0][0])}): "
                         "ranks computed from them would be meaningless")
    ranks = np.empty(len(ground_truth), dtype=np.int64)
    for query, targets in enumerate(ground_truth):
        if len(targets) == 0:
            raise ValueError(f"query {query} has no ground-truth candidate")
        row, targets = scores[query], list(targets)
        if tie_rule == "original":
            position = np.empty(row.shape[0], dtype=np.int64)
            position[np.argsort(row)[::-1]] = np.arange(row.shape[0])
            ranks[query] = 1 + int(position[targets].min())
        else:
            is_target = np.zeros(row.shape[0], dtype=bool)
            is_target[targets] = True
            ranks[query] = 1 + int(np.count_nonzero(row[~is_target] >= row[is_target].max()))
    return ranks


def _rank_metrics(ranks: np.ndarray, prefix: str) -> dict:
    recalls = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    return {**recalls,
            f"{prefix}_r_mean": sum(recalls.values()) / 3,
            f"{prefix}_median_rank": float(np.median(ranks)),
            f"{prefix}_mean_rank": float(np.mean(ranks))}


def retrieval_metrics(scores_t2v, scores_v2t, txt2video: list[int],
                      video2txt: list[list[int]], tie_rule: str = "original") -> dict:
    """R@1/5/10 (percent), their mean, median and mean rank in both directions, and r_mean.

    scores_t2v is (num_texts, num_videos); scores_v2t is (num_videos, num_texts);
    txt2video[t] is text t's video; video2txt[v] lists video v's texts (one or more);
    tie_rule as in best_ground_truth_ranks.
    """
    t2v = _rank_metrics(best_ground_truth_ranks(scores_t2v, [[v] for v in txt2video], tie_rule), "txt2video")
    v2t = _rank_metrics(best_ground_truth_ranks(scores_v2t, video2txt, tie_rule), "video2txt")
    return {**t2v, **v2t, "r_mean": (t2v["txt2video_r_mean"] + v2t["video2txt_r_mean"]) / 2}


def qa_accuracy(predictions: dict, answers: dict, question_types: dict | None = None) -> dict:
    """Exact-match accuracy in percent over all questions in `answers` (missing = wrong).

    predictions and answers map question_id -> answer string (compared after stripping
    surrounding whitespace); question_types maps question_id -> type for per-type accuracy
    ('accuracy_<type>').
    """
    if not answers:
        raise ValueError("qa_accuracy needs at least one ground-truth answer")
    correct = {qid: str(predictions.get(qid, "")).strip() == str(answer).strip()
               for qid, answer in answers.items()}
    result = {"accuracy": 100.0 * sum(correct.values()) / len(correct),
              "num_questions": len(correct)}
    if question_types:
        by_type = defaultdict(list)
        for qid, hit in correct.items():
            by_type[question_types[qid]].append(hit)
        for kind in sorted(by_type, key=str):
            result[f"accuracy_{kind}"] = 100.0 * sum(by_type[kind]) / len(by_type[kind])
    return result
