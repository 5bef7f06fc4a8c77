"""Video-language pre-training with BLIP's three objectives: ITC, ITM and LM captioning."""
from __future__ import annotations

import torch
from torch import nn

from models.contrastive import VideoTextContrastive
from models.med import tie_encoder_decoder_weights

CAPTION_TOKENS = 30  # the released pre-training used a fixed caption length
# BLIP's captioner samples with this fixed penalty; its repetition_penalty argument reaches beam search only.
SAMPLING_REPETITION_PENALTY = 1.1


class VideoPretrainModel(VideoTextContrastive):
    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, text_decoder: nn.Module, tokenizer,
                 embed_dim: int = 256, queue_size: int = 57600, momentum: float = 0.995):
        super().__init__(visual_encoder, text_encoder, tokenizer, embed_dim, queue_size, momentum)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.text_decoder = text_decoder
        # The decoder shares everything but self-attention with the encoder, as BLIP ties them.
        tie_encoder_decoder_weights(self.text_encoder, self.text_decoder.bert, skip_key="/attention")

    def queue_pointer(self) -> torch.Tensor:
        return self.queue_ptr

    def forward(self, video: torch.Tensor, captions: list[str], alpha: float,
                images: torch.Tensor | None = None, image_captions: list[str] | None = None) -> dict:
        """Losses for a video batch, plus an image pseudo-video batch when given (``--sep_img``).

        The two batches have different frame counts, so they are encoded separately; their
        losses are averaged. One call keeps DDP's one-forward-per-backward contract.
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        losses = self.batch_losses(video, captions, alpha)
        if images is not None:
            image_losses = self.batch_losses(images, image_captions, alpha)
            losses = {name: (value + image_losses[name]) / 2 for name, value in losses.items()}
        return losses

    def batch_losses(self, video: torch.Tensor, captions: list[str], alpha: float) -> dict:
        text = self.tokenizer(captions, padding="max_length", truncation=True, max_length=CAPTION_TOKENS,
                              return_tensors="pt")
        input_ids, attention_mask = text.input_ids.to(video.device), text.attention_mask.to(video.device)
        video_tokens, image_feat = self.encode_video(video)
        _, text_feat = self.encode_text(input_ids, attention_mask)

        batch = video.shape[0]
        same_pair = torch.eye(batch, dtype=torch.bool, device=video.device)
        hard_targets = torch.zeros(batch, batch + self.queue_size, device=video.device)
        hard_targets[:, :batch] = same_pair.float()
        with torch.no_grad():
            self.momentum_update()
            _, image_feat_m = self.encode_video(video, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
        loss_ita = self.contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, hard_targets, alpha)
        self.enqueue(image_feat_m, text_feat_m)

        loss_itm = self.matching_loss(video_tokens, image_feat, text_feat, self.with_enc_token(input_ids),
                                      attention_mask, same_pair, gather_all_ranks=False)
        loss_lm = self.caption_loss(video_tokens, input_ids, attention_mask)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm, "loss_lm": loss_lm}

    def caption_loss(self, video_tokens: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.tokenizer.bos_token_id
        targets = decoder_ids.masked_fill(decoder_ids == self.tokenizer.pad_token_id, -100)
        video_atts = torch.ones(video_tokens.shape[:-1], dtype=torch.long, device=video_tokens.device)
        return self.text_decoder(decoder_ids, attention_mask=attention_mask, encoder_hidden_states=video_tokens,
                                 encoder_attention_mask=video_atts, labels=targets).loss

    @torch.no_grad()
    def generate_caption_ids(self, video: torch.Tensor, sample: bool = False, num_beams: int = 3,
                             max_length: int = 30, min_length: int = 10, top_p: float = 0.9,
                             repetition_penalty: float | None = None) -> torch.Tensor:
        """Caption ids (B, <= max_length) from [DEC], by beam search or, when ``sample``, nucleus sampling.

        ``repetition_penalty=None`` takes BLIP's: none for beam search, 1.1 for sampling. ``video`` is
        a clip (B, C, T, H, W), or (B, N, D) tokens the video encoder gave before (an index's).
        """
        if repetition_penalty is None:
            repetition_penalty = SAMPLING_REPETITION_PENALTY if sample else 1.0
        video_tokens = video if video.dim() == 3 else self.visual_encoder(video)
        beams = 1 if sample else num_beams
        video_tokens = video_tokens.repeat_interleave(beams, dim=0)
        video_atts = torch.ones(video_tokens.shape[:-1], dtype=torch.long, device=video.device)
        start = torch.full((video.shape[0], 1), self.tokenizer.bos_token_id, device=video.device)
        return self.text_decoder.generate(start, encoder_hidden_states=video_tokens,
                                          encoder_attention_mask=video_atts, num_beams=beams,
                                          do_sample=sample, top_p=top_p, max_length=max_length,
                                          min_length=min_length, repetition_penalty=repetition_penalty,
                                          eos_token_id=self.tokenizer.sep_token_id,
                                          pad_token_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def generate_captions(self, video: torch.Tensor, **settings) -> list[str]:
        """Captions for videos; ``settings`` as for ``generate_caption_ids``."""
        return self.tokenizer.batch_decode(self.generate_caption_ids(video, **settings), skip_special_tokens=True)
