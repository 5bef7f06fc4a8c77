"""Data pipeline on generated files: readers, every dataset, bad inputs, loaders, compress, toy."""
import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data.compress import main as compress_main
from data.datasets import DATASETS, create_dataset
from data.loader import create_loader, vqa_collate_fn
from data.text import pre_caption
from data.toy import COLORS
from data.toy import main as toy_main
from data.toy import random_events, render_event, write_corpus, write_mp4
from data.video import STRATEGIES, VideoReadError, read_video

FRAMES, SIZE = 8, 32
IMG = 28  # decord mis-sizes some small widths (16, 24, ...); these two it resizes to


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return write_corpus(root, num_clips=8, frames=FRAMES, size=SIZE, seed=0, num_images=2)


def config_for(corpus, name, **overrides):
    paths = corpus["config"]
    config = {"video_root": paths["video_root"], "ann_root": paths["ann_root"], "image_size": IMG,
              "video_resize": SIZE, "num_frm_train": 4, "num_frm_test": 4, "max_words": 30,
              "frm_sampling_strategy": "rand"}
    if name.startswith("pretrain"):
        config.update(video_root=paths["pretrain_video_root"],
                      train_file=paths["image_train_file" if name == "pretrain_image" else "train_file"])
    if name in ("retrieval_condensedmovies", "retrieval_queryd"):
        config["video_root"] = paths["video_root_" + name.split("_")[1]]
    config.update(overrides)
    return config


def splits_of(name):
    return ["train"] if name.startswith("pretrain") else ["train", "val", "test"]


def clip_path(corpus, index=0):
    return f"{corpus['config']['video_root']}/v_toy{index:05d}.mp4"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decord_and_pyav_return_the_same_frames(corpus, strategy):
    native = [read_video(clip_path(corpus), 6, strategy, None, random.Random(7), backend=b) for b in ("decord", "pyav")]
    assert native[0].shape == (6, 3, SIZE, SIZE) and native[0].dtype == torch.uint8
    assert torch.equal(native[0], native[1])
    resized = [read_video(clip_path(corpus), 6, strategy, 20, random.Random(7), backend=b) for b in ("decord", "pyav")]
    assert resized[0].shape == resized[1].shape == (6, 3, 20, 20)
    assert (resized[0].float() - resized[1].float()).abs().mean() < 4  # scalers differ slightly


def test_readers_agree_on_a_matroska_file_without_frame_count(tmp_path):
    path = tmp_path / "clip.mkv"
    frames = np.random.default_rng(1).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    write_mp4(path, frames)  # PyAV picks the container from the extension
    with av.open(str(path)) as container:
        assert container.format.name.startswith("matroska")
    clips = [read_video(path, 5, "uniform", None, backend=b) for b in ("decord", "pyav")]
    assert clips[0].shape == (5, 3, SIZE, SIZE) and torch.equal(clips[0], clips[1])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_short_clip_repeats_frames(tmp_path, backend):
    path = tmp_path / "short.mp4"
    write_mp4(path, render_event({"color": "red", "shape": "circle", "direction": "up"}, 3, SIZE))
    clip = read_video(path, 8, "rand", None, random.Random(0), backend=backend)
    assert clip.shape == (8, 3, SIZE, SIZE)


def test_toy_frames_show_the_captioned_colours(corpus):
    events = random_events(random.Random(corpus["seed"]))  # the first clip's events
    caption = corpus["example_caption"]
    assert caption.startswith(f"a {events[0]['color']} {events[0]['shape']} moves {events[0]['direction']}")
    clip = read_video(clip_path(corpus), FRAMES, "uniform", backend="pyav").permute(0, 2, 3, 1).float()
    for frame, event in ((clip[0], events[0]), (clip[-1], events[1])):
        distance = (frame - torch.tensor(COLORS[event["color"]], dtype=torch.float)).norm(dim=-1)
        assert (distance < 60).sum() > SIZE  # the shape's colour covers a visible area


@pytest.mark.parametrize("name,split", [(n, s) for n in sorted(DATASETS) for s in splits_of(n)])
def test_every_dataset_yields_uint8_clips_in_the_encoder_layout(corpus, name, split):
    dataset = create_dataset(name, config_for(corpus, name), split)
    assert len(dataset) > 0
    item = dataset[0]
    num_frm = 4
    assert item[0].shape == (3, num_frm, IMG, IMG) and item[0].dtype == torch.uint8  # the encoder normalises
    if split != "train":  # evaluation: deterministic uniform frames at image_size
        path = dataset.video[0] if hasattr(dataset, "video") else dataset.items[0][0]
        assert torch.equal(item[0], read_video(path, num_frm, "uniform", IMG).transpose(0, 1))


