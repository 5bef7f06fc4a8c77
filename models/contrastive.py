"""What pre-training and retrieval share: momentum encoders, feature queues, ITC and ITM.

``VideoTextContrastive`` holds the modules in the order of the released state
dicts (visual_encoder, text_encoder, vision_proj, text_proj, itm_head, then the
momentum copies), so subclasses only add what is their own.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from runtime.distributed import all_gather_with_grad, concat_all_gather


def momentum_distilled_targets(momentum_logits: torch.Tensor, hard_targets: torch.Tensor,
                               alpha: float) -> torch.Tensor:
    """Soft ITC targets: the momentum model's distribution mixed with the ground truth."""
    return alpha * F.softmax(momentum_logits, dim=1) + (1 - alpha) * hard_targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def sample_hard_negatives(weights: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn in proportion to ``weights`` among the non-positive columns.

    A row whose candidates are all positives (a batch of one video, say), or whose weights hold
    a NaN or inf (a diverged model), falls back to uniform sampling over its columns rather than
    failing inside multinomial: the forward pass ends, and the training loop reports the
    non-finite loss in one line.
    """
    weights = weights.masked_fill(positives, 0)
    row_sums = weights.sum(dim=1)
    empty = ~(torch.isfinite(row_sums) & (row_sums > 0))
    if empty.any():
        weights[empty] = 1.0
    return torch.multinomial(weights, 1).squeeze(1)


class VideoTextContrastive(nn.Module):
    """Video and text encoders with projections, an ITM head, momentum copies and queues."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, tokenizer,
                 embed_dim: int = 256, queue_size: int = 57600, momentum: float = 0.995):
        super().__init__()
        vision_width = visual_encoder.embed_dim
        text_width = text_encoder.config.hidden_size
        self.tokenizer = tokenizer
        self.momentum = momentum
        self.queue_size = queue_size
        self.temp = nn.Parameter(torch.tensor(0.07))

        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m = copy.deepcopy(visual_encoder)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = copy.deepcopy(text_encoder)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                            (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]
        self.copy_params()

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))

    # -- encoders ---------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor, momentum: bool = False):
        """(B, C, T, H, W) -> tokens (B, N, D) and the L2-normalised ITC feature (B, E)."""
        encoder, proj = (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder,
                                                                                      self.vision_proj)
        tokens = encoder(video)
        # TESTA pools every output token (the [CLS] included), not the [CLS] alone.
        return tokens, F.normalize(proj(tokens.mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False):
        encoder, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        hidden = encoder(input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
        return hidden, F.normalize(proj(hidden[:, 0, :]), dim=-1)

    def itm_logits(self, itm_input_ids, attention_mask, video_tokens, video_index=None) -> torch.Tensor:
        """Match logits (N, 2) of [ENC]-prefixed texts cross-attending to video tokens.

        ``video_index`` (N,), if given, names each text's row of ``video_tokens``: texts that share
        a video share its cross-attention keys/values (see BertModel.forward).
        """
        video_atts = torch.ones(video_tokens.shape[:-1], dtype=torch.long, device=video_tokens.device)
        hidden = self.text_encoder(itm_input_ids, attention_mask=attention_mask, encoder_hidden_states=video_tokens,
                                   encoder_attention_mask=video_atts,
                                   encoder_batch_index=video_index).last_hidden_state
        return self.itm_head(hidden[:, 0, :])

    def with_enc_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        return ids

    # -- momentum encoders and queues -------------------------------------------------
    @torch.no_grad()
    def copy_params(self) -> None:
        for model, model_m in self.model_pairs:
            for param, param_m in zip(model.parameters(), model_m.parameters()):
                param_m.data.copy_(param.data)
                param_m.requires_grad = False

    @torch.no_grad()
    def momentum_update(self) -> None:
        for model, model_m in self.model_pairs:
            for param, param_m in zip(model.parameters(), model_m.parameters()):
                param_m.data.mul_(self.momentum).add_(param.data, alpha=1 - self.momentum)

    def queue_pointer(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def set_queues(self, queues: dict[str, torch.Tensor]) -> None:
        """Start from given feature queues, e.g. those another run began with: ``queues`` maps
        queue buffer names (image_queue, text_queue, and the subclass's pointer and index
        queues) to tensors of their shapes. Names left out keep their values."""
        buffers = dict(self.named_buffers())
        for name, tensor in queues.items():
            if "queue" not in name or name not in buffers:
                raise KeyError(f"{name!r} is not a queue of {type(self).__name__}; its queues: "
                               f"{[n for n in buffers if 'queue' in n]}")
            if tensor.shape != buffers[name].shape:
                raise ValueError(f"{name}: expected shape {tuple(buffers[name].shape)}, got {tuple(tensor.shape)}")
            buffers[name].copy_(tensor)

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idxs: torch.Tensor | None = None) -> None:
        """Write the features of every rank into the queues (ring buffer, wrapping around)."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        pointer = self.queue_pointer()
        start = int(pointer)
        positions = (torch.arange(image_feats.shape[0], device=image_feats.device) + start) % self.queue_size
        self.image_queue[:, positions] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, positions] = text_feats.T.to(self.text_queue.dtype)
        if idxs is not None:
            self.idx_queue[:, positions] = idxs.T
        pointer[0] = (start + image_feats.shape[0]) % self.queue_size

    # -- objectives -------------------------------------------------------------------
    def contrastive_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, hard_targets, alpha):
        """ITC against the momentum features of this batch and the queue (both directions)."""
        image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone().detach()], dim=1)
        with torch.no_grad():
            i2t_targets = momentum_distilled_targets(image_feat_m @ text_feat_all / self.temp, hard_targets, alpha)
            t2i_targets = momentum_distilled_targets(text_feat_m @ image_feat_all / self.temp, hard_targets, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        return (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2

    def matching_loss(self, video_tokens, image_feat, text_feat, itm_ids, attention_mask, positives,
                      gather_all_ranks: bool) -> torch.Tensor:
        """ITM with one hard negative video per text and one hard negative text per video.

        ``positives`` (B, B*world or B) marks pairs that must not be drawn as negatives.
        Negatives are drawn by ITC similarity, from every rank when ``gather_all_ranks``.
        """
        batch = video_tokens.shape[0]
        if gather_all_ranks:
            image_feat_pool, text_feat_pool = concat_all_gather(image_feat), concat_all_gather(text_feat)
            tokens_pool = all_gather_with_grad(video_tokens)
            ids_pool, mask_pool = concat_all_gather(itm_ids), concat_all_gather(attention_mask)
        else:
            image_feat_pool, text_feat_pool = image_feat, text_feat
            tokens_pool, ids_pool, mask_pool = video_tokens, itm_ids, attention_mask
        with torch.no_grad():
            weights_t2i = F.softmax(text_feat @ image_feat_pool.T / self.temp, dim=1)
            weights_i2t = F.softmax(image_feat @ text_feat_pool.T / self.temp, dim=1)
            negative_video = sample_hard_negatives(weights_t2i.float(), positives)
            negative_text = sample_hard_negatives(weights_i2t.float(), positives)
        texts_all = torch.cat([itm_ids, itm_ids, ids_pool[negative_text]])
        masks_all = torch.cat([attention_mask, attention_mask, mask_pool[negative_text]])
        videos_all = torch.cat([video_tokens, tokens_pool[negative_video], video_tokens])
        logits = self.itm_logits(texts_all, masks_all, videos_all)
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
        return F.cross_entropy(logits, labels.to(logits.device))
