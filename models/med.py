"""BLIP's mixture of encoder-decoder (MED) BERT in plain PyTorch.

One BERT body serves as text encoder (bidirectional, ``mode='text'``), image/video-grounded
encoder (cross-attention to visual tokens in every layer, ``mode='multimodal'``) and, with a
causal mask and an LM head, as decoder. Parameter names follow the released checkpoints
(``embeddings.*``, ``encoder.layer.N.{attention,crossattention,intermediate,output}.*``,
``cls.predictions.*``). Written against ``torch`` only so that checkpoints keep loading
whatever transformers release is installed.
"""
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# BERT's additive mask value; the released models were trained with it.
MASK_VALUE = -10000.0


class BertConfig:
    """Attribute bag with BERT's defaults, filled from a JSON file such as configs/med_config.json."""

    DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, initializer_range=0.02,
                    layer_norm_eps=1e-12, pad_token_id=0, add_cross_attention=False, encoder_width=None)

    def __init__(self, **kwargs):
        for key, value in {**self.DEFAULTS, **kwargs}.items():
            setattr(self, key, value)
        if self.encoder_width is None:
            self.encoder_width = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_json_file(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    past_key_values: Optional[tuple] = None


@dataclass
class LMOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    past_key_values: Optional[tuple] = None


def rows_for(tensor, index):
    """``tensor[index]`` along dim 0; one shared row is broadcast (a view) rather than copied."""
    if tensor.shape[0] == 1:
        return tensor.expand(len(index), *tensor.shape[1:])
    return tensor.index_select(0, index)


def additive_mask(mask, dtype):
    """(1 - mask) * -10000 broadcast over heads: (B, Lk) -> (B, 1, 1, Lk), (B, Lq, Lk) -> (B, 1, Lq, Lk)."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    else:
        raise ValueError(f"attention mask must be (batch, keys) or (batch, queries, keys), got {tuple(mask.shape)}")
    return (1.0 - mask.to(dtype)) * MASK_VALUE


def causal_padding_mask(attention_mask, num_queries):
    """Decoder mask (B, Lq, Lk): query i sees every cached key and the new keys up to itself, minus padding.

    With a cache of ``Lk - Lq`` keys the new queries sit at the end, so the cached prefix is always visible.
    """
    batch, num_keys = attention_mask.shape
    positions = torch.arange(num_queries, device=attention_mask.device)
    causal = (positions[None, :] <= positions[:, None]).to(attention_mask.dtype)
    prefix = torch.ones(num_queries, num_keys - num_queries, dtype=attention_mask.dtype,
                        device=attention_mask.device)
    causal = torch.cat([prefix, causal], dim=1)
    return causal[None] * attention_mask[:, None, :]


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (BLIP drops token types)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent: the released checkpoints contain it.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids=None, inputs_embeds=None, past_length=0):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        length = inputs_embeds.shape[1]
        positions = self.position_ids[:, past_length:past_length + length]
        return self.dropout(self.LayerNorm(inputs_embeds + self.position_embeddings(positions)))


class BertSelfAttention(nn.Module):
    """Multi-head attention; cross-attention takes keys/values of width ``encoder_width``."""

    def __init__(self, config, is_cross_attention):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        key_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_width, config.hidden_size)
        self.value = nn.Linear(key_width, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, mask, key_value_states=None, past_key_value=None, key_value_index=None):
        """Returns the attended values and the (key, value) heads to cache for the next step.

        A cache holds the keys/values of earlier tokens (self-attention: new ones are appended) or of the
        visual tokens (cross-attention: they do not change between steps, so they are reused as they are).
        ``key_value_index`` (N,) picks, for each of the N queries, its row of ``key_value_states``:
        several queries then share one row's keys/values, projected once.
        """
        query = self._heads(self.query(hidden_states))
        if key_value_states is not None and past_key_value is not None:
            key, value = past_key_value
        else:
            source = hidden_states if key_value_states is None else key_value_states
            key, value = self._heads(self.key(source)), self._heads(self.value(source))
            if key_value_index is not None:
                key, value = rows_for(key, key_value_index), rows_for(value, key_value_index)
            if past_key_value is not None:
                key = torch.cat([past_key_value[0], key], dim=2)
                value = torch.cat([past_key_value[1], value], dim=2)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None if mask is None else mask.to(query.dtype),
            dropout_p=self.dropout_prob if self.training else 0.0)
        context = context.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return context, (key, value)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), the sub-layer ending of BERT."""

    def __init__(self, config, input_size):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, mask, key_value_states=None, past_key_value=None, key_value_index=None):
        context, present = self.self(hidden_states, mask, key_value_states, past_key_value, key_value_index)
        return self.output(context, hidden_states), present


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.act(self.dense(hidden_states))