@pytest.mark.parametrize("name", sorted(n for n in DATASETS if n.startswith("retrieval")))
def test_retrieval_mappings(corpus, name):
    config = config_for(corpus, name)
    train = create_dataset(name, config, "train")
    _, caption, video_index = train[2]
    assert caption == train.items[2][1] and video_index == 2  # one paragraph per toy clip
    for split in ("val", "test"):
        evaluation = create_dataset(name, config, split)
        assert len(evaluation.text) == len(evaluation.video) == len(evaluation.txt2video)  # DiDeMo de-duplicated
        for text_id, video_id in enumerate(evaluation.txt2video):
            assert text_id in evaluation.video2txt[video_id]
        assert evaluation[len(evaluation) - 1][1] == len(evaluation) - 1
    annotated = json.load(open(f"{config['ann_root']}/val.json"))  # ActivityNet format holds the same paragraphs
    evaluation = create_dataset(name, config, "val")
    assert evaluation.text[0] == pre_caption(" ".join(annotated[0]["caption"]), 30)
    assert evaluation.video[0].stem == annotated[0]["video"][:-4]


def test_each_format_cleans_captions_as_the_original():
    from data.datasets import RETRIEVAL_FORMATS
    text = 'A "Red" Ball (fast)! ' + " ".join(f"w{i}" for i in range(60))
    cleaned = {name: clean(text, 5) for name, (_, clean) in RETRIEVAL_FORMATS.items()}
    assert cleaned["retrieval_didemo"] == text  # untouched
    assert cleaned["retrieval_queryd"] == "a red ball fast w0"  # max_words
    assert cleaned["retrieval_activitynet"] == cleaned["retrieval_condensedmovies"] == pre_caption(text, 50)
    assert len(cleaned["retrieval_activitynet"].split()) == 50


