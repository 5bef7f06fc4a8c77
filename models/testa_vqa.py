"""TESTA video question answering: the question cross-attends to the video, the answer is decoded.

Inference ``rank`` scores a fixed answer list (top-k by first-token probability, then
re-ranked by the whole answer's decoder loss); ``generate`` decodes freely with beam search.
"""
from __future__ import annotations

import torch
from torch import nn


class VideoQAModel(nn.Module):
    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, text_decoder: nn.Module, tokenizer,
                 max_question_tokens: int = 35):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_question_tokens = max_question_tokens
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder

    @property
    def device(self) -> torch.device:
        return self.visual_encoder.cls_token.device

    def encode_question(self, video: torch.Tensor, questions: list[str]):
        """Question states (B, Lq, D) cross-attending to the video, and the question mask. `video` is
        a clip (B, C, T, H, W), or (B, N, D) tokens the video encoder gave before (an index's)."""
        video_tokens = video if video.dim() == 3 else self.visual_encoder(video)
        video_atts = torch.ones(video_tokens.shape[:-1], dtype=torch.long, device=video_tokens.device)
        question = self.tokenizer(questions, padding="longest", truncation=True,
                                  max_length=self.max_question_tokens, return_tensors="pt")
        ids = question.input_ids.to(video.device)
        ids[:, 0] = self.tokenizer.enc_token_id
        mask = question.attention_mask.to(video.device)
        states = self.text_encoder(ids, attention_mask=mask, encoder_hidden_states=video_tokens,
                                   encoder_attention_mask=video_atts).last_hidden_state
        return states, mask

    def tokenize_answers(self, answers: list[str]):
        """Answer ids with [DEC] as the first token, their mask, and targets with padding ignored."""
        answer = self.tokenizer(answers, padding="longest", return_tensors="pt")
        ids = answer.input_ids.to(self.device)
        ids[:, 0] = self.tokenizer.bos_token_id
        targets = ids.masked_fill(ids == self.tokenizer.pad_token_id, -100)
        return ids, answer.attention_mask.to(self.device), targets

    def forward(self, video: torch.Tensor, questions: list[str], answers: list[str], n: list[int] | torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Training loss: each question has ``n[b]`` answers with ``weights`` (summed per question)."""
        states, mask = self.encode_question(video, questions)
        repeats = torch.as_tensor(n, device=states.device)
        answer_ids, answer_mask, targets = self.tokenize_answers(answers)
        per_answer = self.text_decoder(answer_ids, attention_mask=answer_mask,
                                       encoder_hidden_states=states.repeat_interleave(repeats, dim=0),
                                       encoder_attention_mask=mask.repeat_interleave(repeats, dim=0),
                                       labels=targets, reduction="none").loss
        return (weights.to(per_answer.device) * per_answer).sum() / video.shape[0]

    @torch.no_grad()
    def score_answers(self, video: torch.Tensor, questions: list[str], answer_ids: torch.Tensor,
                      answer_mask: torch.Tensor, k: int):
        """How `rank` inference scores an answer list: (first-token probability of every answer
        (B, A), the indices of each question's top ``k`` answers by it (B, k), and their scores
        (B, k): minus the decoder's label-smoothed loss summed over the answer's tokens, which is
        what the released models were ranked by).

        ``answer_ids`` come from ``tokenize_answers(answer_list)``.
        """
        states, mask = self.encode_question(video, questions)
        num_questions = states.shape[0]
        start = answer_ids[:1, :1].expand(num_questions, 1)
        first_logits = self.text_decoder(start, encoder_hidden_states=states, encoder_attention_mask=mask,
                                         return_logits=True).logits[:, 0, :]
        first_token_probs = first_logits.softmax(dim=1).index_select(1, answer_ids[:, 1])
        k = min(k, answer_ids.shape[0])
        top_ids = first_token_probs.topk(k, dim=1).indices
        candidate_ids = answer_ids[top_ids.reshape(-1)]
        candidate_mask = answer_mask[top_ids.reshape(-1)]
        targets = candidate_ids.masked_fill(candidate_ids == self.tokenizer.pad_token_id, -100)
        loss = self.text_decoder(candidate_ids, attention_mask=candidate_mask,
                                 encoder_hidden_states=states.repeat_interleave(k, dim=0),
                                 encoder_attention_mask=mask.repeat_interleave(k, dim=0),
                                 labels=targets, reduction="none").loss
        return first_token_probs, top_ids, (-loss).view(num_questions, k)

    @torch.no_grad()
    def rank_answers(self, video: torch.Tensor, questions: list[str], answer_ids: torch.Tensor,
                     answer_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Index into the answer list of the best answer per question: the best-scored of the
        top ``k`` by first-token probability (see score_answers)."""
        _, top_ids, scores = self.score_answers(video, questions, answer_ids, answer_mask, k)
        return top_ids.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def generate_answer_ids(self, video: torch.Tensor, questions: list[str], num_beams: int = 3,
                            max_length: int = 10, min_length: int = 1) -> torch.Tensor:
        """Beam-searched answers (B, <= max_length) as the decoder returns them: [DEC] first, then the
        answer, its [SEP] and [PAD] up to the longest answer of the batch."""
        states, _ = self.encode_question(video, questions)
        start = torch.full((states.shape[0], 1), self.tokenizer.bos_token_id, device=states.device)
        # The original decodes over every question token: padding included, the question mask unused.
        states = states.repeat_interleave(num_beams, 0)
        return self.text_decoder.generate(start, encoder_hidden_states=states,
                                          encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                            device=states.device),
                                          num_beams=num_beams, max_length=max_length, min_length=min_length,
                                          eos_token_id=self.tokenizer.sep_token_id,
                                          pad_token_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def generate_answers(self, video: torch.Tensor, questions: list[str], num_beams: int = 3,
                         max_length: int = 10, min_length: int = 1) -> list[str]:
        ids = self.generate_answer_ids(video, questions, num_beams, max_length, min_length)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
