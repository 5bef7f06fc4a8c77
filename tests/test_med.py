"""MED BERT: parity with the original text encoder/decoder, weight tying, masks and generation."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_reference
from torch import nn

from models.decoding import beam_search, nucleus_filter, sample_or_greedy
from models.med import BertConfig, BertLMHeadModel, BertModel, tie_encoder_decoder_weights

TOL = dict(atol=1e-5, rtol=0)
KEYS_DIR = Path(__file__).resolve().parent / "fixtures" / "checkpoint_keys"


def sub_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_linear(state, prefix):
    weight = state[prefix + ".weight"]
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.load_state_dict(sub_state(state, prefix + "."), strict=True)
    return layer


def build_text_models(fixtures_dir, config_name, state, resize_to=None):
    """Encoder and decoder from a fixture config, loaded strictly from a checkpoint state dict."""
    encoder = BertModel(BertConfig.from_json_file(fixtures_dir / config_name)).eval()
    decoder = BertLMHeadModel(BertConfig.from_json_file(fixtures_dir / config_name)).eval()
    if resize_to is not None:
        encoder.resize_token_embeddings(resize_to)
        decoder.resize_token_embeddings(resize_to)
    encoder.load_state_dict(sub_state(state, "text_encoder."), strict=True)
    decoder.load_state_dict(sub_state(state, "text_decoder."), strict=True)
    return encoder, decoder


def checkpoint_state(fixtures_dir, name):
    return load_reference(fixtures_dir / name)["model"]


def itm_cls_all_pairs(encoder, itm_input_ids, attention_mask, video_tokens):
    """[ENC] token state for every (video, caption) pair: (videos, captions, width)."""
    rows = []
    for tokens in video_tokens:
        states = tokens[None].expand(len(itm_input_ids), -1, -1)
        out = encoder(itm_input_ids, attention_mask=attention_mask, encoder_hidden_states=states,
                      encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long))
        rows.append(out.last_hidden_state[:, 0])
    return torch.stack(rows)


@torch.no_grad()
def test_retrieval_text_parity(fixtures_dir):
    ref = load_reference(fixtures_dir / "retrieval_ref.pt")
    state = checkpoint_state(fixtures_dir, "retrieval.pth")
    encoder = BertModel(BertConfig.from_json_file(fixtures_dir / "med_config_compact.json")).eval()
    encoder.load_state_dict(sub_state(state, "text_encoder."), strict=True)

    hidden = encoder(ref["input_ids"], attention_mask=ref["attention_mask"], mode="text").last_hidden_state
    torch.testing.assert_close(hidden, ref["text_last_hidden"], **TOL)
    torch.testing.assert_close(hidden[:, 0], ref["text_cls"], **TOL)
    text_embed = F.normalize(load_linear(state, "text_proj")(hidden[:, 0]), dim=-1)
    torch.testing.assert_close(text_embed, ref["text_embed"], **TOL)

    itm_cls = itm_cls_all_pairs(encoder, ref["itm_input_ids"], ref["attention_mask"], ref["visual_encoder_out"])
    torch.testing.assert_close(itm_cls, ref["itm_cls"], **TOL)
    torch.testing.assert_close(load_linear(state, "itm_head")(itm_cls), ref["itm_logits"], **TOL)


@torch.no_grad()
def test_vqa_question_and_answer_ranking_parity(fixtures_dir):
    ref = load_reference(fixtures_dir / "vqa_ref.pt")
    encoder, decoder = build_text_models(fixtures_dir, "med_config_compact.json", checkpoint_state(fixtures_dir, "vqa.pth"))
    question_mask = ref["question_attention_mask"]
    video = ref["visual_encoder_out"]
    states = encoder(ref["question_input_ids"], attention_mask=question_mask, encoder_hidden_states=video,
                     encoder_attention_mask=torch.ones(video.shape[:2], dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(states, ref["question_states"], **TOL)

    states = ref["question_states"]
    start = ref["answer_input_ids"][:1, :1].expand(len(states), 1)
    first_logits = decoder(start, encoder_hidden_states=states, encoder_attention_mask=question_mask).logits[:, 0]
    torch.testing.assert_close(first_logits, ref["first_token_logits"], **TOL)
    prob_first = first_logits.softmax(dim=-1)[:, ref["answer_input_ids"][:, 1]]
    torch.testing.assert_close(prob_first, ref["prob_first_token"], **TOL)

    k = ref["k_test"]
    candidates = ref["candidate_input_ids"]
    candidate_mask = ref["answer_attention_mask"][ref["topk_ids"].reshape(-1)]
    out = decoder(candidates, attention_mask=candidate_mask, encoder_hidden_states=states.repeat_interleave(k, 0),
                  encoder_attention_mask=question_mask.repeat_interleave(k, 0), labels=ref["candidate_targets"],
                  reduction="none")
    torch.testing.assert_close(-out.loss.view(-1, k), ref["log_probs_sum_smoothed"], **TOL)

    targets = ref["candidate_targets"][:, 1:]
    log_probs = out.logits[:, :-1].log_softmax(dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    true_sum = (log_probs * (targets != -100)).sum(dim=1).view(-1, k)
    torch.testing.assert_close(true_sum, ref["true_log_probs_sum"], **TOL)


@torch.no_grad()
def test_pretrain_resized_and_tied_parity(fixtures_dir):
    ref = load_reference(fixtures_dir / "pretrain_ref.pt")
    state = checkpoint_state(fixtures_dir, "pretrain.pth")
    encoder, decoder = build_text_models(fixtures_dir, "bert_config_compact.json", state, resize_to=3002)
    assert encoder.config.vocab_size == decoder.config.vocab_size == 3002
    predictions = decoder.cls.predictions
    assert predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert predictions.bias is predictions.decoder.bias
    tie_encoder_decoder_weights(encoder, decoder.bert, skip_key="/attention")

    text_cls = encoder(ref["input_ids"], attention_mask=ref["attention_mask"], mode="text").last_hidden_state[:, 0]
    torch.testing.assert_close(text_cls, ref["text_cls"], **TOL)
    torch.testing.assert_close(F.normalize(load_linear(state, "text_proj")(text_cls), dim=-1), ref["text_feat"], **TOL)
    itm_cls = itm_cls_all_pairs(encoder, ref["itm_input_ids"], ref["attention_mask"], ref["visual_encoder_out"])
    torch.testing.assert_close(load_linear(state, "itm_head")(itm_cls), ref["itm_logits"], **TOL)

    video = ref["visual_encoder_out"]
    inputs = dict(attention_mask=ref["attention_mask"], encoder_hidden_states=video,
                  encoder_attention_mask=torch.ones(video.shape[:2], dtype=torch.long),
                  labels=ref["decoder_targets"])
    out = decoder(ref["decoder_input_ids"], **inputs)
    torch.testing.assert_close(out.logits, ref["decoder_logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["lm_loss"], **TOL)
    per_caption = decoder(ref["decoder_input_ids"], reduction="none", **inputs).loss
    torch.testing.assert_close(per_caption, ref["lm_loss_per_caption_sum"], **TOL)


def tiny_config(vocab_size=40, **overrides):
    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, encoder_width=12,
                      add_cross_attention=True, **overrides)


def storage_groups(state):
    """Names of state-dict entries that share storage (groups of two or more)."""
    by_pointer = {}
    for name, tensor in state.items():
        by_pointer.setdefault(tensor.data_ptr(), []).append(name)
    return {frozenset(names) for names in by_pointer.values() if len(names) > 1}


def test_tying_matches_blip_pretrain_groups():
    model = nn.Module()
    model.text_encoder = BertModel(tiny_config())
    model.text_decoder = BertLMHeadModel(tiny_config())
    tie_encoder_decoder_weights(model.text_encoder, model.text_decoder.bert, skip_key="/attention")
    encoder, decoder_bert = model.text_encoder, model.text_decoder.bert
    cross = encoder.encoder.layer[0].crossattention.self.query
    assert cross.weight is decoder_bert.encoder.layer[0].crossattention.self.query.weight
    assert encoder.encoder.layer[0].attention.self.query.weight is not \
        decoder_bert.encoder.layer[0].attention.self.query.weight

    # The base-size groups of the released pre-training model, restricted to the first two layers.
    lines = (KEYS_DIR / "blip_pretrain_timesformer_tied.txt").read_text().splitlines()
    deep_layer = re.compile(r"\.layer\.([2-9]|1[0-9])\.")
    expected = {frozenset(line.split("\t")) for line in lines if not deep_layer.search(line)}
    assert storage_groups(model.state_dict()) == expected
    assert len(expected) == 4 + 16 * 2 + 1

    with torch.no_grad():
        cross.weight.add_(1.0)
    state = model.state_dict()
    name = "encoder.layer.0.crossattention.self.query.weight"
    assert torch.equal(state["text_encoder." + name], state["text_decoder.bert." + name])


def test_tying_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="cannot tie"):
        tie_encoder_decoder_weights(BertModel(tiny_config()), BertModel(tiny_config(vocab_size=41)))


@pytest.fixture(scope="module")
def decoder_and_states():
    torch.manual_seed(0)
    decoder = BertLMHeadModel(tiny_config(initializer_range=0.5)).eval()
    states = torch.randn(2, 5, 12)
    return decoder, states


@torch.no_grad()
def test_causal_mask_hides_future_tokens(decoder_and_states):
    decoder, states = decoder_and_states
    ids = torch.randint(3, 40, (2, 7))
    changed = ids.clone()
    changed[:, 4:] = torch.randint(3, 40, (2, 3))
    before = decoder(ids, encoder_hidden_states=states).logits
    after = decoder(changed, encoder_hidden_states=states).logits
    torch.testing.assert_close(before[:, :4], after[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-3)
    # The text encoder attends both ways, so a later token does change earlier states.
    encoded = decoder.bert(ids, mode="text").last_hidden_state
    assert not torch.allclose(encoded[:, :4], decoder.bert(changed, mode="text").last_hidden_state[:, :4], atol=1e-3)


@torch.no_grad()
def test_cached_greedy_generation_equals_full_recomputation(decoder_and_states):
    decoder, states = decoder_and_states
    prompt = torch.tensor([[1, 7], [1, 9]])
    cached = decoder.generate(prompt, encoder_hidden_states=states, max_length=9, min_length=9,
                              eos_token_id=2, pad_token_id=0)
    ids = prompt
    while ids.shape[1] < 9:
        logits = decoder(ids, encoder_hidden_states=states).logits[:, -1]
        logits[:, 2] = -float("inf")
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.slow
def test_beam_search_lengths_and_per_beam_states(decoder_and_states):
    decoder, states = decoder_and_states
    prompt = torch.tensor([[1], [1]])
    eos = 6  # a token this random decoder actually produces, so sequences do end
    kwargs = dict(num_beams=3, max_length=8, min_length=4, repetition_penalty=3.0, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = decoder.generate(prompt, encoder_hidden_states=states, **kwargs)
        unconstrained = decoder.generate(prompt, encoder_hidden_states=states, **{**kwargs, "min_length": 0})
        repeated = decoder.generate(prompt, encoder_hidden_states=states.repeat_interleave(3, 0), **kwargs)
    assert out.shape[0] == 2 and out.shape[1] <= 8
    ended = [row.index(eos) for row in out.tolist() if eos in row]
    assert ended and all(end >= 4 for end in ended)
    assert any(eos in row[:4] for row in unconstrained.tolist())
    for row in out.tolist():
        if eos in row:
            assert all(t == 0 for t in row[row.index(eos) + 1:])
    assert torch.equal(out, repeated)

    def uncached_step(ids, past):
        logits = decoder(ids, encoder_hidden_states=states.repeat_interleave(3, 0)).logits[:, -1]
        return logits, ((torch.zeros(ids.shape[0], 1),),)

    settings = {k: v for k, v in kwargs.items() if k != "num_beams"}
    with torch.no_grad():
        assert torch.equal(out, beam_search(uncached_step, prompt, 3, **settings))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        decoder.generate(prompt, encoder_hidden_states=states[:1], **kwargs)


def markov_step(table):
    """A fake decoder step: next-token logits depend only on the last token."""
    def step(ids, past):
        return table[ids[:, -1]].log(), ((torch.zeros(ids.shape[0], 1),),)
    return step


def test_beam_search_escapes_the_greedy_trap():
    # Tokens: 0 pad, 1 eos, 2 start, 3 "A" (likely first, then uncertain), 4 "B" (less likely, then certain).
    table = torch.full((5, 5), 1e-6)
    table[2, 3], table[2, 4] = 0.55, 0.45
    table[3, 3], table[3, 4] = 0.5, 0.5
    table[4, 4] = 0.99
    settings = dict(max_length=3, min_length=3, repetition_penalty=1.0, eos_token_id=1, pad_token_id=0)
    start = torch.tensor([[2]])
    greedy = sample_or_greedy(markov_step(table), start, do_sample=False, top_p=1.0, top_k=0, **settings)
    assert greedy.tolist() == [[2, 3, 3]]
    assert beam_search(markov_step(table), start, 2, **settings).tolist() == [[2, 4, 4]]

    # Once eos becomes likely after "B B", the beam ends there and is padded to the batch length.
    table[4, 1] = 5.0
    settings.update(max_length=6, min_length=0)
    assert beam_search(markov_step(table), start, 2, **settings).tolist() == [[2, 4, 1]]
    # Greedy pads a row that has finished while another is still running.
    two_starts = torch.tensor([[4], [3]])
    greedy = sample_or_greedy(markov_step(table), two_starts, do_sample=False, top_p=1.0, top_k=0, **settings)
    assert greedy[0].tolist()[:3] == [4, 1, 0] and (greedy[0, 2:] == 0).all() and 1 not in greedy[1].tolist()


def test_nucleus_filter_keeps_the_smallest_top_set():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(nucleus_filter(logits, top_p=0.75, top_k=0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(nucleus_filter(logits, top_p=1.0, top_k=3)).tolist() == [[True, True, True, False]]


@torch.no_grad()
def test_nucleus_sampling_is_reproducible_with_a_seed(decoder_and_states):
    decoder, states = decoder_and_states
    prompt = torch.tensor([[1], [1]])
    kwargs = dict(encoder_hidden_states=states, do_sample=True, top_p=0.9, max_length=10, min_length=3,
                  repetition_penalty=1.1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    first = decoder.generate(prompt, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(first, decoder.generate(prompt, **kwargs))
    assert first.shape[1] <= 10 and (first[:, 1:3] != 2).all()


@torch.no_grad()
@pytest.mark.parametrize("rows, index", [(1, [0, 0, 0, 0]), (2, [1, 0, 1, 1])])
def test_texts_sharing_visual_rows_get_the_per_text_result(rows, index):
    encoder = BertModel(tiny_config(initializer_range=0.5)).eval()
    states = torch.randn(rows, 5, 12)
    ids, mask = torch.randint(3, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    mask[2, 4:] = 0
    index = torch.tensor(index)
    shared = encoder(ids, attention_mask=mask, encoder_hidden_states=states, encoder_batch_index=index)
    per_text = encoder(ids, attention_mask=mask, encoder_hidden_states=states[index])
    torch.testing.assert_close(shared.last_hidden_state, per_text.last_hidden_state, atol=1e-6, rtol=0)
    # Each text really attends to its own row: pointing text 0 elsewhere changes its output only.
    if rows > 1:
        moved = encoder(ids, attention_mask=mask, encoder_hidden_states=states,
                        encoder_batch_index=torch.tensor([0, 0, 1, 1])).last_hidden_state
        assert not torch.allclose(moved[0], shared.last_hidden_state[0], atol=1e-3)
        torch.testing.assert_close(moved[1:], shared.last_hidden_state[1:], atol=1e-6, rtol=0)


def test_resize_keeps_rows_and_updates_a_shared_config():
    config = tiny_config()
    decoder = BertLMHeadModel(config)
    old_rows = decoder.bert.embeddings.word_embeddings.weight.detach().clone()
    decoder.resize_token_embeddings(43)
    # BLIP builds its momentum encoder from the same config object after resizing.
    assert config.vocab_size == 43 and BertModel(config).embeddings.word_embeddings.num_embeddings == 43
    predictions = decoder.cls.predictions
    assert torch.equal(decoder.bert.embeddings.word_embeddings.weight[:40], old_rows)
    assert predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert predictions.bias is predictions.decoder.bias and predictions.bias.shape == (43,)
    assert decoder(torch.tensor([[1, 42]]), mode="text").logits.shape == (1, 2, 43)


def test_training_mode_uses_dropout_and_trains_the_tied_head():
    decoder = BertLMHeadModel(tiny_config()).train()
    ids = torch.randint(3, 40, (2, 6))
    states = torch.randn(2, 5, 12)
    first = decoder(ids, encoder_hidden_states=states, labels=ids)
    assert not torch.allclose(first.logits, decoder(ids, encoder_hidden_states=states).logits)
    first.loss.backward()
    embeddings = decoder.bert.embeddings.word_embeddings.weight
    assert embeddings.grad is not None and decoder.cls.predictions.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        decoder(ids, encoder_hidden_states=states, labels=ids, reduction="sum")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        decoder(ids)


def key_file_entries(stem, prefix):
    lines = (KEYS_DIR / f"{stem}_state_dict.txt").read_text().splitlines()
    return [(name[len(prefix):], shape, dtype) for name, shape, dtype in (line.split("\t") for line in lines)
            if name.startswith(prefix)]


def state_entries(module):
    return [(name, str(list(t.shape)), str(t.dtype).replace("torch.", "")) for name, t in module.state_dict().items()]


@pytest.mark.parametrize("stem, config_name, resize_to", [
    ("testa_vqa_activitynet_f32", "med_config.json", None),
    ("blip_pretrain_timesformer", "bert_config.json", 30524),
])
def test_base_size_keys_match_the_released_checkpoints(stem, config_name, resize_to):
    config_dir = Path(__file__).resolve().parents[1] / "configs"
    # The meta device gives names, shapes and dtypes without allocating base-size weights.
    with torch.device("meta"):
        encoder = BertModel(BertConfig.from_json_file(config_dir / config_name))
        decoder = BertLMHeadModel(BertConfig.from_json_file(config_dir / config_name))
        if resize_to is not None:
            encoder.resize_token_embeddings(resize_to)
            decoder.resize_token_embeddings(resize_to)
    assert state_entries(encoder) == key_file_entries(stem, "text_encoder.")
    assert state_entries(decoder) == key_file_entries(stem, "text_decoder.")