def test_evaluation_keeps_each_videos_first_line_and_reports_the_rest(corpus, tmp_path, capsys):
    lines = [{"clip_name": "v_toy00000", "caption": "First (A)!"}, {"clip_name": "v_toy00001", "caption": "b"},
             {"clip_name": "v_toy00000", "caption": "second a"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", ann_root=str(tmp_path)), "test")
    assert dataset.text == ["First (A)!", "b"] and dataset.txt2video == [0, 1] and dataset.video2txt == [[0], [1]]
    assert "dropped 1 of 3 annotation lines for videos already listed" in capsys.readouterr().out


def test_activitynet_test_split_reuses_val(corpus):
    config = config_for(corpus, "retrieval_activitynet")
    val, test = (create_dataset("retrieval_activitynet", config, s) for s in ("val", "test"))
    assert val.text == test.text and val.video == test.video


def test_qa_answers_weights_ids_and_answer_list(corpus, tmp_path):
    config = config_for(corpus, "activitynet_qa")
    train = create_dataset("activitynet_qa", config, "train")
    _, question, answers, weights = train[0]
    assert question == "what color is the first shape?" and answers == [corpus["example_caption"].split()[1]]
    assert weights == [0.2]  # the original's answer weight
    assert create_dataset("activitynet_qa", dict(config, answer_weight=1.0), "train")[0][3] == [1.0]
    test = create_dataset("activitynet_qa", config, "test")
    _, _, question_id = test[0]
    assert question_id == test.question_ids[0] and test.question_types[question_id] == "color"
    # By default the candidates are the test answers (the original's rule); `train` lists the training answers.
    assert test.answer_list == list(dict.fromkeys(test.answers[qid] for qid in test.question_ids))
    train_answers = [row["answer"] for row in json.load(open(f"{config['ann_root']}/train_a.json"))]
    strict = create_dataset("activitynet_qa", dict(config, answer_candidates="train"), "test")
    assert strict.answer_list == list(dict.fromkeys(train_answers)) and strict.candidate_rule == "train"
    video = Path(config["video_root"]) / f"v_{test.items[0][2].rsplit('_', 1)[0]}.mp4"
    webm_root = tmp_path / "webm"
    webm_root.mkdir()
    (webm_root / video.with_suffix(".webm").name).symlink_to(video)
    webm = create_dataset("activitynet_qa", dict(config, video_root=str(webm_root)), "test")
    assert webm.items[0][0].suffix == ".webm" and webm[0][0].shape == (3, 4, IMG, IMG)
    (tmp_path / "answers.json").write_text(json.dumps(["red", "blue"]))
    assert create_dataset("activitynet_qa", dict(config, answer_list=str(tmp_path / "answers.json")),
                          "val").answer_list == ["red", "blue"]


def test_pretrain_mixes_videos_and_images(corpus):
    dataset = create_dataset("pretrain", config_for(corpus, "pretrain", num_frm_train=3))
    kinds = [path.suffix for path, _ in dataset.items]
    assert {".mp4", ".png", ".jpg"} <= set(kinds)
    image_clip, caption = dataset[kinds.index(".png")]
    assert image_clip.shape == (3, 3, IMG, IMG) and torch.equal(image_clip[:, 0], image_clip[:, 2])
    assert caption.count(" ") == 2  # "a <colour> <shape>"
    images = create_dataset("pretrain_image", config_for(corpus, "pretrain_image", num_frm_train=2))
    assert len(images) == 2 and images[0][0].shape == (3, 2, IMG, IMG)


def test_published_pretrain_config_runs_without_video_root(corpus, tmp_path, monkeypatch):
    """configs/pretrain_timesformer.yaml names no video_root: absolute paths are used as they
    are, relative ones resolve against video_root when given, else the working folder."""
    from tests.helpers import REPO_ROOT, read_yaml
    root = Path(corpus["config"]["pretrain_video_root"])
    entries = [e for f in corpus["config"]["train_file"] for e in json.loads(Path(f).read_text())]
    absolute = tmp_path / "absolute.json"
    absolute.write_text(json.dumps([dict(e, path=str(root / e["path"])) for e in entries]))
    config = read_yaml(REPO_ROOT / "configs" / "pretrain_timesformer.yaml")
    assert "video_root" not in config
    config.update(train_file=[str(absolute)], image_size=IMG, video_resize=SIZE, num_frm_train=2)
    dataset = create_dataset("pretrain", config)
    assert len(dataset) == len(entries) and dataset[0][0].shape == (3, 2, IMG, IMG)
    relative = dict(config, train_file=corpus["config"]["train_file"])
    assert len(create_dataset("pretrain", dict(relative, video_root=str(root)))) == len(entries)
    monkeypatch.chdir(root)
    assert len(create_dataset("pretrain", relative)) == len(entries)


def test_unknown_dataset_strategy_and_missing_annotation_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="headtail"):
        create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", frm_sampling_strategy="middle"))
    with pytest.raises(ValueError, match="retrieval_didemo"):
        create_dataset("retrieval_msrvtt", config_for(corpus, "retrieval_didemo"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train.jsonl")):
        create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", ann_root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="exists_val_list.txt"):
        create_dataset("retrieval_queryd", config_for(corpus, "retrieval_queryd", ann_root=str(tmp_path)), "val")


@pytest.fixture()
def damaged(corpus, tmp_path):
    """A copy of the toy videos in which four clips are broken in the four stated ways."""
    root = tmp_path / "videos"
    root.mkdir()
    for path in Path(corpus["config"]["video_root"]).iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    long_clip = np.random.default_rng(0).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    write_mp4(root / "v_toy00000.mp4", long_clip, faststart=True)  # header first, so truncation bites in the data
    data = (root / "v_toy00000.mp4").read_bytes()
    (root / "v_toy00000.mp4").write_bytes(data[:len(data) // 2])
    (root / "v_toy00001.mp4").write_bytes(b"")
    (root / "v_toy00002.mp4").write_text("this is a text file, not a video\n")
    (root / "v_toy00003.mp4").unlink()
    return root


BAD = {"v_toy00000.mp4", "v_toy00001.mp4", "v_toy00002.mp4"}


def test_training_replaces_bad_videos_counts_and_logs_once(corpus, damaged, capfd):
    dataset = create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", video_root=str(damaged)))
    assert "dropped 1 of 5" in capfd.readouterr().out  # the missing clip, reported once at build time
    assert len(dataset) == 4
    random.seed(0)
    for index in (0, 0, 1, 2):  # items 0-2 are broken; item 3 is the only good one
        _, _, video_index = dataset[index]
        assert video_index == 3
    assert dataset.bad_inputs.count() >= 4
    assert set(p.split("/")[-1] for p in dataset.bad_inputs.paths()) == BAD
    logged = capfd.readouterr().err
    assert all(logged.count(f"unreadable input {damaged}/{name}") == 1 for name in BAD)
    dataset.bad_inputs.reset()
    assert dataset.bad_inputs.count() == 0


def test_training_gives_up_after_bounded_tries(corpus, damaged):
    dataset = create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", video_root=str(damaged)),
                             max_tries=3)
    dataset.items = dataset.items[:3]  # only broken clips left
    with pytest.raises(RuntimeError, match="3 unreadable inputs in a row"):
        dataset[0]


def test_bad_count_is_aggregated_over_loader_workers(corpus, damaged):
    dataset = create_dataset("retrieval_didemo", config_for(corpus, "retrieval_didemo", video_root=str(damaged)))
    loader = create_loader(dataset, None, batch_size=1, num_workers=2, train=False, pin_memory=False)
    assert sum(1 for _ in loader) == 4
    assert dataset.bad_inputs.count() >= 3  # each broken item was tried at least once, in either worker


def test_evaluation_fails_with_the_path_or_substitutes_black(corpus, damaged):
    config = config_for(corpus, "retrieval_didemo", video_root=str(damaged))
    strict = create_dataset("retrieval_didemo", config, "val")
    (damaged / strict.video[0].name).write_bytes(b"")  # break the first evaluation clip
    with pytest.raises(VideoReadError, match=strict.video[0].name):
        strict[0]
    lenient = create_dataset("retrieval_didemo", config, "val", substitute_black_on_error=True)
    clip, index = lenient[0]
    assert index == 0 and torch.equal(clip, torch.zeros(3, 4, IMG, IMG, dtype=torch.uint8))
    assert lenient.bad_inputs.count() == 1 and strict.bad_inputs.count() == 0


def test_qa_loader_with_collate(corpus):
    dataset = create_dataset("activitynet_qa", config_for(corpus, "activitynet_qa"))
    loader = create_loader(dataset, None, batch_size=3, num_workers=0, train=True, collate_fn=vqa_collate_fn,
                           pin_memory=False)
    videos, questions, answers, weights, counts = next(iter(loader))
    assert videos.shape == (3, 3, 4, IMG, IMG) and len(questions) == 3 and len(answers) == sum(counts) == 3
    assert weights.tolist() == pytest.approx([0.2, 0.2, 0.2])  # the original's answer weight


def test_compress_converts_resumes_and_lists_failures(corpus, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    (source / "clip.mp4").write_bytes(open(clip_path(corpus), "rb").read())
    (source / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    names = tmp_path / "names.txt"
    names.write_text("clip.mp4\nbroken.mp4\n")
    args = ["--input_root", str(source), "--output_root", str(out), "--names_file", str(names),
            "--fps", "4", "--size", "24", "--num_workers", "2"]
    assert compress_main(args) == 1
    assert "FAILED broken.mp4" in capsys.readouterr().out
    clip = read_video(out / "clip.mp4", 4, "uniform", backend="pyav")
    assert clip.shape == (4, 3, 24, 24)  # 8 frames at 8 fps -> 4 frames at 4 fps
    with av.open(str(out / "clip.mp4")) as container:
        assert container.streams.video[0].frames == 4 and not container.streams.audio
    before = (out / "clip.mp4").stat().st_mtime_ns
    compress_main(args)
    assert (out / "clip.mp4").stat().st_mtime_ns == before  # already done: skipped


def test_toy_cli_writes_every_format(tmp_path, capsys):
    toy_main(["--out", str(tmp_path), "--num_clips", "4", "--frames", "8", "--size", "32", "--seed", "3"])
    assert "wrote 4 clips" in capsys.readouterr().out
    ann = tmp_path / "ann"
    expected = ["pretrain.json", "pretrain_images.json", "raw_captions_combined_filtered.pkl", "train.jsonl",
                "test.jsonl", "train.json", "val.json", "train_val_challf0.csv", "test_challf0.csv",
                "train_q.json", "test_a.json", "exists_test_list.txt"]
    assert all((ann / name).is_file() for name in expected)
    assert json.loads((tmp_path / "summary.json").read_text())["num_clips"] == 4
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 4
