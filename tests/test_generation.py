"""Generation parity: beam-searched answers and captions equal the original implementation's, id for id.

The references (tests/fixtures) were produced by the original TESTA/BLIP code, whose decoder ran
transformers' beam search. The weights are random, so the texts are random walks through the vocabulary;
what matters is that every id, the padding and the decoded strings agree exactly.
"""
import pytest
import torch

from models.decoding import BeamHypotheses, nucleus_filter


@pytest.mark.slow
@torch.no_grad()
def test_qa_generation_reproduces_the_original_answers(qa):
    model, ref = qa
    # The original's inference='generate': 3 beams, at most 10 tokens, at least 1, from [DEC].
    ids = model.generate_answer_ids(ref["video"], ref["questions"], num_beams=3, max_length=10, min_length=1)
    assert ids.shape == ref["generated_answer_ids"].shape
    assert torch.equal(ids, ref["generated_answer_ids"])
    assert model.generate_answers(ref["video"], ref["questions"]) == ref["generated_answers"]


@pytest.mark.slow
@torch.no_grad()
def test_pretrain_captioning_reproduces_the_original_captions(pretrain):
    model, ref = pretrain
    # BLIP's captioner with an empty prompt: beam search from [DEC] alone, nothing stripped from the text.
    settings = dict(sample=False, num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0)
    ids = model.generate_caption_ids(ref["video"], **settings)
    assert ids.shape == ref["generated_caption_ids"].shape
    assert torch.equal(ids, ref["generated_caption_ids"])
    assert model.generate_captions(ref["video"], **settings) == ref["generated_captions"]


def test_decoding_skips_blip_tokens_as_the_original_tokenizer(qa):
    # [DEC] (bos) and [ENC] (additional special token) count as special, like BERT's own.
    tokenizer = qa[0].tokenizer
    ids = [tokenizer.bos_token_id, tokenizer.enc_token_id, tokenizer.cls_token_id, 2000,
           tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.convert_ids_to_tokens([2000])[0]


def test_beam_hypotheses_break_ties_as_the_original_scorer():
    # Scores are sum / length: these are exact, so the ties are real.
    hypotheses = BeamHypotheses(num_beams=2)
    first, second = torch.tensor([9, 5]), torch.tensor([9, 6, 7])
    hypotheses.add(first, -2.0)
    hypotheses.add(second, -3.0)
    assert hypotheses.best() is second  # the latest added of equal best scores
    third = torch.tensor([9, 8])
    hypotheses.add(third, -1.0)  # better: evicts the earlier of the two tied worst
    assert [ids for _, ids in hypotheses.finished] == [second, third]
    hypotheses.add(torch.tensor([9, 9, 9, 9]), -4.0)  # only equal to the worst: not admitted
    assert [ids for _, ids in hypotheses.finished] == [second, third]
    assert hypotheses.is_done(best_running_sum=-3.0, length=3) and not hypotheses.is_done(-2.9, 3)


def test_nucleus_filter_keeps_the_next_token_when_the_top_ones_sum_exactly_to_top_p():
    # Probabilities exact in binary: the two best sum to exactly 0.75, which transformers 4.21 does not
    # count as exceeding top_p, so the third token stays a candidate.
    logits = torch.tensor([[0.1875, 0.5, 0.0625, 0.25]]).log()
    kept = torch.isfinite(nucleus_filter(logits, top_p=0.75, top_k=0))
    assert kept.tolist() == [[True, True, False, True]]


@pytest.mark.slow
@torch.no_grad()
def test_caption_sampling_uses_blips_repetition_penalty(pretrain):
    model, ref = pretrain
    video_tokens = model.visual_encoder(ref["video"])
    start = torch.full((2, 1), model.tokenizer.bos_token_id)
    torch.manual_seed(7)
    expected = model.text_decoder.generate(start, encoder_hidden_states=video_tokens, do_sample=True, top_p=0.9,
                                           max_length=12, min_length=4, repetition_penalty=1.1,
                                           eos_token_id=model.tokenizer.sep_token_id,
                                           pad_token_id=model.tokenizer.pad_token_id)
    torch.manual_seed(7)
    assert torch.equal(model.generate_caption_ids(ref["video"], sample=True, max_length=12, min_length=4), expected)