class BertLayer(nn.Module):
    """Self-attention, cross-attention to visual tokens (multimodal mode only), feed-forward."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, mask, encoder_hidden_states=None, encoder_mask=None,
                past_key_value=None, mode="multimodal", encoder_batch_index=None):
        """``past_key_value``/returned cache: (self key, self value[, cross key, cross value])."""
        past = past_key_value or ()
        hidden_states, present = self.attention(hidden_states, mask, past_key_value=past[:2] or None)
        if mode == "multimodal":
            if not hasattr(self, "crossattention"):
                raise ValueError("mode='multimodal' needs a config with add_cross_attention=True")
            hidden_states, cross_present = self.crossattention(hidden_states, encoder_mask, encoder_hidden_states,
                                                               past[2:] or None, encoder_batch_index)
            present = present + cross_present
        return self.output(self.intermediate(hidden_states), hidden_states), present


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(self.dense(hidden_states[:, 0]))


def init_bert_weights(module, std):
    """BERT initialisation: N(0, std) weights, zero biases, identity LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resized_embedding(old, num_tokens, std):
    """A new embedding table with ``num_tokens`` rows: old rows copied, new rows drawn like fresh weights."""
    new = nn.Embedding(num_tokens, old.embedding_dim, padding_idx=old.padding_idx,
                       device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(new.weight, std=std)
    keep = min(num_tokens, old.num_embeddings)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
    return new


def concat_encoder_inputs(encoder_hidden_states, encoder_attention_mask):
    """A list of visual token sets is attended jointly: concatenate tokens (and masks) along the sequence."""
    if not isinstance(encoder_hidden_states, (list, tuple)):
        return encoder_hidden_states, encoder_attention_mask
    masks = encoder_attention_mask
    if masks is None:
        masks = [None] * len(encoder_hidden_states)
    if not isinstance(masks, (list, tuple)) or len(masks) != len(encoder_hidden_states):
        raise ValueError("a list of encoder_hidden_states needs a list of encoder_attention_mask of the same length")
    masks = [torch.ones(s.shape[:2], dtype=torch.long, device=s.device) if m is None else m
             for s, m in zip(encoder_hidden_states, masks)]
    return torch.cat(list(encoder_hidden_states), dim=1), torch.cat(masks, dim=-1)


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer=False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def resize_token_embeddings(self, new_num_tokens):
        """Grow/shrink the vocabulary; mutates ``config.vocab_size`` like BLIP (a shared config sees it)."""
        self.embeddings.word_embeddings = resized_embedding(self.embeddings.word_embeddings, new_num_tokens,
                                                            self.config.initializer_range)
        self.config.vocab_size = new_num_tokens
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, mode="multimodal", is_decoder=False,
                inputs_embeds=None, past_key_values=None, use_cache=False, encoder_batch_index=None):
        """``encoder_batch_index`` (N,): the row of ``encoder_hidden_states`` each of the N texts
        cross-attends to, for texts that share visual tokens (the keys/values of a row are then
        projected once, not once per text); None means row i for text i."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=reference.device)
        if is_decoder and attention_mask.dim() == 2:
            attention_mask = causal_padding_mask(attention_mask, length)
        dtype = self.embeddings.LayerNorm.weight.dtype
        mask = additive_mask(attention_mask, dtype)

        encoder_mask = None
        if mode == "multimodal":
            if encoder_hidden_states is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (use mode='text' for text only)")
            encoder_hidden_states, encoder_attention_mask = concat_encoder_inputs(encoder_hidden_states,
                                                                                  encoder_attention_mask)
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.long,
                                                    device=encoder_hidden_states.device)
            encoder_mask = additive_mask(encoder_attention_mask, dtype)
            if encoder_batch_index is not None:
                encoder_mask = rows_for(encoder_mask, encoder_batch_index)
        elif mode != "text":
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")

        hidden_states = self.embeddings(input_ids, inputs_embeds, past_length)
        presents = []
        for index, layer in enumerate(self.encoder.layer):
            past = past_key_values[index] if past_key_values is not None else None
            hidden_states, present = layer(hidden_states, mask, encoder_hidden_states, encoder_mask, past, mode,
                                           encoder_batch_index)
            presents.append(present)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BertOutput(hidden_states, pooled, tuple(presents) if use_cache else None)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.act(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """Vocabulary projection; ``bias`` and ``decoder.bias`` are one Parameter, as in the checkpoints."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = self.decoder.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden_states):
        return self.predictions(hidden_states)


