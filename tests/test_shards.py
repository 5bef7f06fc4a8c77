"""Streamed pre-training shards: packing (round trip, resume, bad files) and the streaming
dataset (rank/worker split, equal steps, seeding, clips equal to the file-per-video ones)."""
import json
import random
from pathlib import Path

import pytest
import torch
import webdataset

from configs.keys import ConfigError
from data import pack_shards
from data.datasets import PretrainDataset
from data.loader import create_loader, create_sampler
from data.pack_shards import pack, read_rows
from data.shards import ShardedPretrainDataset
from data.toy import write_corpus
from runtime.errors import DataError
from tests.helpers import REPO_ROOT, read_yaml
from tests.test_scripts import last_json_line, run_script
from training.loop import _batches_after

SMALL_SHARDS = 20_000  # bytes: the toy corpus (20 rows) packs into 3 shards of uneven size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=20, frames=8, size=64, seed=0, num_images=6)  # 14 videos + 6 images
    return root


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = pack([corpus / "ann" / "pretrain.json"], out, corpus, max_bytes=SMALL_SHARDS)
    return out, manifest


@pytest.fixture(scope="module")
def even_shards(corpus, tmp_path_factory):
    """4 shards of 5 samples."""
    out = tmp_path_factory.mktemp("even")
    pack([corpus / "ann" / "pretrain.json"], out, corpus, max_samples=5)
    return out


def shard_urls(out):
    return sorted(str(path) for path in Path(out).glob("*.tar"))


def data_config(corpus, shards, **overrides):
    config = read_yaml(REPO_ROOT / "configs/toy/pretrain.yaml")
    config.update(train_file=[str(corpus / "ann" / "pretrain.json")], video_root=str(corpus), train_shards=shards,
                  num_workers=2, **overrides)
    return config


def test_every_sample_round_trips_bytes_and_caption(corpus, packed):
    out, manifest = packed
    rows = read_rows([corpus / "ann" / "pretrain.json"], corpus)
    assert len(manifest["shards"]) >= 3 and manifest["total_samples"] == len(rows) == 20
    assert [shard["name"] for shard in manifest["shards"]] == [Path(url).name for url in shard_urls(out)]
    samples = list(webdataset.WebDataset(shard_urls(out), shardshuffle=False))
    assert [int(sample["__key__"]) for sample in samples] == list(range(len(rows)))
    for sample, (path, source, caption) in zip(samples, rows):
        assert sample[source.suffix[1:]] == source.read_bytes()
        assert sample["txt"].decode() == caption
        assert json.loads(sample["json"])["path"] == path


def test_interrupted_packing_resumes_to_the_same_shards(corpus, packed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resumed"
    calls = {"count": 0}
    read_file = pack_shards.read_file

    def fail_after_12(path):
        calls["count"] += 1
        if calls["count"] > 12:
            raise KeyboardInterrupt
        return read_file(path)

    monkeypatch.setattr(pack_shards, "read_file", fail_after_12)
    with pytest.raises(KeyboardInterrupt):
        pack([corpus / "ann" / "pretrain.json"], out, corpus, max_bytes=SMALL_SHARDS)
    assert list(out.glob("*.tar.tmp")) and not (out / "manifest.json").exists()
    finished_before = len(shard_urls(out))
    monkeypatch.setattr(pack_shards, "read_file", read_file)
    manifest = pack([corpus / "ann" / "pretrain.json"], out, corpus, max_bytes=SMALL_SHARDS)
    assert f"resuming after {finished_before} complete shards" in capsys.readouterr().out
    uninterrupted, expected = packed
    assert manifest["shards"] == expected["shards"]
    for name in (shard["name"] for shard in manifest["shards"]):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))
    pack([corpus / "ann" / "pretrain.json"], out, corpus, max_bytes=SMALL_SHARDS)
    assert "already complete" in capsys.readouterr().out


