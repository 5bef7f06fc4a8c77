"""Pre-training inputs rebuilt by hand the way the original (TESTA's pretrain_video_dataset)
built them, from the dataset's own per-item generator, and compared pixel for pixel.

The original, for a video entry: decord VideoReader(path, width=video_resize,
height=video_resize) (a squash in the decoder), frame indices by frm_sampling_strategy
(`headtail`: sorted(sample(range(vlen // 2), n // 2)) + sorted(sample(range(vlen // 2, vlen), n // 2));
`rand`: sorted(sample(range(vlen), n))), get_batch, one image_size square crop
(top = randint(0, H - size), left = randint(0, W - size)), a temporally consistent
RandAugment; caption pre_caption(caption, max_words). For an image entry: PIL
Image.open(path).convert('RGB'), RandomResizedCrop(scale 0.5-1) + flip + RandomAugment,
repeated num_frm_train times. What only the random streams change (which draws) is checked
as a rule, in distribution, by simulating the original's rule with its own generator.
"""
import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from ruamel.yaml import YAML
from torchvision.transforms import InterpolationMode

from configs.keys import value
from configs.load import load_config
from data.datasets import create_dataset
from data.shards import create_pretrain_dataset
from data.text import pre_caption
from data.toy import render_event, write_corpus
from data.transforms import VIDEO_OPS, ImageTrainTransform, VideoTrainTransform, apply_plan
from data.video import READER_VARIABLE, sample_frame_indices
from tests.helpers import REPO_ROOT

VLEN = 20  # frames in each toy clip
TOY = 64  # toy frame size in pixels
S = 80  # video_resize: decord upscales 64 -> 80 in its decoder (decord mis-sizes some small sizes; 80 it hits)
SIZE = 56  # image_size: a real crop of the 80 px frames
NUM_FRM = 8
MAX_WORDS = 30
PUBLISHED = REPO_ROOT / "configs" / "pretrain_timesformer.yaml"
PUBLISHED_IMAGES = REPO_ROOT / "configs" / "pretrain_timesformer_coco.yaml"

# Capitals, the punctuation pre_caption removes (! " ( ) * # ~) and keeps (: ;), doubled
# spaces, and more than MAX_WORDS words.
RAW_CAPTION = 'A Red CIRCLE moves "LEFT" (quickly)! Then: a  Blue square; moves up ~ #fast* ' + " ".join(
    f"Word{k}" for k in range(40))
# TESTA's pre_caption(RAW_CAPTION, 30), written out: 13 words, then word0 .. word16.
CLEAN_CAPTION = "a red circle moves left quickly then: a blue square; moves up fast " + " ".join(
    f"word{k}" for k in range(17))


