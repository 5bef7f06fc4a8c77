"""Video QA evaluation: answers by ranking the answer list or by generation, merged over processes."""
from __future__ import annotations

import torch

from configs.keys import ConfigError
from training.distributed import gather_objects
from training.progress import MetricLogger

INFERENCE_MODES = ("rank", "generate")


def merge_rank_results(results: list[dict], key: str = "question_id") -> list[dict]:
    """Every rank's result dicts in one list, deduplicated by `key` (DistributedSampler pads
    the last batch with repeats) and sorted by it."""
    merged = {}
    for rank_results in gather_objects(results):
        for item in rank_results:
            merged.setdefault(item[key], item)
    return [merged[k] for k in sorted(merged)]


@torch.no_grad()
def predict_answers(model, loader, answer_list: list[str], device: torch.device, autocast,
                    inference: str = "rank", k_test: int = 128) -> list[dict]:
    """[{question_id, answer}] for every question of `loader`, merged over ranks (sorted by id).

    inference 'rank' picks from `answer_list` (its top k_test by first-token probability,
    re-ranked by the decoder's loss); 'generate' decodes freely with beam search.
    """
    if inference not in INFERENCE_MODES:
        raise ConfigError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
    model.eval()
    answer_ids, answer_mask, _ = model.tokenize_answers(answer_list)
    results = []
    for video, questions, question_ids in MetricLogger().log_every(loader, 10, f"Answering ({inference}):"):
        video = video.to(device, non_blocking=True)
        with autocast():
            if inference == "rank":
                best = model.rank_answers(video, list(questions), answer_ids, answer_mask, k_test)
                answers = [answer_list[i] for i in best.tolist()]
            else:
                answers = model.generate_answers(video, list(questions))
        results += [{"question_id": qid, "answer": answer} for qid, answer in zip(question_ids, answers)]
    return merge_rank_results(results)