def test_missing_and_garbage_files_are_listed_not_packed(corpus, tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    annotation = tmp_path / "ann.json"
    annotation.write_text(json.dumps([{"path": "videos/v_toy00000.mp4", "caption": "good"},
                                      {"path": "videos/missing.mp4", "caption": "missing"},
                                      {"path": str(tmp_path / "garbage.mp4"), "caption": "garbage"}]))
    manifest = pack([annotation], tmp_path / "out", corpus, check=True)
    bad = dict(line.split("\t") for line in (tmp_path / "out" / "bad_files.txt").read_text().splitlines())
    assert set(bad) == {str(corpus / "videos" / "missing.mp4"), str(tmp_path / "garbage.mp4")}
    assert "FileNotFoundError" in bad[str(corpus / "videos" / "missing.mp4")]
    assert "cannot decode" in bad[str(tmp_path / "garbage.mp4")]
    assert manifest["total_samples"] == 1 and manifest["bad_files"] == 2


def epoch_keys(config, rank, epoch, batch_size):
    """The sample keys each batch of `rank` holds in `epoch` (2 ranks, 2 workers; decoding skipped)."""
    dataset = ShardedPretrainDataset(config, "pretrain", rank=rank, world_size=2)
    dataset.set_epoch(epoch)
    sampler = create_sampler(dataset, True, 2, rank)
    assert sampler is None
    loader = create_loader(dataset, sampler, batch_size, num_workers=2, train=True, pin_memory=False)
    batches = [list(batch) for batch in loader]
    assert len(batches) == len(loader)
    return batches


@pytest.fixture
def keys_only(monkeypatch):
    """Samples come out as their keys: the split and order without decoding (workers are forked)."""
    monkeypatch.setattr(ShardedPretrainDataset, "decode", lambda self, sample: sample["__key__"])


@pytest.mark.slow
def test_two_ranks_two_workers_cover_every_sample_once(corpus, even_shards, keys_only):
    config = data_config(corpus, f"{even_shards}/pretrain-{{000000..000003}}.tar", batch_size=5)
    epoch0 = [epoch_keys(config, rank, 0, 5) for rank in range(2)]
    assert [len(batches) for batches in epoch0] == [2, 2]
    keys = [key for batches in epoch0 for batch in batches for key in batch]
    assert sorted(keys) == [f"{row:09d}" for row in range(20)]
    assert [epoch_keys(config, rank, 0, 5) for rank in range(2)] == epoch0  # the seed decides
    assert [epoch_keys(config, rank, 1, 5) for rank in range(2)] != epoch0  # the epoch reshuffles


@pytest.mark.slow
def test_uneven_shards_give_every_rank_the_same_steps(corpus, packed, keys_only):
    out, manifest = packed
    config = data_config(corpus, shard_urls(out), batch_size=2)
    for epoch in range(3):
        steps = [len(epoch_keys(config, rank, epoch, 2)) for rank in range(2)]
        assert steps == [manifest["total_samples"] // 4] * 2


def test_streamed_clips_equal_the_file_clips(corpus, packed):
    out, _ = packed
    config = data_config(corpus, shard_urls(out), batch_size=2)
    files = PretrainDataset(config, "pretrain")
    streamed = ShardedPretrainDataset(config, "pretrain", rank=0, world_size=1)
    samples = list(webdataset.WebDataset(shard_urls(out), shardshuffle=False))
    for row in (0, 13, 14, 15):  # videos and both image types (png, jpg)
        clip, caption = streamed.item_of_sample(samples[row], random.Random(row))
        expected_clip, expected_caption = files.item(row, random.Random(row))
        assert torch.equal(clip, expected_clip) and caption == expected_caption


def test_undecodable_sample_is_counted_and_replaced(corpus, tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    rows = json.loads((corpus / "ann" / "pretrain.json").read_text())[:5]
    annotation = tmp_path / "ann.json"
    annotation.write_text(json.dumps(rows + [{"path": str(tmp_path / "garbage.mp4"), "caption": "garbage"}]))
    pack([annotation], tmp_path / "out", corpus)  # without --check the garbage is packed
    config = data_config(corpus, shard_urls(tmp_path / "out"), batch_size=2)
    dataset = ShardedPretrainDataset(config, "pretrain", rank=0, world_size=1)
    items = list(dataset)
    assert len(items) == len(dataset) == 6 and dataset.bad_inputs.count() >= 1
    assert any("garbage.mp4" in path for path in dataset.bad_inputs.paths())


@pytest.mark.slow
def test_video_pretrain_trains_an_epoch_on_video_and_image_shards(corpus, packed, tmp_path):
    images = tmp_path / "image_shards"
    pack([corpus / "ann" / "pretrain_images.json"], images, corpus, max_samples=2)
    image_config = tmp_path / "images.yaml"
    image_config.write_text(f"train_shards: {images}/pretrain-{{000000..000002}}.tar\nnum_frm_train: 2\n"
                            "batch_size: 2\n")
    out = tmp_path / "run"
    video_shards = ",".join(shard_urls(packed[0]))
    result = run_script("video_pretrain.py", "--config", "configs/toy/pretrain.yaml", "--output_dir", out,
                        "--sep_img", "--img_config", image_config, f"train_shards=[{video_shards}]",
                        "batch_size=4", "depth=2", "max_epoch=1", "num_workers=1")
    record = last_json_line(out / "log.txt")
    assert record["epoch"] == 0 and {"train_loss_ita", "train_loss_itm", "train_loss_lm"} <= set(record)
    assert "Train epoch: [0] [3/3]" in result.stdout  # min(20 // 4 videos, 6 // 2 images) steps



def test_resumed_epoch_skips_the_consumed_batches(corpus, even_shards, keys_only):
    """The loop resumes a streamed epoch by skipping its consumed batches by count; the
    stream's order depends on (seed, epoch) alone, so the rest are the uninterrupted run's."""
    config = data_config(corpus, f"{even_shards}/pretrain-{{000000..000003}}.tar", batch_size=2)
    dataset = ShardedPretrainDataset(config, "pretrain", rank=0, world_size=1)
    loader = create_loader(dataset, None, batch_size=2, num_workers=2, train=True, pin_memory=False)
    dataset.set_epoch(1)
    uninterrupted = [list(batch) for batch in loader]
    dataset.set_epoch(1)
    assert [list(batch) for batch in _batches_after(loader, 3)] == uninterrupted[3:]


def test_image_config_with_its_own_train_file_drops_the_video_shards(tmp_path):
    from video_pretrain import image_data_config
    image_config = tmp_path / "images.yaml"
    image_config.write_text("train_file: [images.json]\n")
    config = {"train_file": ["videos.json"], "train_shards": "videos-{0..3}.tar", "train_shards_samples": 40}
    merged = image_data_config(config, str(image_config))
    assert merged["train_file"] == ["images.json"] and "train_shards" not in merged
    assert "train_shards_samples" not in merged
    image_config.write_text("train_shards: images-{0..1}.tar\n")
    assert image_data_config(config, str(image_config))["train_shards"] == "images-{0..1}.tar"


def test_urls_need_the_sample_count_and_stream_through_pipes(corpus, even_shards, keys_only):
    pipes = [f"pipe:cat {url}" for url in shard_urls(even_shards)]
    with pytest.raises(ConfigError, match="train_shards_samples"):
        ShardedPretrainDataset(data_config(corpus, pipes, batch_size=5), rank=0, world_size=1)
    with pytest.raises(DataError, match="do not exist"):
        ShardedPretrainDataset(data_config(corpus, f"{even_shards}/pretrain-{{000003..000004}}.tar", batch_size=5))
    config = data_config(corpus, pipes, batch_size=5, train_shards_samples=20)
    keys = [key for rank in range(2) for batch in epoch_keys(config, rank, 0, 5) for key in batch]
    assert sorted(keys) == [f"{row:09d}" for row in range(20)]


def test_truncated_shard_is_counted_and_the_epoch_keeps_its_length(corpus, even_shards, tmp_path, keys_only):
    for path in Path(even_shards).glob("*.tar"):
        data = path.read_bytes()
        (tmp_path / path.name).write_bytes(data[:len(data) // 2] if path.name.endswith("01.tar") else data)
    (tmp_path / "manifest.json").write_bytes((Path(even_shards) / "manifest.json").read_bytes())
    dataset = ShardedPretrainDataset(data_config(corpus, shard_urls(tmp_path), batch_size=5), rank=0, world_size=1)
    assert len(list(dataset)) == len(dataset) == 20
    assert f"shard {tmp_path / 'pretrain-000001.tar'}" in dataset.bad_inputs.paths()
