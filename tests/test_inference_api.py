"""inference.api: the evaluation's decoding and scoring applied to any video file."""
import numpy as np
import pytest
import torch

from configs.load import load_config
from data.datasets import create_dataset
from inference.api import VideoLanguageModel
from inference.index import VideoIndex, update_index
from models.testa_retrieval import rerank_scores
from runtime.errors import UserError
from runtime.precision import inference_precision
from tests.inference_toy import make_toy_setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("inference_api"))


def load(toy, family, **options):
    return VideoLanguageModel.load(toy.configs[family], toy.checkpoints[family], device="cpu", precision="fp32",
                                   overrides=toy.overrides, **options)


@pytest.fixture(scope="module")
def retrieval(toy):
    return load(toy, "retrieval")


@pytest.mark.slow
def test_encode_videos_equals_the_retrieval_evaluation(toy, retrieval):
    dataset = create_dataset("retrieval_didemo", load_config(toy.configs["retrieval"], toy.overrides), split="test")
    encoding = retrieval.encode_videos(dataset.video, batch_size=2)
    clips = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = retrieval.model.encode_video(clips)[1]
    assert encoding.paths == [str(path) for path in dataset.video]
    assert encoding.embeddings.dtype == torch.float32
    torch.testing.assert_close(encoding.embeddings, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoding.embeddings.norm(dim=1), torch.ones(len(dataset)))


@pytest.mark.slow
def test_unreadable_files_are_reported_not_fatal(toy, retrieval, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    good = sorted(toy.videos.glob("*.mp4"))[:2]
    encoding = retrieval.encode_videos([good[0], broken, good[1]], batch_size=2, return_tokens=True)
    assert encoding.paths == [str(good[0]), str(good[1])]
    assert list(encoding.failed) == [str(broken)]
    assert "cannot decode video" in encoding.failed[str(broken)]
    assert encoding.tokens.shape[0] == 2 == encoding.embeddings.shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("with_tokens", [False, True])
def test_search_ranks_by_the_evaluation_rerank_scores(toy, retrieval, tmp_path, with_tokens):
    update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0, with_tokens=with_tokens)
    index = VideoIndex.open(tmp_path / "index")
    query, rerank = "a red circle moves left", 3
    hits = retrieval.search(query, index, k=len(index.paths), rerank=rerank)

    encoding = retrieval.encode_videos(index.paths, return_tokens=True)
    sims = retrieval.encode_texts([query]) @ encoding.embeddings.T
    input_ids, attention_mask = retrieval.model.tokenize([query])
    expected = rerank_scores(retrieval.model, sims, rerank, encoding.tokens, input_ids, attention_mask,
                             torch.tensor([0]), video_rows=False)[0]
    order = expected.argsort(descending=True, stable=True)
    assert [hit.path for hit in hits[:rerank]] == [index.paths[i] for i in order[:rerank]]
    # stored fp16 tokens round the ITM logit a little; re-encoded ones are exact
    tolerance = 2e-2 if with_tokens else 1e-5
    np.testing.assert_allclose([hit.score for hit in hits[:rerank]], expected[order[:rerank]], atol=tolerance)
    rest = sims[0].argsort(descending=True)[rerank:]
    assert [hit.path for hit in hits[rerank:]] == [index.paths[i] for i in rest]
    assert all(hit.score is None for hit in hits[rerank:])


def test_search_without_rerank_is_itc_order(toy, retrieval, tmp_path):
    update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0)
    index = VideoIndex.open(tmp_path / "index")
    hits = retrieval.search("a blue square moves up", index, k=3, rerank=0)
    assert [hit.score for hit in hits] == [hit.itc_score for hit in hits]
    assert [hit.itc_score for hit in hits] == sorted((hit.itc_score for hit in hits), reverse=True)


@pytest.mark.slow
def test_ask_ranks_as_the_qa_evaluation_and_generates(toy):
    qa = load(toy, "qa")
    dataset = create_dataset("activitynet_qa", load_config(toy.configs["qa"], toy.overrides), split="test")
    clip, question, _ = dataset[0]
    answer_ids, answer_mask, _ = qa.model.tokenize_answers(dataset.answer_list)
    best = qa.model.rank_answers(clip[None], [question], answer_ids, answer_mask, qa.config["k_test"])
    video = dataset.items[0][0]
    assert qa.ask(video, question, dataset.answer_list) == dataset.answer_list[int(best)]
    generated = qa.ask(video, question)
    assert isinstance(generated, str) and generated == qa.ask(video, question)


@pytest.mark.slow
def test_caption_is_deterministic_given_a_seed(toy):
    pretrain = load(toy, "pretrain")
    video = min(toy.videos.glob("*.mp4"))
    settings = {"max_length": 8, "min_length": 2}
    assert pretrain.caption(video, "beam", **settings) == pretrain.caption(video, "beam", **settings)
    first = pretrain.caption(video, "nucleus", seed=3, **settings)
    assert first == pretrain.caption(video, "nucleus", seed=3, **settings)
    assert isinstance(first, str)


def test_wrong_family_is_one_clear_error(toy, retrieval):
    video = min(toy.videos.glob("*.mp4"))
    with pytest.raises(UserError, match="ask needs a QA checkpoint; .*retrieval.pth is a retrieval checkpoint"):
        retrieval.ask(video, "what color?")
    with pytest.raises(UserError, match="caption needs a pre-training checkpoint"):
        retrieval.caption(video)


@pytest.mark.slow
def test_pretraining_checkpoint_searches_as_retrieval_model(toy):
    """Zero-shot search: a pre-training checkpoint loads into a retrieval model, same video embedding."""
    as_retrieval = load(toy, "pretrain", task="retrieval")
    as_pretrain = load(toy, "pretrain")
    video = sorted(toy.videos.glob("*.mp4"))[:1]
    torch.testing.assert_close(as_retrieval.encode_videos(video).embeddings, as_pretrain.encode_videos(video).embeddings)


def test_load_clip_gives_frames_and_encoder_input(retrieval, toy):
    clip = retrieval.load_clip(min(toy.videos.glob("*.mp4")))
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, 64, 64, 3)
    assert clip.tensor.shape == (1, 3, 8, 64, 64)


def test_precision_choice():
    assert inference_precision("fp32", "cpu").dtype is None
    assert inference_precision("bf16", "cpu").dtype is torch.bfloat16
    # auto: bf16 only where the CPU runs it natively (emulated bf16 is far slower than fp32), and int8
    # is not faster (tests/test_precision_int8.py)
    assert inference_precision("auto", "cpu", cpu_bf16_is_native=lambda: True,
                               cpu_int8_is_fast=lambda: False).dtype is torch.bfloat16
    assert inference_precision("auto", "cpu", cpu_bf16_is_native=lambda: False,
                               cpu_int8_is_fast=lambda: False).dtype is None
    assert not inference_precision("fp16", "cpu").scaler.is_enabled()  # no gradients, no scaling
    with pytest.raises(UserError, match="unknown precision"):
        inference_precision("fp8", "cpu")
