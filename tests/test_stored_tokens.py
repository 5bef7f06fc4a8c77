"""Index once, ask many: ask and caption read a video's tokens from an index made with --tokens,
when the index holds the file unchanged and the same video encoder made them; else they decode
the file and say why."""
import os
import shutil

import pytest
import torch

import inference.api
import video_tool
from inference.api import VideoLanguageModel
from inference.index import VideoIndex, update_index
from inference.stored import encoder_fingerprint, stored_tokens
from tests.inference_toy import make_toy_setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy setup plus a QA checkpoint whose video encoder is the retrieval model's (its
    visual_encoder.* weights copied in), as a QA model fine-tuned with a frozen encoder has."""
    folder = tmp_path_factory.mktemp("stored_tokens")
    setup = make_toy_setup(folder, num_clips=4)
    qa = torch.load(setup.checkpoints["qa"], weights_only=False)
    retrieval = torch.load(setup.checkpoints["retrieval"], weights_only=False)["model"]
    shared = {key: retrieval[key] if key.startswith("visual_encoder.") else tensor
              for key, tensor in qa["model"].items()}
    assert sum(key.startswith("visual_encoder.") for key in shared) > 10
    torch.save({**qa, "model": shared}, folder / "qa_shared.pth")
    setup.checkpoints["qa_shared"] = folder / "qa_shared.pth"
    return setup


def load(toy, family, checkpoint=None, overrides=(), **options):
    return VideoLanguageModel.load(toy.configs[family], toy.checkpoints[checkpoint or family], device="cpu",
                                   precision="fp32", overrides=[*toy.overrides, *overrides], **options)


@pytest.fixture(scope="module")
def index(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "index"
    update_index(load(toy, "retrieval"), toy.videos, folder, num_workers=0, with_tokens=True)
    return VideoIndex.open(folder)


@pytest.fixture
def counted_decodes(monkeypatch):
    decoded = []
    original = VideoLanguageModel.load_clip

    def load_clip(self, path, span=None):
        decoded.append(str(path))
        return original(self, path, span)

    monkeypatch.setattr(inference.api.VideoLanguageModel, "load_clip", load_clip)
    return decoded


def test_the_index_records_its_encoder_fingerprint(toy, index):
    retrieval = load(toy, "retrieval")
    assert index.manifest["video_encoder_sha256"] == encoder_fingerprint(retrieval.model.visual_encoder)
    assert load(toy, "qa", "qa_shared").encoder_sha256 == retrieval.encoder_sha256
    assert load(toy, "qa").encoder_sha256 != retrieval.encoder_sha256


def test_ask_from_stored_tokens_equals_ask_from_the_file(toy, index, counted_decodes):
    qa = load(toy, "qa", "qa_shared")
    answers = ["red", "blue", "green", "yellow", "left", "right"]
    for video in sorted(toy.videos.glob("*.mp4")):
        found = stored_tokens(qa, index, video)
        assert found.tokens is not None, found.note
        assert found.tokens.dtype == torch.float16 and "stored as fp16" in found.note
        # the stored fp16 tokens are the encoder's output within fp16 rounding
        fresh = qa.model.visual_encoder(qa.load_clip(video).tensor)
        torch.testing.assert_close(found.tokens.float(), fresh, rtol=2e-3, atol=2e-3)
        counted_decodes.clear()
        for question in ("what color is the first shape?", "where does it move?"):
            assert qa.ask(video, question, tokens=found.tokens) == qa.ask(video, question, answers=None)
            assert qa.ask(video, question, answers, tokens=found.tokens) == qa.ask(video, question, answers)
        assert counted_decodes == [str(video)] * 4  # only the from-the-file calls decoded


def test_caption_from_stored_tokens_equals_caption_from_the_file(toy, tmp_path):
    """A pre-training checkpoint indexed as a retrieval model (zero-shot search) captions from the same index."""
    folder = tmp_path / "index"
    update_index(load(toy, "pretrain", task="retrieval"), toy.videos, folder, num_workers=0, with_tokens=True)
    index, pretrain = VideoIndex.open(folder), load(toy, "pretrain")
    settings = {"max_length": 8, "min_length": 2}
    for video in sorted(toy.videos.glob("*.mp4"))[:2]:
        found = stored_tokens(pretrain, index, video)
        assert found.tokens is not None, found.note
        assert pretrain.caption(video, tokens=found.tokens, **settings) == pretrain.caption(video, **settings)
        sampled = pretrain.caption(video, "nucleus", seed=3, tokens=found.tokens, **settings)
        assert sampled == pretrain.caption(video, "nucleus", seed=3, **settings)


def test_the_file_is_decoded_when_the_tokens_do_not_stand_for_it(toy, index, tmp_path):
    video = min(toy.videos.glob("*.mp4"))
    own_encoder = load(toy, "qa")  # fine-tuned apart: another video encoder
    found = stored_tokens(own_encoder, index, video)
    assert found.tokens is None
    assert "holds the tokens of another video encoder" in found.note and found.note.endswith("decoding the file")

    fewer_frames = load(toy, "qa", "qa_shared", overrides=["num_frm_test=4"])
    assert "other settings: num_frm_test 8 (index) vs 4" in stored_tokens(fewer_frames, index, video).note

    qa = load(toy, "qa", "qa_shared")
    elsewhere = tmp_path / video.name
    shutil.copy(video, elsewhere)
    assert "does not hold" in stored_tokens(qa, index, elsewhere).note

    without = tmp_path / "without_tokens"
    update_index(load(toy, "retrieval"), toy.videos, without, num_workers=0)
    assert "holds no video tokens (index with --tokens" in stored_tokens(qa, VideoIndex.open(without), video).note


def test_a_changed_file_is_decoded(toy, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(toy.videos, videos)
    update_index(load(toy, "retrieval"), videos, tmp_path / "index", num_workers=0, with_tokens=True)
    index, qa = VideoIndex.open(tmp_path / "index"), load(toy, "qa", "qa_shared")
    video = min(videos.glob("*.mp4"))
    assert stored_tokens(qa, index, video).tokens is not None
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    found = stored_tokens(qa, index, video)
    assert found.tokens is None and "changed since index" in found.note


def test_video_tool_ask_and_caption_with_index(toy, index, tmp_path, capsys, counted_decodes):
    video = min(toy.videos.glob("*.mp4"))
    qa = ["--config", toy.configs["qa"], "--checkpoint", toy.checkpoints["qa_shared"], "--precision", "fp32",
          "--options", *toy.overrides]
    question = "what color is the first shape?"
    video_tool.main([str(arg) for arg in ["ask", video, question, *qa]])
    from_file = capsys.readouterr().out
    counted_decodes.clear()
    video_tool.main([str(arg) for arg in ["ask", video, question, "--index", index.folder, *qa]])
    captured = capsys.readouterr()
    assert captured.out == from_file and counted_decodes == []
    assert f"video tokens: from index {index.folder} (encoded at fp32, stored as fp16)" in captured.err

    other = ["--config", toy.configs["qa"], "--checkpoint", toy.checkpoints["qa"], "--precision", "fp32",
             "--options", *toy.overrides]
    video_tool.main([str(arg) for arg in ["ask", video, question, "--index", index.folder, *other]])
    assert "another video encoder" in capsys.readouterr().err and counted_decodes == [str(video)]
