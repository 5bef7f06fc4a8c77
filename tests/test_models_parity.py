"""Whole-model parity with the original implementation's outputs (tests/fixtures)."""
import copy

import pytest
import torch

from models import create_model
from models.testa_retrieval import rerank_scores
from tests.conftest import load_reference
from tests.helpers import fixture_config, load_exact

ATOL = 1e-5


@pytest.fixture(scope="module")
def retrieval(fixtures_dir):
    model = load_exact(create_model(fixture_config("retrieval"), "retrieval"), fixtures_dir / "retrieval.pth")
    return model, load_reference(fixtures_dir / "retrieval_ref.pt")


@pytest.mark.parametrize("variant", ["retrieval", "retrieval_nomerge"])
@torch.no_grad()
def test_retrieval_features_and_itm_scores(fixtures_dir, variant):
    model = load_exact(create_model(fixture_config(variant), "retrieval"), fixtures_dir / f"{variant}.pth")
    ref = load_reference(fixtures_dir / f"{variant}_ref.pt")
    tokens, video_embed = model.encode_video(ref["video"])
    input_ids, attention_mask = model.tokenize(ref["captions"])
    assert torch.equal(input_ids, ref["input_ids"]) and torch.equal(attention_mask, ref["attention_mask"])
    hidden, text_embed = model.encode_text(input_ids, attention_mask)
    torch.testing.assert_close(tokens, ref["visual_encoder_out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(video_embed, ref["video_embed"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, ref["text_last_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_embed, ref["text_embed"], atol=ATOL, rtol=0)
    torch.testing.assert_close(video_embed @ text_embed.T, ref["sims"], atol=ATOL, rtol=0)

    videos = torch.arange(2).repeat_interleave(3)
    texts = torch.arange(3).repeat(2)
    assert torch.equal(model.with_enc_token(input_ids), ref["itm_input_ids"])
    scores = model.itm_scores(tokens, videos, input_ids, attention_mask, texts, batch_size=4)
    torch.testing.assert_close(scores.view(2, 3), ref["itm_scores"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_retrieval_rerank_matches_original_evaluation(retrieval):
    model, ref = retrieval
    tokens, video_embed = model.encode_video(ref["video"])
    input_ids, attention_mask = model.tokenize(ref["captions"])
    _, text_embed = model.encode_text(input_ids, attention_mask)
    sims = video_embed @ text_embed.T
    k = ref["k_test"]
    v2t = rerank_scores(model, sims, k, tokens, input_ids, attention_mask, torch.arange(2), video_rows=True)
    t2v = rerank_scores(model, sims.T, k, tokens, input_ids, attention_mask, torch.arange(3), video_rows=False)
    torch.testing.assert_close(v2t, ref["eval_score_matrix_v2t"], atol=ATOL, rtol=0)
    torch.testing.assert_close(t2v, ref["eval_score_matrix_t2v"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_qa_rank_picks_the_original_answers(qa):
    model, ref = qa
    answer_ids, answer_mask, _ = model.tokenize_answers(ref["answer_list"])
    assert torch.equal(answer_ids, ref["answer_input_ids"])
    states, mask = model.encode_question(ref["video"], ref["questions"])
    torch.testing.assert_close(states, ref["question_states"], atol=ATOL, rtol=0)
    best = model.rank_answers(ref["video"], ref["questions"], answer_ids, answer_mask, k=ref["k_test"])
    assert torch.equal(best, ref["rank_answer_max_ids"])
    assert [ref["answer_list"][i] for i in best] == ref["predicted_answers"]


@torch.no_grad()
def test_qa_training_loss_matches(qa):
    model, ref = qa
    loss = model(ref["video"], ref["questions"], ref["train_answers"], ref["train_n"], ref["train_weights"])
    torch.testing.assert_close(loss, ref["train_loss"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_pretrain_features_and_losses(fixtures_dir):
    model = load_exact(create_model(fixture_config("pretrain"), "pretrain"), fixtures_dir / "pretrain.pth")
    ref = load_reference(fixtures_dir / "pretrain_ref.pt")
    tokens, image_feat = model.encode_video(ref["video"])
    torch.testing.assert_close(image_feat, ref["image_feat"], atol=ATOL, rtol=0)
    _, text_feat = model.encode_text(ref["input_ids"], ref["attention_mask"])
    torch.testing.assert_close(text_feat, ref["text_feat"], atol=ATOL, rtol=0)
    lm_loss = model.caption_loss(tokens, ref["input_ids"], ref["attention_mask"])
    torch.testing.assert_close(lm_loss, ref["lm_loss"], atol=ATOL, rtol=0)

    fresh = copy.deepcopy(model)
    torch.manual_seed(ref["forward_seed"])
    losses = fresh(ref["video"], ref["captions"], alpha=ref["forward_alpha"])
    torch.testing.assert_close(losses["loss_ita"], ref["forward_loss_ita"], atol=ATOL, rtol=0)
    torch.testing.assert_close(losses["loss_lm"], ref["forward_loss_lm"], atol=ATOL, rtol=0)
    assert torch.isfinite(losses["loss_itm"])
    # The forward pushed this batch's momentum features into the queue.
    assert int(fresh.queue_ptr) == (int(model.queue_ptr) + 2) % model.queue_size


@torch.no_grad()
def test_caption_sampling_is_reproducible_from_the_seed(pretrain):
    model, ref = pretrain
    torch.manual_seed(0)
    sampled = model.generate_captions(ref["video"], sample=True, max_length=8, min_length=4)
    torch.manual_seed(0)
    assert model.generate_captions(ref["video"], sample=True, max_length=8, min_length=4) == sampled
    assert len(sampled) == 2 and all(sampled)
