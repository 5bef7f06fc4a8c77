"""Datasets: pre-training (videos and images mixed), paragraph-to-video retrieval (train
and evaluation views over four annotation formats) and ActivityNet-QA. All share
ClipDataset: clip reading, transforms and the bad-input policy."""
import os
import random
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from configs.keys import ConfigError, value
from runtime.distributed import get_rank
from runtime.errors import DataError

from .annotations import layout_of, read_activitynet, read_condensedmovies, read_didemo, read_json, read_queryd
from .bad_inputs import BadInputLog
from .text import pre_caption, pre_question
from .transforms import EvalTransform, ImageTrainTransform, VideoTrainTransform
from .video import STRATEGIES, VideoReadError, read_clip

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".flv", ".mkv", ".webm")


def config_value(config, key, dataset):
    return value(config, key, f"dataset {dataset!r}")


def encoder_layout(clip: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) frames as the video encoder takes a clip, (C, T, H, W); batches are then (B, C, T, H, W)."""
    return clip.transpose(0, 1)


def outside_root(path, root) -> bool:
    """Whether `path` leaves `root` by its name alone: `..` parts that climb out, or an absolute
    name (which joining to root keeps as it is). Symbolic links inside root are the user's own
    and are not followed."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) != root


def drop_missing(items, path_of, dataset, split, video_root):
    """Keep the items whose file exists; print one line with the number dropped. A split with
    nothing left is an error here, in words, rather than an empty batch list deep in evaluation."""
    kept = [item for item in items if path_of(item) is not None and Path(path_of(item)).is_file()]
    if not kept:
        where = f"under video_root {video_root}" if str(video_root) not in ("", ".") else "(video_root is not set)"
        found = f"none of the {len(items)} files it lists exist {where}" if items else "its annotations list nothing"
        raise DataError(f"{dataset} {split} split: {found}")
    if len(kept) < len(items):
        print(f"[data] {dataset}: dropped {len(items) - len(kept)} of {len(items)} items whose video is missing")
    return kept


