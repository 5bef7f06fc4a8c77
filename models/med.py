"""BLIP's mixture of encoder-decoder (MED) BERT in plain PyTorch.

One BERT body serves as text encoder (bidirectional, ``mode='text'``), image/video-grounded
encoder (cross-attention to visual tokens in every layer, ``mode='multimodal'``) and, with a
causal mask and an LM head, as decoder. Parameter names follow the released checkpoints
(``embeddings.*``, ``encoder.layer.N.{attention,crossattention,intermediate,output}.*``,
``cls.predictions.*``). Written against ``torch`` only so that checkpoints keep loading
whatever transformers release is installed.

This file assembles the model, its LM head and the encoder-decoder weight tying; the layers are
in models/bert_layers.py, text generation in models/decoding.py.
"""
import json
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import decoding
from models.bert_layers import (BertEmbeddings, BertEncoder, BertPooler, activation, additive_mask,
                                causal_padding_mask, cross_attention_inputs)


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
            encoder_hidden_states, encoder_mask = cross_attention_inputs(encoder_hidden_states, encoder_attention_mask,
                                                                         encoder_batch_index, dtype)
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

    def generate(self, input_ids, **settings):
        """Token ids continuing the prompts ``input_ids``; see ``models.decoding.generate`` for the settings."""
        return decoding.generate(self, input_ids, **settings)


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
