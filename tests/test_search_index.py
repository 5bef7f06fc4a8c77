"""Search through an index folder: its memory-mapped embeddings, float16 storage and `search
--approximate` (inference/search.py) give the hits search gave before, on the toy corpus."""
import json
import sys

import numpy as np
import pytest
import torch

import inference.api
import video_tool
from inference.index import VideoIndex, update_index
from inference.search import approximate_index_path
from runtime.errors import UserError
from tests.inference_toy import make_toy_setup, model_args, run

QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("search_index"))


@pytest.fixture(scope="module")
def retrieval(toy):
    return inference.api.VideoLanguageModel.load(toy.configs["retrieval"], toy.checkpoints["retrieval"], device="cpu",
                                                 precision="fp32", overrides=toy.overrides)




def full_product_shortlist(text_embedding, video_embeddings, count, approximate=None):
    """Search's shortlist before inference/search.py: the full product in memory and torch.topk."""
    itc = text_embedding @ torch.from_numpy(np.asarray(video_embeddings, np.float32)).T
    rows = itc[0].topk(min(count, itc.shape[1])).indices
    return itc[:, rows], rows.tolist()


@pytest.mark.slow
def test_video_tool_search_gives_the_hits_of_the_full_product(toy, tmp_path, capsys, monkeypatch):
    index = tmp_path / "index"
    run(["index", toy.videos, "--index", index, "--num_workers", "0", *model_args(toy)], capsys)
    for rerank in ("0", "3"):
        argv = ["search", "--index", index, QUERY, "-k", "8", "--rerank", rerank, "--json"]
        hits = json.loads(run(argv, capsys))["hits"]
        with monkeypatch.context() as before:
            before.setattr(inference.api, "itc_shortlist", full_product_shortlist)
            assert hits == json.loads(run(argv, capsys))["hits"]  # paths, order and scores, bit for bit
        assert len(hits) == 8


def test_memory_map_search_equals_in_memory(toy, retrieval, tmp_path):
    update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0)
    index = VideoIndex.open(tmp_path / "index")
    assert isinstance(index.embeddings, np.memmap) and index.embedding_dtype == "float32"
    mapped = retrieval.search(QUERY, index, k=8, rerank=2)
    index.embeddings = np.array(index.embeddings)  # read whole into memory, as VideoIndex did before
    assert retrieval.search(QUERY, index, k=8, rerank=2) == mapped