class ClipDataset(Dataset):
    """Reads clips under the bad-input policy.

    Clips are decoded straight at image_size (squashed, as the original's readers did), unless
    `augment`: then at video_resize, followed by VideoTrainTransform's random crop and ops.
    Training frames are sampled by frm_sampling_strategy, evaluation frames by
    frm_sampling_strategy_test.

    Training: an unreadable file is logged once, counted, and the item is replaced by a
    random other one, at most `max_tries` times in a row. Evaluation: it raises with the
    path, unless `substitute_black_on_error` (the config key, or the option of the same
    name), which substitutes a black clip and counts it.
    `bad_inputs.count()` / `.reset()` read the count over all worker processes. A clip with
    fewer frames than sampled is used with its frames repeated, as the original's sampling
    does: one `warning:` line per file, and `short_clips` counts them like `bad_inputs`.

    Training randomness (frame sampling, crops, augmentation, replacement picks) of item i
    comes from a generator seeded with (seed, epoch, rank, i) alone, so an item is the same
    whichever worker loads it and however many items came before (a resumed epoch, another
    num_workers). `set_epoch` must be called before each epoch's loader iterator is built
    (workers copy the dataset then); `set_seed` sets seed and rank, which default to the
    config's `seed` and this process's rank.
    """

    def __init__(self, config, name, train, augment=False, substitute_black_on_error=None, max_tries=10):
        self.name, self.train, self.augment, self.max_tries = name, train, augment, max_tries
        # Optional for pre-training, whose annotation files may hold absolute paths.
        self.video_root = Path(config.get("video_root") or "")
        self.allow_outside_video_root = value(config, "allow_paths_outside_video_root")
        self.image_size = config_value(config, "image_size", name)
        self.num_frm = config_value(config, "num_frm_train" if train else "num_frm_test", name)
        self.max_words = value(config, "caption_max_words")
        strategy_key = "frm_sampling_strategy" if train else "frm_sampling_strategy_test"
        self.strategy = value(config, strategy_key)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{strategy_key} {self.strategy!r} is unknown; expected one of {STRATEGIES}")
        if augment:
            self.decode_size = max(value(config, "video_resize"), self.image_size)
            self.transform = VideoTrainTransform(self.image_size)
            self.image_transform = ImageTrainTransform(self.image_size, self.num_frm)  # pre-training's images
        else:
            self.decode_size = self.image_size
            self.transform = EvalTransform(self.image_size)
        if substitute_black_on_error is None:
            substitute_black_on_error = value(config, "substitute_black_on_error")
        self.substitute_black_on_error = substitute_black_on_error
        self.bad_inputs = BadInputLog()
        self.short_clips = BadInputLog("warning: {path} has fewer frames than sampled ({reason}): its frames repeat")
        self.epoch = 0
        self.set_seed(value(config, "seed"), get_rank())

    def refuse_paths_outside_video_root(self, paths, split, allow_absolute=False):
        """Annotations may only name files under video_root (an annotation file from elsewhere
        must not make the run read arbitrary files), unless allow_paths_outside_video_root;
        `allow_absolute` keeps pre-training's documented absolute paths."""
        if self.allow_outside_video_root:
            return
        outside = [path for path in paths
                   if outside_root(path, self.video_root) and not (allow_absolute and Path(path).is_absolute()
                                                                   and ".." not in Path(path).parts)]
        if outside:
            raise DataError(f"{self.name} {split} split: {len(outside)} of {len(paths)} annotation paths lie outside "
                            f"video_root {os.path.abspath(self.video_root)}, e.g. {outside[0]}; set "
                            "allow_paths_outside_video_root: true to read them")

    def set_seed(self, seed, rank=0):
        self.seed, self.rank = seed, rank

    def set_epoch(self, epoch):
        self.epoch = epoch

    def item_rng(self, index):
        """The generator of training item `index` this epoch. A local generator, not a reseed of
        the global ones: with num_workers=0 the items load in the training process, whose
        global RNGs drive dropout and are saved in checkpoints."""
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{index}")  # str seeds hash stably

    def load_video(self, path, rng=None, name=None):
        """The clip of a video file, or of its bytes (`name` then says which video it is)."""
        try:
            sampled = read_clip(path, self.num_frm, self.strategy, self.decode_size, rng, name=name)
        except VideoReadError as err:
            if not (self.train or self.substitute_black_on_error):
                raise  # evaluation never substitutes silently
            self.bad_inputs.record(name or path, err)
            if self.train:
                raise  # __getitem__ replaces the item
            clip = torch.zeros(self.num_frm, 3, self.image_size, self.image_size, dtype=torch.uint8)
        else:
            clip = sampled.frames
            if sampled.repeats_frames:  # used as it is, as the original did: said once per file, counted
                self.short_clips.record(name or path, f"only {len(set(sampled.indices))} distinct of the "
                                                      f"{self.num_frm} frames sampled")
        return encoder_layout(self.transform(clip, rng or random) if self.augment else self.transform(clip))

    def load_image(self, source, rng=None, name=None):
        """A training image (a path or a file object; `name` names it in errors) as a pseudo-clip."""
        try:
            with Image.open(source) as picture:
                image = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).contiguous()
        except Exception as err:  # PIL raises many types for a broken picture
            self.bad_inputs.record(name or source, err)
            raise VideoReadError(name or source, err) from err
        return encoder_layout(self.image_transform(image, rng or random))

    def item(self, index, rng=None):
        """Item `index`; training items draw every random choice from `rng`."""
        raise NotImplementedError

    def __getitem__(self, index):
        if not self.train:
            return self.item(index)
        rng = self.item_rng(index)
        for _ in range(self.max_tries):
            try:
                return self.item(index, rng)
            except VideoReadError:
                index = rng.randrange(len(self))
        raise DataError(f"{self.name}: {self.max_tries} unreadable inputs in a row; "
                        f"see {self.bad_inputs.paths()[:5]}")


class PretrainDataset(ClipDataset):
    """JSON arrays of {"path", "caption"}; video paths decode as clips, other paths as
    images repeated num_frm_train times. Absolute paths are used as they are; relative ones
    resolve against video_root when the config gives one, else against the working folder."""

    def __init__(self, config, name, split="train", **options):
        if split != "train":
            raise ValueError(f"{name} has only a 'train' split, got {split!r}")
        super().__init__(config, name, train=True, augment=True, **options)
        files = config_value(config, "train_file", name)
        items = []
        for path in [files] if isinstance(files, str) else files:
            entries = read_json(path, f"{name} train_file")
            with layout_of(path, 'a list of {"path", "caption"} objects'):
                items += [(self.video_root / e["path"], e["caption"]) for e in entries]
        self.refuse_paths_outside_video_root([path for path, _ in items], split, allow_absolute=True)
        self.items = drop_missing(items, lambda item: item[0], name, split, self.video_root)

    def __len__(self):
        return len(self.items)

    def item(self, index, rng=None):
        path, caption = self.items[index]
        is_video = path.suffix.lower() in VIDEO_EXTENSIONS
        clip = self.load_video(path, rng) if is_video else self.load_image(path, rng)
        return clip, pre_caption(caption, self.max_words)


