"""Retrieval evaluation: ITC for every pair, ITM re-ranking of each query's top k_test,
sharded over processes in whole batches so that any process count gives one process's scores."""
from __future__ import annotations

import io
import zipfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from configs.keys import ConfigError, value
from evaluation.metrics import TIE_RULES, retrieval_metrics
from models.testa_retrieval import rerank_scores, rows_per_itm_batch
from runtime.distributed import gather_objects, get_rank, get_world_size
from runtime.numerics import require_finite
from runtime.progress import MetricLogger
from runtime.sharding import shard_indices

TEXT_BATCH = 256
# The datasets whose test labels are private: their --evaluate writes a challenge submission.
PRIVATE_TEST_LABELS = ("retrieval_condensedmovies",)


@dataclass(frozen=True)
class RetrievalSettings:
    """The evaluation knobs of a retrieval config."""
    k_test: int
    k_test_batch_size: int = 128
    low_resource: bool = False  # cache video tokens in fp16 on the CPU
    tie_rule: str = "original"

    @classmethod
    def from_config(cls, config: dict) -> RetrievalSettings:
        settings = cls(value(config, "k_test", "retrieval evaluation"), value(config, "k_test_batch_size"),
                       value(config, "low_resource_eval"), value(config, "tie_rule"))
        if settings.tie_rule not in TIE_RULES:
            raise ConfigError(f"tie_rule must be one of {TIE_RULES}, got {settings.tie_rule!r}")
        return settings


def my_shard(num_items: int, unit: int) -> range:
    """This rank's items, in whole batches of ``unit``: any process count computes the same batches."""
    return shard_indices(num_items, get_world_size(), get_rank(), unit)


