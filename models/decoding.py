"""Text generation with the MED decoder: greedy, nucleus sampling and beam search.

The search functions see the decoder only through a ``step(ids, past) -> (next-token logits, past)``
function (``decoder_step`` builds one with a key/value cache), so they can be tested with a fake step.
Settings and tie-breaking follow the transformers release the released models were evaluated with.
"""
import math

import torch

from models.bert_layers import concat_encoder_inputs


@torch.no_grad()
def generate(decoder, input_ids, encoder_hidden_states=None, encoder_attention_mask=None, max_length=20,
             min_length=0, num_beams=1, do_sample=False, top_p=1.0, top_k=50, repetition_penalty=1.0,
             eos_token_id=102, pad_token_id=0):
    """Token ids (B, <= max_length) continuing the unpadded prompts ``input_ids`` (B, L) with ``decoder``
    (a ``BertLMHeadModel``).

    Greedy (default), beam search (``num_beams > 1``) or nucleus sampling (``do_sample``).
    ``encoder_hidden_states`` may hold one entry per prompt or, as BLIP passes them, one per beam.
    Lengths count the prompt. Finished sequences are padded with ``pad_token_id``.
    """
    if do_sample and num_beams > 1:
        raise ValueError("choose nucleus sampling (do_sample) or beam search (num_beams > 1), not both")
    settings = dict(max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if num_beams > 1:
        step = decoder_step(decoder, input_ids.shape[0], num_beams, encoder_hidden_states, encoder_attention_mask)
        return beam_search(step, input_ids, num_beams, **settings)
    step = decoder_step(decoder, input_ids.shape[0], 1, encoder_hidden_states, encoder_attention_mask)
    return sample_or_greedy(step, input_ids, do_sample=do_sample, top_p=top_p, top_k=top_k, **settings)


def decoder_step(decoder, batch, copies, encoder_hidden_states, encoder_attention_mask):
    """``step(ids, past) -> (next-token logits, past)``: one cached decoder step over (batch*copies) rows."""
    if encoder_hidden_states is not None:
        encoder_hidden_states, encoder_attention_mask = concat_encoder_inputs(encoder_hidden_states,
                                                                              encoder_attention_mask)
        if encoder_hidden_states.shape[0] == batch and copies > 1:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(copies, dim=0)
            if encoder_attention_mask is not None:
                encoder_attention_mask = encoder_attention_mask.repeat_interleave(copies, dim=0)
        if encoder_hidden_states.shape[0] != batch * copies:
            raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}; expected "
                             f"{batch} (one per prompt) or {batch * copies} (one per beam)")
    mode = "text" if encoder_hidden_states is None else "multimodal"

    def step(ids, past):
        # With a cache only the newest token is fed; earlier positions come from the cached keys/values.
        new_ids = ids if past is None else ids[:, -1:]
        out = decoder(new_ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_mask=encoder_attention_mask, mode=mode, past_key_values=past,
                      use_cache=True)
        return out.logits[:, -1, :].float(), out.past_key_values

    return step