def first_line_per_video(pairs, dataset, split):
    """Paragraph retrieval scores one text per video: keep each video's first annotation line
    and say how many later lines were dropped (the original kept them all, and gave a
    repeated clip's later lines the ground truth of whichever clip came just before)."""
    kept = {}
    for video, text in pairs:
        kept.setdefault(video, text)
    if len(kept) < len(pairs):
        print(f"[data] {dataset} {split}: dropped {len(pairs) - len(kept)} of {len(pairs)} annotation lines "
              "for videos already listed (rule: the first line of each video is its text)")
    return list(kept.items())


class RetrievalTrainDataset(ClipDataset):
    """Items (clip, caption, video index); the index numbers the split's distinct videos."""

    def __init__(self, config, name, pairs, clean_caption, **options):
        super().__init__(config, name, train=True, augment=value(config, "finetune_augmentation"), **options)
        pairs = [(self.video_root / video, text) for video, text in pairs]
        self.refuse_paths_outside_video_root([path for path, _ in pairs], "train")
        pairs = drop_missing(pairs, lambda p: p[0], name, "train", self.video_root)
        video_index = {}
        self.items = [(video, clean_caption(text, self.max_words), video_index.setdefault(video, len(video_index)))
                      for video, text in pairs]

    def __len__(self):
        return len(self.items)

    def item(self, index, rng=None):
        video, caption, video_index = self.items[index]
        return self.load_video(video, rng), caption, video_index


class RetrievalEvalDataset(ClipDataset):
    """Iterates over distinct videos -> (clip, video index); `.text`, `.video`,
    `.txt2video` and `.video2txt` hold the texts and the mappings for the metrics."""

    def __init__(self, config, name, pairs, clean_caption, split="test", **options):
        super().__init__(config, name, train=False, **options)
        pairs = [(self.video_root / video, text) for video, text in pairs]
        self.refuse_paths_outside_video_root([path for path, _ in pairs], split)
        pairs = drop_missing(pairs, lambda p: p[0], name, split, self.video_root)
        pairs = first_line_per_video(pairs, name, split)
        self.video = [video for video, _ in pairs]
        self.text = [clean_caption(text, self.max_words) for _, text in pairs]
        self.txt2video = list(range(len(pairs)))
        self.video2txt = [[index] for index in self.txt2video]

    def __len__(self):
        return len(self.video)

    def item(self, index, rng=None):
        return self.load_video(self.video[index]), index


def build_retrieval(config, name, split="train", reader=None, clean_caption=None, **options):
    pairs = reader(config_value(config, "ann_root", name), split)
    if split == "train":
        return RetrievalTrainDataset(config, name, pairs, clean_caption, **options)
    return RetrievalEvalDataset(config, name, pairs, clean_caption, split, **options)


ANSWER_CANDIDATE_RULES = ("split", "train")


def every_nth_after_shuffle(questions, every, seed):
    """The original's QA validation subset: the questions shuffled by a generator seeded with
    `seed` (as its `random.shuffle` after `random.seed(seed)`), then every `every`-th; all of
    them, in file order, when `every` is 1."""
    if every < 1:
        raise ConfigError(f"val_question_every must be at least 1, got {every}")
    if every == 1:
        return questions
    shuffled = list(questions)
    random.Random(seed).shuffle(shuffled)
    return shuffled[::every]