def lm_loss(logits, labels, reduction="mean", label_smoothing=0.1):
    """Next-token cross-entropy: logits at t predict labels at t+1; -100 labels are ignored.

    ``reduction='none'`` gives the per-sequence sum (shape [B]) used to rank answers.
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if reduction == "mean":
        return F.cross_entropy(shifted, targets, ignore_index=-100, label_smoothing=label_smoothing)
    if reduction == "none":
        per_token = F.cross_entropy(shifted, targets, ignore_index=-100, label_smoothing=label_smoothing,
                                    reduction="none")
        return per_token.view(logits.shape[0], -1).sum(dim=1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class BertLMHeadModel(nn.Module):
    """Causal text decoder with cross-attention and an LM head tied to the word embeddings."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.cls.apply(lambda m: init_bert_weights(m, config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def resize_token_embeddings(self, new_num_tokens):
        """Resize the tied input/output vocabulary; new output biases start at zero."""
        self.bert.resize_token_embeddings(new_num_tokens)
        self.tie_weights()
        predictions = self.cls.predictions
        old_bias = predictions.bias.detach()
        bias = torch.zeros(new_num_tokens, dtype=old_bias.dtype, device=old_bias.device)
        keep = min(new_num_tokens, old_bias.shape[0])
        bias[:keep] = old_bias[:keep]
        predictions.bias = predictions.decoder.bias = nn.Parameter(bias)
        predictions.decoder.out_features = new_num_tokens
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, reduction="mean", label_smoothing=0.1,
                return_logits=False, mode="multimodal", is_decoder=True, inputs_embeds=None,
                past_key_values=None, use_cache=False):
        """``logits`` always cover every position; ``return_logits=True`` (BLIP's flag) skips the loss."""
        outputs = self.bert(input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, mode=mode, is_decoder=is_decoder,
                            inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=use_cache)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None and not return_logits:
            loss = lm_loss(logits, labels, reduction, label_smoothing)
        return LMOutput(loss, logits, outputs.past_key_values)

    @torch.no_grad()
    def generate(self, input_ids, encoder_hidden_states=None, encoder_attention_mask=None, max_length=20,
                 min_length=0, num_beams=1, do_sample=False, top_p=1.0, top_k=50, repetition_penalty=1.0,
                 eos_token_id=102, pad_token_id=0):
        """Token ids (B, <= max_length) continuing the unpadded prompts ``input_ids`` (B, L).

        Greedy (default), beam search (``num_beams > 1``) or nucleus sampling (``do_sample``).
        ``encoder_hidden_states`` may hold one entry per prompt or, as BLIP passes them, one per beam.
        Lengths count the prompt. Finished sequences are padded with ``pad_token_id``.
        """
        if do_sample and num_beams > 1:
            raise ValueError("choose nucleus sampling (do_sample) or beam search (num_beams > 1), not both")
        settings = dict(max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if num_beams > 1:
            step = self._step_function(input_ids.shape[0], num_beams, encoder_hidden_states, encoder_attention_mask)
            return beam_search(step, input_ids, num_beams, **settings)
        step = self._step_function(input_ids.shape[0], 1, encoder_hidden_states, encoder_attention_mask)
        return sample_or_greedy(step, input_ids, do_sample=do_sample, top_p=top_p, top_k=top_k, **settings)

    def _step_function(self, batch, copies, encoder_hidden_states, encoder_attention_mask):
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
            out = self(new_ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=encoder_hidden_states,
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
        if all(done):
            break
        rows = next_rows.view(-1)
        ids = torch.cat([ids[rows], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)
        past = reorder_cache(past, rows)

    for b in range(batch):
        if not done[b]:
            for beam in range(num_beams):
                row = b * num_beams + beam
                hypotheses[b].add(ids[row].clone(), beam_scores[row].item())
    best = [h.best() for h in hypotheses]
    # Sequences stopped before max_length get their eos back; the rest is padding.
    length = min(max(len(seq) for seq in best) + 1, max_length)
    out = torch.full((batch, length), pad_token_id, dtype=torch.long, device=ids.device)
    for b, seq in enumerate(best):
        out[b, :len(seq)] = seq
        if len(seq) < max_length:
            out[b, len(seq)] = eos_token_id
    return out


def tie_encoder_decoder_weights(encoder, decoder, skip_key="/attention"):
    """Share every encoder parameter with the decoder's module of the same name, as BLIP does.

    Module paths are written '/'-separated (e.g. ``/encoder/layer/0/attention/self/query``); modules whose
    path contains ``skip_key`` keep their own parameters (BLIP: self-attention stays separate, cross-attention
    is shared since '/crossattention' does not contain '/attention'). The encoder receives the decoder's
    Parameter objects, so both state-dict entries show one tensor.
    """
    decoder_modules = dict(decoder.named_modules())
    for name, module in encoder.named_modules():
        path = "/" + name.replace(".", "/") if name else ""
        own_params = dict(module.named_parameters(recurse=False))
        if not own_params or skip_key in path:
            continue
        partner = decoder_modules.get(name)
        if partner is None or type(partner) is not type(module):
            raise ValueError(f"cannot tie encoder module {name!r}: the decoder has no matching module")
        for param_name, param in own_params.items():
            shared = getattr(partner, param_name)
            if shared.shape != param.shape:
                raise ValueError(f"cannot tie {name}.{param_name}: encoder shape {tuple(param.shape)} vs "
                                 f"decoder shape {tuple(shared.shape)}")
            setattr(module, param_name, shared)
