"""Video QA evaluation: answers by ranking the answer list or by generation, merged over processes."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from configs.keys import ConfigError
from evaluation.metrics import qa_accuracy
from runtime.distributed import gather_objects
from runtime.errors import NonFiniteError
from runtime.numerics import first_nonfinite_tensor
from runtime.progress import MetricLogger

INFERENCE_MODES = ("rank", "generate")


def merge_rank_results(results: list[dict], key: str = "question_id") -> list[dict]:
    """Every rank's result dicts in one list, deduplicated by `key` (DistributedSampler pads
    the last batch with repeats) and sorted by it."""
    merged = {}
    for rank_results in gather_objects(results):
        for item in rank_results:
            merged.setdefault(item[key], item)
    return [merged[k] for k in sorted(merged)]


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a module's output: a tensor, or the fields of a BertOutput/LMOutput."""
    return [output] if torch.is_tensor(output) else [v for v in vars(output).values() if torch.is_tensor(v)]


@contextmanager
def nonfinite_values(model):
    """A list that receives, while the block runs, the names of the values holding a NaN or
    inf, in the order both inference modes compute them: the video features (as the question
    encoder receives them), the question states, and the answer decoder's logits (and, for
    `rank`, the loss its answer scores are made of). Forward hooks see them without changing
    the model, and none sits on the visual encoder, which --compile compiles; each check costs
    one device synchronisation."""
    found = []

    def check(name: str, tensors: list) -> None:
        if first_nonfinite_tensor((name, tensor) for tensor in tensors if torch.is_tensor(tensor)) is not None:
            found.append(name)
    handles = [
        model.text_encoder.register_forward_pre_hook(
            lambda module, args, kwargs: check("video features", [kwargs.get("encoder_hidden_states")]),
            with_kwargs=True),
        model.text_encoder.register_forward_hook(
            lambda module, inputs, output: check("question states", _tensors(output))),
        model.text_decoder.register_forward_hook(
            lambda module, inputs, output: check("answer decoder outputs", _tensors(output))),
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def predict_answers(model, loader, answer_list: list[str], device: torch.device, autocast,
                    inference: str = "rank", k_test: int = 128) -> list[dict]:
    """[{question_id, answer}] for every question of `loader`, merged over ranks (sorted by id).

    inference 'rank' picks from `answer_list` (its top k_test by first-token probability,
    re-ranked by the decoder's loss); 'generate' decodes freely with beam search. A NaN or inf
    in what they are computed from raises NonFiniteError naming where it first appeared.
    """
    if inference not in INFERENCE_MODES:
        raise ConfigError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
    model.eval()
    answer_ids, answer_mask, _ = model.tokenize_answers(answer_list)
    results = []
    batches = MetricLogger().log_every(loader, 10, f"Answering ({inference}):")
    with nonfinite_values(model) as nonfinite:
        for batch, (video, questions, question_ids) in enumerate(batches):
            video = video.to(device, non_blocking=True)
            with autocast():
                if inference == "rank":
                    best = model.rank_answers(video, list(questions), answer_ids, answer_mask, k_test)
                    answers = [answer_list[i] for i in best.tolist()]
                else:
                    answers = model.generate_answers(video, list(questions))
            if nonfinite:
                raise NonFiniteError(f"non-finite {nonfinite[0]} in evaluation batch {batch} "
                                     f"(questions {question_ids[0]} to {question_ids[-1]})")
            results += [{"question_id": qid, "answer": answer} for qid, answer in zip(question_ids, answers)]
    return merge_rank_results(results)


def evaluate_qa(model, loader, dataset, device: torch.device, autocast, inference: str,
                k_test: int) -> tuple[dict, list[dict]]:
    """predict_answers for `dataset` (a VideoQADataset, its clips from `loader`) and their qa_accuracy,
    as (metrics, predictions): what train_video_qa.py and the sweep report. Only the questions
    asked count (those whose video exists); `rank` adds the candidates' count and the share of
    questions whose true answer is among them, the accuracy it can reach."""
    predictions = predict_answers(model, loader, dataset.answer_list, device, autocast, inference, k_test)
    asked = set(dataset.question_ids)
    answers = {qid: answer for qid, answer in dataset.answers.items() if qid in asked}
    metrics = qa_accuracy({p["question_id"]: p["answer"] for p in predictions}, answers, dataset.question_types or None)
    if inference == "rank":
        metrics.update(num_candidates=len(dataset.answer_list), candidates_cover=dataset.candidate_coverage())
    return metrics, predictions


def qa_protocol(inference: str, dataset) -> dict:
    """What a QA result's evaluation_protocol records beyond the config's settings: the inference
    mode and, for `rank`, where the candidate answers of `dataset` came from."""
    return {"inference": inference, **({"answer_candidates": dataset.candidate_rule} if inference == "rank" else {})}