def test_float16_storage_is_recorded_kept_and_searchable(toy, retrieval, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for video in sorted(toy.videos.glob("*.mp4"))[:5]:
        (folder / video.name).write_bytes(video.read_bytes())
    update_index(retrieval, toy.videos, tmp_path / "fp32", num_workers=0)
    update_index(retrieval, folder, tmp_path / "fp16", num_workers=0, embedding_dtype="float16")
    index = VideoIndex.open(tmp_path / "fp16")
    assert index.manifest["embedding_dtype"] == "float16" and index.embeddings.dtype == np.float16
    fp32 = VideoIndex.open(tmp_path / "fp32")
    rows = [fp32.paths.index(str(toy.videos / path)) for path in (entry["path"] for entry in index.files)]
    np.testing.assert_allclose(index.embeddings.astype(np.float32), fp32.embeddings[rows], rtol=0, atol=1e-3)

    hits = retrieval.search(QUERY, index, k=5, rerank=0)
    expected = retrieval.encode_texts([QUERY]) @ torch.from_numpy(index.embeddings.astype(np.float32)).T
    assert [hit.itc_score for hit in hits] == sorted(expected[0].tolist(), reverse=True)

    (folder / "added.mp4").write_bytes(sorted(toy.videos.glob("*.mp4"))[6].read_bytes())
    summary = update_index(retrieval, folder, tmp_path / "fp16", num_workers=0)  # the index's own dtype
    updated = VideoIndex.open(tmp_path / "fp16")
    assert (summary.kept, summary.added) == (5, 1) and updated.embeddings.dtype == np.float16
    np.testing.assert_array_equal(updated.embeddings[:5], index.embeddings)  # kept rows copied unchanged
    with pytest.raises(UserError, match=r"stores float16 embeddings, not float32; leave out --embedding_dtype"):
        update_index(retrieval, folder, tmp_path / "fp16", num_workers=0, embedding_dtype="float32")


def test_old_manifests_open_and_a_wrong_dtype_is_damage(toy, retrieval, tmp_path):
    index = tmp_path / "index"
    update_index(retrieval, toy.videos, index, num_workers=0)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["embedding_dtype"] == "float32"
    del manifest["embedding_dtype"]  # as indexes made before float16 storage
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert VideoIndex.open(index).embedding_dtype == "float32"
    (index / "manifest.json").write_text(json.dumps({**manifest, "embedding_dtype": "float16"}))
    with pytest.raises(UserError, match=r"its embeddings-\w+\.npy holds float32 values, the manifest says float16"):
        VideoIndex.open(index)
    (index / "manifest.json").write_text(json.dumps({**manifest, "embedding_dtype": "int8"}))
    with pytest.raises(UserError, match=r"its manifest\.json 'embedding_dtype' is 'int8', not one of float32, float16"):
        VideoIndex.open(index)


def test_approximate_without_faiss_is_one_line(toy, retrieval, tmp_path, capsys, monkeypatch):
    update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(SystemExit) as stopped:
        video_tool.main(["search", "--index", str(tmp_path / "index"), QUERY, "--approximate"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.startswith("error: approximate search needs faiss, an optional package: "
                                              "pip install faiss-cpu")


@pytest.mark.slow
def test_video_tool_approximate_search_is_kept_and_replaced(toy, tmp_path, capsys):
    pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)", exc_type=ImportError)
    index = tmp_path / "index"
    run(["index", toy.videos, "--index", index, "--num_workers", "0", *model_args(toy)], capsys)
    argv = ["search", "--index", index, QUERY, "-k", "8", "--rerank", "2", "--json"]
    exact = json.loads(run(argv, capsys))["hits"]
    approximate = json.loads(run([*argv, "--approximate"], capsys))["hits"]
    assert approximate == exact  # 8 videos: one inverted list, every video a candidate
    kept = approximate_index_path(VideoIndex.open(index))
    assert kept.is_file() and json.loads(run([*argv, "--approximate"], capsys))["hits"] == exact
    (tmp_path / "videos").mkdir()
    for video in sorted(toy.videos.glob("*.mp4"))[:4]:
        (tmp_path / "videos" / video.name).write_bytes(video.read_bytes())
    run(["index", tmp_path / "videos", "--index", tmp_path / "other", "--num_workers", "0", *model_args(toy)], capsys)
    run(["search", "--index", tmp_path / "other", QUERY, "--approximate"], capsys)
    # an update removes the approximate index of the embeddings it replaces
    (tmp_path / "videos" / sorted(toy.videos.glob("*.mp4"))[0].name).unlink()
    run(["index", tmp_path / "videos", "--index", tmp_path / "other", "--num_workers", "0"], capsys)
    names = {path.name for path in (tmp_path / "other").iterdir()}
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    assert names == {"manifest.json", manifest["embeddings"]}


def test_a_damaged_approximate_index_is_built_again(toy, retrieval, tmp_path):
    pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)", exc_type=ImportError)
    from inference.search import open_approximate
    update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0)
    index = VideoIndex.open(tmp_path / "index")
    exact = retrieval.search(QUERY, index, k=8, rerank=0)
    approximate_index_path(index).write_bytes(b"not a faiss index")
    said = []
    open_approximate(index, log=said.append)
    assert "unreadable" in said[0] and "building it again" in said[0]
    assert retrieval.search(QUERY, index, k=8, rerank=0, approximate=True) == exact


def test_an_index_made_before_the_merge_keys_existed_fits_a_model_with_their_defaults():
    from configs.keys import CONFIG_KEYS
    from inference.index import EMBEDDING_KEYS, difference
    settings = {key: CONFIG_KEYS[key].default for key in EMBEDDING_KEYS}
    current = {"checkpoint": {"sha256": "a", "path": "model.pth"}, "embedding_config": settings}
    older = {**current, "embedding_config": {key: v for key, v in settings.items() if not key.startswith("merge_")}}
    assert difference("idx", older, current) is None
    budgeted = {**current, "embedding_config": {**settings, "merge_budget": 0.5}}
    assert "merge_budget None (index) vs 0.5" in difference("idx", older, budgeted)
