"""The layers of BLIP's MED BERT: embeddings, (cross-)attention, feed-forward, and the masks they take.

Attribute names are the state-dict names of the released checkpoints (``embeddings.*``,
``encoder.layer.N.{attention,crossattention,intermediate,output}.*``); models/med.py assembles
these layers into the text encoder and decoder.
"""
import torch
import torch.nn.functional as F
from torch import nn

# BERT's additive mask value; the released models were trained with it.
MASK_VALUE = -10000.0

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


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


def cross_attention_inputs(encoder_hidden_states, encoder_attention_mask, encoder_batch_index, dtype):
    """Visual tokens (a list is concatenated) and their additive mask, picked per text by ``encoder_batch_index``."""
    encoder_hidden_states, encoder_attention_mask = concat_encoder_inputs(encoder_hidden_states,
                                                                          encoder_attention_mask)
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.long,
                                            device=encoder_hidden_states.device)
    encoder_mask = additive_mask(encoder_attention_mask, dtype)
    if encoder_batch_index is not None:
        encoder_mask = rows_for(encoder_mask, encoder_batch_index)
    return encoder_hidden_states, encoder_mask


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
