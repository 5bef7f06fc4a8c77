"""TESTA video-paragraph retrieval: ITC + ITM, with an index queue so every text of a video is a positive."""
from __future__ import annotations

import torch
from torch import nn

from models.contrastive import VideoTextContrastive
from runtime.distributed import concat_all_gather


class VideoRetrievalModel(VideoTextContrastive):
    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, tokenizer, embed_dim: int = 256,
                 queue_size: int = 57600, momentum: float = 0.995, negative_all_rank: bool = False,
                 max_words: int = 35):
        super().__init__(visual_encoder, text_encoder, tokenizer, embed_dim, queue_size, momentum)
        self.negative_all_rank = negative_all_rank
        self.max_words = max_words
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))

    def queue_pointer(self) -> torch.Tensor:
        return self.ptr_queue

    def tokenize(self, captions: list[str]):
        device = self.temp.device
        text = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_words,
                              return_tensors="pt")
        return text.input_ids.to(device), text.attention_mask.to(device)

    def forward(self, video: torch.Tensor, captions: list[str], alpha: float, idx: torch.Tensor) -> dict:
        """Training losses for videos (B, C, T, H, W), their captions and video indices (B,)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        input_ids, attention_mask = self.tokenize(captions)
        video_tokens, image_feat = self.encode_video(video)
        _, text_feat = self.encode_text(input_ids, attention_mask)

        idx = idx.view(-1, 1).to(video.device)
        idx_all = torch.cat([idx.T, self.idx_queue.clone().detach()], dim=1)
        positives = torch.eq(idx, idx_all).float()
        hard_targets = positives / positives.sum(dim=1, keepdim=True)
        with torch.no_grad():
            self.momentum_update()
            _, image_feat_m = self.encode_video(video, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
        loss_ita = self.contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, hard_targets, alpha)
        idxs = concat_all_gather(idx)
        self.enqueue(image_feat_m, text_feat_m, idxs)

        same_video = torch.eq(idx, idxs.T) if self.negative_all_rank else torch.eq(idx, idx.T)
        loss_itm = self.matching_loss(video_tokens, image_feat, text_feat, self.with_enc_token(input_ids),
                                      attention_mask, same_video, gather_all_ranks=self.negative_all_rank)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}

    @torch.no_grad()
    def itm_scores(self, video_tokens: torch.Tensor, video_index: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, text_index: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """ITM match logits for the pairs (video_index[i], text_index[i]), ``batch_size`` pairs per pass.

        ``video_tokens`` may live on another device or in half precision (``--low_resource_eval``):
        each batch is moved and cast to the model's device and dtype on the fly. A video that
        several pairs of a batch share (video-to-text re-ranking: all of a query's candidates) is
        moved, and its cross-attention keys/values computed, once for all of them.
        """
        device, dtype = self.itm_head.weight.device, self.itm_head.weight.dtype
        scores = torch.empty(len(video_index), device=device)
        for start in range(0, len(video_index), batch_size):
            videos = video_index[start:start + batch_size]
            texts = text_index[start:start + batch_size].to(input_ids.device)
            distinct, pair_rows = videos.unique(return_inverse=True)
            shared = len(distinct) < len(videos)
            rows = distinct if shared else videos
            tokens = _rows_as(video_tokens, rows, device, dtype)
            logits = self.itm_logits(self.with_enc_token(input_ids[texts]).to(device),
                                     attention_mask[texts].to(device), tokens,
                                     pair_rows.to(device) if shared else None)
            scores[start:start + batch_size] = logits[:, 1].float()
        return scores


def _rows_as(tokens: torch.Tensor, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tokens[rows]`` on ``device`` in ``dtype``, converted row by row when the cache is elsewhere
    or in half precision, so that no half-precision copy of the whole batch exists beside it."""
    if tokens.device == device and tokens.dtype == dtype:
        return tokens[rows.to(device)]
    out = torch.empty((len(rows), *tokens.shape[1:]), device=device, dtype=dtype)
    for slot, row in enumerate(rows.tolist()):
        out[slot].copy_(tokens[row])
    return out


def rows_per_itm_batch(k: int, batch_size: int) -> int:
    """Queries whose top-k pairs fill one ITM batch of about ``batch_size`` pairs."""
    return max(1, batch_size // k)


@torch.no_grad()
def rerank_scores(model: VideoRetrievalModel, sims: torch.Tensor, k: int, video_tokens: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, video_rows: bool,
                  batch_size: int = 128) -> torch.Tensor:
    """Scores of the given query ``rows`` of ``sims``: ITM + ITC on each row's top ``k``, -100 elsewhere.

    ``sims`` is video x text when ``video_rows`` (video-to-text), else text x video. The
    pairs of ``rows_per_itm_batch`` whole rows go through ITM together, instead of one query
    at a time; a caller that shards rows in such groups gets the batches a single process gets.
    """
    rows = rows.to(sims.device)
    k = min(k, sims.shape[1])
    top_sims, top_columns = sims[rows].topk(k, dim=1)
    scores = torch.full((len(rows), sims.shape[1]), -100.0, device=sims.device)
    group = rows_per_itm_batch(k, batch_size)
    for start in range(0, len(rows), group):
        stop = min(start + group, len(rows))
        query = rows[start:stop].repeat_interleave(k)
        candidate = top_columns[start:stop].reshape(-1)
        videos, texts = (query, candidate) if video_rows else (candidate, query)
        itm = model.itm_scores(video_tokens, videos, input_ids, attention_mask, texts, len(query))
        scores[start:stop].scatter_(1, top_columns[start:stop],
                                    itm.to(sims.device).view(stop - start, k) + top_sims[start:stop].float())
    return scores