def penalise_repetitions(scores, ids, penalty):
    """CTRL's repetition penalty: scores of already generated tokens move towards less likely."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, ids, seen)


def adjust_scores(scores, ids, min_length, repetition_penalty, eos_token_id):
    scores = penalise_repetitions(scores, ids, repetition_penalty)
    if ids.shape[1] < min_length:
        scores[:, eos_token_id] = -math.inf
    return scores


def nucleus_filter(logits, top_p, top_k):
    """Keep the ``top_k`` best tokens, then the smallest set whose probability reaches ``top_p``."""
    if 0 < top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # A token is dropped when the tokens before it strictly exceed top_p, so the best one always stays.
        # Strictly, as in the transformers release TESTA pins (4.21.1): tokens summing to exactly top_p still
        # admit the next one (releases from late 2022 on drop it).
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def reorder_cache(past, rows):
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in past)


def sample_or_greedy(step, ids, max_length, min_length, repetition_penalty, eos_token_id, pad_token_id,
                     do_sample, top_p, top_k):
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    past = None
    while ids.shape[1] < max_length and unfinished.any():
        logits, past = step(ids, past)
        scores = adjust_scores(logits, ids, min_length, repetition_penalty, eos_token_id)
        if do_sample:
            probs = nucleus_filter(scores, top_p, top_k).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        ids = torch.cat([ids, next_tokens[:, None]], dim=1)
        unfinished &= next_tokens != eos_token_id
    return ids


class BeamHypotheses:
    """The ``num_beams`` best finished sequences of one prompt, scored by length-normalised log-probability.

    Equal scores are resolved as HF's scorer does, which matters for exact parity: a full list only admits a
    strictly better sequence, which evicts the earliest added of the worst; the best is the latest added of
    the top-scoring ones.
    """

    def __init__(self, num_beams):
        self.num_beams = num_beams
        self.finished = []  # (score, ids), in the order they were added

    def worst_score(self):
        return min(score for score, _ in self.finished)

    def add(self, ids, sum_log_probs):
        score = sum_log_probs / ids.shape[0]
        if len(self.finished) == self.num_beams:
            if score <= self.worst_score():
                return
            # min() returns the first of equal minima, i.e. the earliest added.
            worst = min(range(self.num_beams), key=lambda i: self.finished[i][0])
            del self.finished[worst]
        self.finished.append((score, ids))

    def is_done(self, best_running_sum, length):
        # No running beam can still beat the worst kept hypothesis.
        return (len(self.finished) == self.num_beams
                and self.worst_score() >= best_running_sum / length)

    def best(self):
        # max() returns the first of equal maxima; scanning newest first picks the latest added.
        return max(reversed(self.finished), key=lambda item: item[0])[1]


def beam_search(step, ids, num_beams, max_length, min_length, repetition_penalty, eos_token_id, pad_token_id):
    """Beam search as the released models were evaluated with (HF's scorer, length penalty 1, no early stop).

    A beam ending in eos becomes a finished hypothesis (scored without the eos) if it ranks among the
    ``num_beams`` best candidates of its step; running beams are refilled from the next best non-eos ones.
    """
    batch = ids.shape[0]
    ids = ids.repeat_interleave(num_beams, dim=0)
    # Only the first copy of each prompt starts live, so the first step does not pick the same token n times.
    beam_scores = torch.zeros(batch, num_beams, device=ids.device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hypotheses = [BeamHypotheses(num_beams) for _ in range(batch)]
    done = [False] * batch
    past = None
    while ids.shape[1] < max_length:
        logits, past = step(ids, past)
        scores = adjust_scores(logits.log_softmax(dim=-1), ids, min_length, repetition_penalty, eos_token_id)
        vocab = scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(batch, num_beams * vocab)
        top_scores, top_indices = scores.topk(2 * num_beams, dim=1)
        next_scores, next_tokens, next_rows = _select_next_beams(ids, top_scores, top_indices, vocab, hypotheses,
                                                                 done, eos_token_id, pad_token_id)
        if all(done):
            break
        rows = next_rows.view(-1)
        ids = torch.cat([ids[rows], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)
        past = reorder_cache(past, rows)
    return _best_sequences(ids, beam_scores, hypotheses, done, max_length, eos_token_id, pad_token_id)


def _select_next_beams(ids, top_scores, top_indices, vocab, hypotheses, done, eos_token_id, pad_token_id):
    """One beam-search step for every prompt not yet ``done``, from its ``2 * num_beams`` best candidates.

    Adds the finished hypotheses to ``hypotheses`` and updates ``done`` in place; returns the running
    beams' summed log-probabilities, last tokens and source rows in ``ids``, each (batch, num_beams).
    """
    batch, num_beams = top_scores.shape[0], hypotheses[0].num_beams
    next_scores = torch.zeros(batch, num_beams, device=ids.device)
    next_tokens = torch.full((batch, num_beams), pad_token_id, dtype=torch.long, device=ids.device)
    next_rows = torch.arange(batch * num_beams, device=ids.device).view(batch, num_beams)
    for b in range(batch):
        if done[b]:
            continue
        kept = 0
        for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_indices[b].tolist())):
            row, token = b * num_beams + index // vocab, index % vocab
            if token == eos_token_id:
                if rank < num_beams:
                    hypotheses[b].add(ids[row].clone(), score)
                continue
            next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = score, token, row
            kept += 1
            if kept == num_beams:
                break
        done[b] = hypotheses[b].is_done(top_scores[b].max().item(), ids.shape[1])
    return next_scores, next_tokens, next_rows


def _best_sequences(ids, beam_scores, hypotheses, done, max_length, eos_token_id, pad_token_id):
    """The best hypothesis of every prompt (running beams count when the search ran out of length),
    stacked to (batch, <= max_length) and padded with ``pad_token_id``."""
    num_beams = hypotheses[0].num_beams
    for b, prompt_hypotheses in enumerate(hypotheses):
        if not done[b]:
            for beam in range(num_beams):
                row = b * num_beams + beam
                prompt_hypotheses.add(ids[row].clone(), beam_scores[row].item())
    best = [h.best() for h in hypotheses]
    # Sequences stopped before max_length get their eos back; the rest is padding.
    length = min(max(len(seq) for seq in best) + 1, max_length)
    out = torch.full((len(best), length), pad_token_id, dtype=torch.long, device=ids.device)
    for b, seq in enumerate(best):
        out[b, :len(seq)] = seq
        if len(seq) < max_length:
            out[b, len(seq)] = eos_token_id
    return out