def gather_in_rank_order(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate every rank's pieces in rank order: the dataset order of shard_indices.
    A rank may have none (more ranks than batches). Several pieces are gathered on the CPU."""
    if get_world_size() == 1 and len(pieces) == 1:
        return pieces[0]  # nothing to gather, and no copy of a possibly huge token cache
    return torch.cat([piece for rank_pieces in gather_objects([p.cpu() for p in pieces])
                      for piece in rank_pieces])


@torch.no_grad()
def cache_video_tokens(model, loader, device: torch.device, autocast: Callable[[], AbstractContextManager],
                       low_resource: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every video's output tokens (the ITM cache) and ITC feature, gathered in dataset order.

    The cache is the memory peak of long-video evaluation: low_resource keeps it in fp16 on
    the CPU, and each batch is written into one preallocated tensor (a list of batches plus
    its concatenation would need twice the memory) and dropped before the next is encoded.
    A NaN or inf in a batch's tokens (as cached: fp16 may overflow) or features raises
    NonFiniteError naming the batch and the first such video (its dataset index).
    """
    cache_device, cache_dtype = ("cpu", torch.float16) if low_resource else (device, torch.float32)
    video_tokens, video_feats, filled = None, [], 0
    for batch, (video, indices) in enumerate(MetricLogger().log_every(loader, 10, "Encoding videos:")):
        with autocast():
            tokens, feat = model.encode_video(video.to(device, non_blocking=True))
        if video_tokens is None:
            video_tokens = torch.empty((len(loader.sampler), *tokens.shape[1:]), dtype=cache_dtype,
                                       device=cache_device)
        video_tokens[filled:filled + len(tokens)] = tokens
        for name, values in (("video tokens", video_tokens[filled:filled + len(tokens)]), ("video features", feat)):
            require_finite(values, lambda row: f"non-finite {name} in evaluation batch {batch} "
                                               f"(first at video {int(indices[row])})")
        filled += len(tokens)
        video_feats.append(feat.float())
        del tokens  # else it lives on while the next batch is encoded: two batches beside the cache
    video_tokens = gather_in_rank_order([] if video_tokens is None else [video_tokens]).to(cache_device)
    return video_tokens, gather_in_rank_order(video_feats)


@torch.no_grad()
def encode_texts(model, texts: list[str], autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention masks (all texts) and ITC features (gathered from every rank's shard).
    A NaN or inf in the features raises NonFiniteError naming the first such text."""
    input_ids, attention_mask = model.tokenize(texts)
    text_feats = []
    shard = my_shard(len(texts), TEXT_BATCH)
    for start in range(shard.start, shard.stop, TEXT_BATCH):
        stop = min(start + TEXT_BATCH, shard.stop)
        with autocast():
            text_feats.append(model.encode_text(input_ids[start:stop], attention_mask[start:stop])[1].float())
        require_finite(text_feats[-1], lambda row: f"non-finite text features in text batch {start // TEXT_BATCH} "
                                                   f"(first at text {start + row})")
    return input_ids, attention_mask, gather_in_rank_order(text_feats)


@torch.no_grad()
def score_matrices(model, loader, texts: list[str], device: torch.device, autocast,
                   settings: RetrievalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(text x video, video x text) scores on the CPU: ITC for all pairs, ITM + ITC on each
    query's top k_test, -100 elsewhere.

    Every rank encodes its shard of the texts and videos; the features are gathered, and
    each rank re-ranks its shard of the queries, so the result equals a single process's.
    A NaN or inf in the text or video features (checked as they are encoded) or in the
    re-ranked scores raises NonFiniteError (the ITC similarities, products of finite unit
    vectors, cannot hold one).
    """
    model.eval()
    input_ids, attention_mask, text_feat = encode_texts(model, texts, autocast)
    video_tokens, video_feat = cache_video_tokens(model, loader, device, autocast, settings.low_resource)
    sims = video_feat.to(device) @ text_feat.to(device).T  # one may sit on the CPU after a gather
    k, batch = settings.k_test, settings.k_test_batch_size
    parts = []
    for matrix, video_rows in ((sims, True), (sims.T, False)):
        rows = torch.tensor(my_shard(matrix.shape[0], rows_per_itm_batch(k, batch)), dtype=torch.long)
        with autocast():
            part = rerank_scores(model, matrix, k, video_tokens, input_ids, attention_mask, rows, video_rows, batch)
        parts.append(gather_in_rank_order([part]).cpu())  # saved, zipped and ranked on the CPU
        query, direction = ("video", "video-to-text") if video_rows else ("text", "text-to-video")
        require_finite(parts[-1], lambda row: f"non-finite ITM scores in {direction} re-ranking (first at {query} {row})")
    scores_v2t, scores_t2v = parts
    return scores_t2v, scores_v2t


def evaluate_retrieval(model, loader, dataset, device: torch.device, autocast, settings: RetrievalSettings,
                       labels_private: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """score_matrices of `dataset` (a RetrievalEvalDataset, its videos from `loader`) and their
    retrieval_metrics, as (metrics, scores_t2v, scores_v2t): what train_video_retrieval.py and the
    sweep report. `labels_private`: the split's ground truth is withheld (withholds_test_labels),
    so there are no metrics ({}), only the scores."""
    scores_t2v, scores_v2t = score_matrices(model, loader, dataset.text, device, autocast, settings)
    if labels_private:
        return {}, scores_t2v, scores_v2t
    metrics = retrieval_metrics(scores_t2v, scores_v2t, dataset.txt2video, dataset.video2txt, settings.tie_rule)
    return metrics, scores_t2v, scores_v2t


def withholds_test_labels(config: dict) -> bool:
    """Whether the config's dataset withholds its test labels (a challenge scores a submission instead)."""
    return value(config, "dataset") in PRIVATE_TEST_LABELS


def write_submission(scores_t2v: torch.Tensor, path: Path) -> None:
    """The Condensed Movies challenge's file: sim_matrix_test.npy (texts x videos) in a zip."""
    buffer = io.BytesIO()
    np.save(buffer, scores_t2v.numpy())
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("sim_matrix_test.npy", buffer.getvalue())