def original_indices(strategy, vlen, n, rng):
    """The original's frame-index rules, with `rng` in place of the global `random`."""
    if strategy == "headtail":
        return sorted(rng.sample(range(vlen // 2), n // 2)) + sorted(rng.sample(range(vlen // 2, vlen), n // 2))
    if strategy == "rand":
        return sorted(rng.sample(range(vlen), n))
    raise ValueError(strategy)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 toy clips of 20 frames (64 px), the toy images, a non-square palette PNG, and an
    annotation file of absolute paths whose captions this module controls."""
    root = tmp_path_factory.mktemp("pretrain_inputs")
    summary = write_corpus(root, num_clips=3, frames=VLEN, size=TOY, seed=0, num_images=2)
    frame = render_event({"color": "blue", "shape": "triangle", "direction": "up"}, 3, TOY)[1]
    frame[:, :, 1] = np.arange(TOY, dtype=np.uint8)[None, :] * 3  # a gradient, so a flip shows
    palette = root / "images" / "palette.png"
    Image.fromarray(frame[:40]).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)  # 40 x 64, mode P
    videos = sorted((root / "videos").glob("*.mp4"))
    images = [root / "images" / "img_000.png", root / "images" / "img_001.jpg", palette]
    entries = [{"path": str(videos[0]), "caption": RAW_CAPTION}]
    entries += [{"path": str(path), "caption": f"Clip {k}: a (small) VIDEO!"} for k, path in enumerate(videos[1:])]
    entries += [{"path": str(path), "caption": f"Image #{k} ~ of A shape"} for k, path in enumerate(images)]
    ann = root / "ann" / "pretrain_inputs.json"
    ann.write_text(json.dumps(entries))
    return {"root": root, "summary": summary, "ann": ann, "videos": videos, "images": images}


def toy_config(corpus, **overrides):
    config = {"train_file": [str(corpus["ann"])], "image_size": SIZE, "video_resize": S, "num_frm_train": NUM_FRM,
              "frm_sampling_strategy": "headtail", "max_words": MAX_WORDS}
    config.update(overrides)
    return config


def indices_of(dataset, suffixes):
    return [k for k, (path, _) in enumerate(dataset.items) if path.suffix in suffixes]


@pytest.mark.parametrize("strategy", ["headtail", "rand"])
def test_video_item_is_the_originals_decord_squash_crop_and_augment(corpus, monkeypatch, strategy):
    decord = pytest.importorskip("decord")
    monkeypatch.delenv(READER_VARIABLE, raising=False)  # the default reader order: decord first
    dataset = create_dataset("pretrain", toy_config(corpus, frm_sampling_strategy=strategy))
    assert dataset.decode_size == S and dataset.transform.image_size == SIZE and dataset.max_words == MAX_WORDS
    crops = []
    for index in indices_of(dataset, {".mp4"}):
        path, raw = dataset.items[index]
        clip, caption = dataset[index]

        rng = dataset.item_rng(index)  # the generator the item drew from, replayed
        reader = decord.VideoReader(str(path), width=S, height=S)
        assert len(reader) == VLEN
        indices = original_indices(strategy, len(reader), NUM_FRM, rng)
        if strategy == "headtail":  # half from each half, each half sorted and distinct
            head, tail = indices[:NUM_FRM // 2], indices[NUM_FRM // 2:]
            assert all(0 <= i < VLEN // 2 for i in head) and all(VLEN // 2 <= i < VLEN for i in tail)
            assert head == sorted(set(head)) and tail == sorted(set(tail))
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())  # (T, H, W, C)
        assert frames.shape == (NUM_FRM, S, S, 3)
        frames = frames.permute(0, 3, 1, 2)  # (T, C, H, W)

        state = rng.getstate()
        top, left, plan = VideoTrainTransform(SIZE).draw(rng, S, S)
        twin = random.Random()
        twin.setstate(state)  # the original's crop rule: top first, both bounds included
        assert (top, left) == (twin.randint(0, S - SIZE), twin.randint(0, S - SIZE))
        assert len(plan) == 2 and len({name for name, _ in plan}) == 2 and {n for n, _ in plan} <= set(VIDEO_OPS)
        expected = apply_plan(frames[..., top:top + SIZE, left:left + SIZE], plan)

        assert clip.dtype == torch.uint8 and clip.shape == (3, NUM_FRM, SIZE, SIZE)  # (C, T, H, W)
        assert torch.equal(clip, expected.transpose(0, 1))
        assert caption == pre_caption(raw, MAX_WORDS)
        crops.append((top, left))

        # The check tells decoder-side resizing from resizing after a full-size decode.
        native = torch.from_numpy(decord.VideoReader(str(path)).get_batch(indices).asnumpy()).permute(0, 3, 1, 2)
        assert native.shape[-2:] == (TOY, TOY)
        assert not torch.equal(F.resize(native, [S, S], antialias=True), frames)
    assert len(crops) == 3 and any(crop != (0, 0) for crop in crops)
    assert dataset.bad_inputs.count() == 0  # no item was replaced by another
    assert dataset[indices_of(dataset, {".mp4"})[0]][1] == CLEAN_CAPTION


def test_caption_is_testas_pre_caption():
    assert pre_caption(RAW_CAPTION, MAX_WORDS) == CLEAN_CAPTION
    assert len(CLEAN_CAPTION.split(" ")) == MAX_WORDS


def test_image_item_is_pil_rgb_resized_crop_flip_augment_repeated(corpus):
    dataset = create_dataset("pretrain", toy_config(corpus))
    images = indices_of(dataset, {".png", ".jpg"})
    assert len(images) == 3
    flips, plans = set(), 0
    for epoch in range(4):  # other draws each epoch
        dataset.set_epoch(epoch)
        for index in images:
            path, raw = dataset.items[index]
            clip, caption = dataset[index]
            rng = dataset.item_rng(index)
            with Image.open(path) as picture:
                image = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
            height, width = image.shape[-2:]
            box, flip, plan = ImageTrainTransform(SIZE, NUM_FRM).draw(rng, height, width)
            top, left, box_height, box_width = box
            assert 0 <= top <= height - box_height and 0 <= left <= width - box_width
            area = box_height * box_width / (height * width)
            assert 0.45 <= area <= 1.0 or (top, left) == ((height - box_height) // 2, (width - box_width) // 2)
            frame = F.resized_crop(image, *box, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC,
                                   antialias=True)
            if flip:
                frame = frame.flip(-1)
            frame = apply_plan(frame, plan)
            assert clip.dtype == torch.uint8 and clip.shape == (3, NUM_FRM, SIZE, SIZE)
            for t in range(NUM_FRM):  # the same frame num_frm times
                assert torch.equal(clip[:, t], frame)
            assert caption == pre_caption(raw, MAX_WORDS)
            flips.add(flip)
            plans += bool(plan)
    assert flips == {True, False} and plans > 0  # the draws exercised flips and ops
    with Image.open(corpus["images"][2]) as picture:
        assert picture.mode == "P" and picture.size == (TOY, 40)  # convert('RGB') and a non-square image were used


def test_sep_img_overlays_the_published_image_config(corpus, tmp_path):
    from video_pretrain import image_data_config
    main = load_config(PUBLISHED)
    images = load_config(PUBLISHED_IMAGES)
    merged = image_data_config(dict(main), str(PUBLISHED_IMAGES))
    assert (merged["batch_size"], merged["num_frm_train"], merged["image_size"], merged["max_words"]) == (24, 2, 224, 30)
    assert merged["train_file"] == images["train_file"] != main["train_file"]
    assert {key: merged[key] for key in main if key not in images} == {k: v for k, v in main.items() if k not in images}
    assert (main["batch_size"], main["num_frm_train"]) == (12, 8)  # the main config is not changed
    assert value(merged, "caption_max_words") == 30 and value(merged, "frm_sampling_strategy") == "headtail"
    # The image config's train_file replaces the main config's shards too.
    assert "train_shards" not in image_data_config(dict(main, train_shards="videos-{0..1}.tar"), str(PUBLISHED_IMAGES))

    # The published image config with its train_file pointed at the toy images.
    toy_images = dict(YAML(typ="safe").load(PUBLISHED_IMAGES.read_text()),
                      train_file=corpus["summary"]["config"]["image_train_file"],
                      video_root=corpus["summary"]["config"]["pretrain_video_root"])
    path = tmp_path / "images.yaml"
    YAML(typ="safe").dump(toy_images, path)
    config = image_data_config(dict(main), str(path))
    dataset = create_pretrain_dataset("pretrain_image", config, 0, 1)
    assert len(dataset) == 2 and dataset.num_frm == 2 and dataset.image_transform.num_frm == 2
    for index in range(len(dataset)):
        clip, caption = dataset[index]
        assert clip.shape == (3, 2, 224, 224) and clip.dtype == torch.uint8
        assert torch.equal(clip[:, 0], clip[:, 1])
        assert caption == pre_caption(dataset.items[index][1], 30)


TRIALS = 5000


def position_stats(draws, values):
    """Per position: mean, and the empirical distribution over `values`."""
    draws = np.asarray(draws)
    return draws.mean(axis=0), np.stack([(draws == v).mean(axis=0) for v in values], axis=1)


@pytest.mark.parametrize("strategy", ["headtail", "rand"])
def test_sampling_rule_equals_the_originals_in_distribution(strategy):
    vlen, n = 20, 8
    ours = np.array([sample_frame_indices(vlen, n, strategy, random.Random(f"ours/{k}")) for k in range(TRIALS)])
    reference = random.Random(20240611)  # the original's rule, drawing from its own generator
    original = np.array([original_indices(strategy, vlen, n, reference) for _ in range(TRIALS)])
    assert ours.shape == original.shape == (TRIALS, n)

    if strategy == "headtail":
        halves = [(ours[:, :n // 2], range(vlen // 2)), (ours[:, n // 2:], range(vlen // 2, vlen))]
    else:
        halves = [(ours, range(vlen))]
    for part, allowed in halves:
        assert part.min() >= allowed.start and part.max() < allowed.stop
        assert (np.diff(part, axis=1) > 0).all()  # sorted and distinct within each part
        assert set(part.ravel().tolist()) == set(allowed)  # every index reachable

    our_means, our_dist = position_stats(ours, range(vlen))
    original_means, original_dist = position_stats(original, range(vlen))
    # Order statistics of k distinct draws from m consecutive frames starting at `first`:
    # E[j-th smallest] = first + j (m + 1) / (k + 1) - 1, j = 1..k.
    parts = [(0, vlen // 2, n // 2), (vlen // 2, vlen - vlen // 2, n // 2)] if strategy == "headtail" else [
        (0, vlen, n)]
    exact = np.concatenate([[first + j * (m + 1) / (k + 1) - 1 for j in range(1, k + 1)] for first, m, k in parts])
    np.testing.assert_allclose(original_means, exact, atol=0.15)  # the simulation itself is sound
    np.testing.assert_allclose(our_means, original_means, atol=0.2)  # about 6 standard errors
    np.testing.assert_allclose(our_means, exact, atol=0.15)
    total_variation = 0.5 * np.abs(our_dist - original_dist).sum(axis=1)
    assert total_variation.max() < 0.06, total_variation

    # Stronger than distribution: from the same generator state the draws are the original's.
    for seed in range(200):
        assert sample_frame_indices(vlen, n, strategy, random.Random(seed)) == original_indices(
            strategy, vlen, n, random.Random(seed))


def test_published_pretrain_config_decodes_at_256_and_crops_to_224(corpus, monkeypatch):
    monkeypatch.delenv(READER_VARIABLE, raising=False)
    published = load_config(PUBLISHED)
    assert (published["video_resize"], published["image_size"], published["num_frm_train"],
            published["frm_sampling_strategy"], published["max_words"]) == (256, 224, 8, "headtail", 30)
    dataset = create_dataset("pretrain", dict(published, train_file=[str(corpus["ann"])]))
    assert dataset.decode_size == 256 and dataset.transform.image_size == 224
    assert dataset.image_transform.image_size == 224 and dataset.image_transform.num_frm == 8
    assert dataset.strategy == "headtail" and dataset.num_frm == 8 and dataset.max_words == 30

    seen = []
    transform = dataset.transform

    def spy(clip, rng):
        seen.append(tuple(clip.shape))
        return transform(clip, rng)

    dataset.transform = spy
    video = indices_of(dataset, {".mp4"})[0]
    clip, caption = dataset[video]
    assert seen == [(8, 3, 256, 256)]  # decoded (squashed) at video_resize, 64 px toy frames upscaled
    assert clip.shape == (3, 8, 224, 224) and clip.dtype == torch.uint8
    assert caption == CLEAN_CAPTION
    image_clip, _ = dataset[indices_of(dataset, {".png"})[0]]
    assert image_clip.shape == (3, 8, 224, 224)