class VideoQADataset(ClipDataset):
    """ActivityNet-QA. Train items: (clip, question, answers, weights); evaluation items:
    (clip, question, question_id). `.answers` and `.question_types` map question_id to ground
    truth; `.answer_list` holds the candidates that `rank` inference chooses from, by the rule
    `.candidate_rule` (see candidates()). The val split keeps every val_question_every-th
    question of a seeded shuffle, as the original validated on a random 1/50 of it."""

    def __init__(self, config, name, split="train", **options):
        train = split == "train"
        super().__init__(config, name, train=train, augment=train and value(config, "finetune_augmentation"),
                         **options)
        ann_root = Path(config_value(config, "ann_root", name))
        questions = read_json(ann_root / f"{split}_q.json", f"{name} questions")
        answer_rows = read_json(ann_root / f"{split}_a.json", f"{name} answers")
        answers = defaultdict(list)
        with layout_of(ann_root / f"{split}_a.json", 'a list of {"question_id", "answer"} objects'):
            for row in answer_rows:
                answers[row["question_id"]].append(row["answer"])
            self.question_types = {row["question_id"]: row["type"] for row in answer_rows if "type" in row}
        self.answers = {qid: values[0] for qid, values in answers.items()}
        if split == "val":
            questions = every_nth_after_shuffle(questions, value(config, "val_question_every"), value(config, "seed"))
        with layout_of(ann_root / f"{split}_q.json", 'a list of {"question_id", "video_name", "question"} objects'):
            self.refuse_paths_outside_video_root([self.video_root / f"v_{q['video_name']}" for q in questions], split)
            items = [(self.video_path(q["video_name"]), pre_question(q["question"]), q["question_id"],
                      answers[q["question_id"]]) for q in questions]
        self.items = drop_missing(items, lambda item: item[0], name, split, self.video_root)
        self.question_ids = [item[2] for item in self.items]
        self.answer_weight = value(config, "answer_weight")
        self.candidate_rule = "answer_list" if value(config, "answer_list") else value(config, "answer_candidates")
        self.answer_list = self.candidates(config, ann_root)

    def video_path(self, video_name):
        """video_root/v_<name>.mp4, else .webm; None when neither exists."""
        for extension in (".mp4", ".webm"):
            path = self.video_root / f"v_{video_name}{extension}"
            if path.is_file():
                return path
        return None

    def candidates(self, config, ann_root):
        """The answers `rank` inference chooses from, in order of first appearance: `split`, the
        distinct answers of this split's questions (the original's rule, which listed them in
        Python's set order; ties among candidates then depended on string hashing); `train`, those
        of train_a.json; or the JSON list that `answer_list` names."""
        if self.candidate_rule == "answer_list":
            return read_json(config["answer_list"], f"{self.name} answer_list")
        if self.candidate_rule == "split":
            return list(dict.fromkeys(self.answers[qid] for qid in self.question_ids))
        if self.candidate_rule == "train":
            path = ann_root / "train_a.json"
            rows = read_json(path, f"{self.name} answers (for the answer list)")
            with layout_of(path, 'a list of {"question_id", "answer"} objects'):
                return list(dict.fromkeys(row["answer"] for row in rows))
        raise ConfigError(f"answer_candidates {self.candidate_rule!r} is unknown; expected one of "
                          f"{ANSWER_CANDIDATE_RULES}")

    def candidate_coverage(self):
        """Percent of this split's questions whose true answer is a candidate: the accuracy `rank`
        inference can reach at most."""
        return 100.0 * (1 - len(self.uncovered_questions()) / len(self.question_ids))

    def uncovered_questions(self):
        """The questions whose true answer is not a candidate: `rank` inference gets them wrong."""
        listed = set(self.answer_list)
        return [qid for qid in self.question_ids if self.answers[qid] not in listed]

    def __len__(self):
        return len(self.items)

    def item(self, index, rng=None):
        video, question, question_id, answers = self.items[index]
        clip = self.load_video(video, rng)
        if not self.train:
            return clip, question, question_id
        counts = Counter(answers)
        return clip, question, list(counts), [self.answer_weight * count / len(answers) for count in counts.values()]


def raw_caption(text, max_words):
    """DiDeMo's captions go to the tokenizer as they are, as in the original."""
    return text


def caption_of_50_words(text, max_words):
    """ActivityNet Captions and Condensed Movies: the original caps them at 50 words, whatever max_words says."""
    return pre_caption(text, 50)


# Each format's reader and caption cleaning, as the original pairs them (train and evaluation alike).
RETRIEVAL_FORMATS = {
    "retrieval_queryd": (read_queryd, pre_caption),
    "retrieval_didemo": (read_didemo, raw_caption),
    "retrieval_activitynet": (read_activitynet, caption_of_50_words),
    "retrieval_condensedmovies": (read_condensedmovies, caption_of_50_words),
}
DATASETS = {
    "pretrain": PretrainDataset,
    "pretrain_image": PretrainDataset,  # --sep_img: the image config's train_file, same reader
    "activitynet_qa": VideoQADataset,
    **{name: partial(build_retrieval, reader=reader, clean_caption=clean)
       for name, (reader, clean) in RETRIEVAL_FORMATS.items()},
}
SPLITS = ("train", "val", "test")


def create_dataset(name, config, split="train", **options):
    """Build dataset `name` for `split` ('train', 'val' or 'test'); options:
    substitute_black_on_error (evaluation; default: the config key), max_tries (training)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return DATASETS[name](config, name, split, **options)
