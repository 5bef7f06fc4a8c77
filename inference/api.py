"""VideoLanguageModel: a trained checkpoint applied to your own video files.

    from inference.api import VideoLanguageModel
    from inference.index import VideoIndex, update_index
    model = VideoLanguageModel.load("configs/toy/retrieval.yaml", "output/toy/retrieval/checkpoint_best.pth")
    encoding = model.encode_videos(["a.mp4", "b.mp4"])      # .embeddings (2, 256), .failed
    update_index(model, "toy_data/videos", "my_index")
    hits = model.search("a red circle moves left", VideoIndex.open("my_index"), k=5)

Videos are decoded exactly as the evaluation datasets decode them (ClipDataset with
train=False: `num_frm_test` frames by `frm_sampling_strategy_test`, EvalTransform at
`image_size`), so an embedding equals the one the evaluation computes for the same file,
and re-ranking is the evaluation's own code (models.testa_retrieval.rerank_scores).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from configs.keys import check, value
from configs.load import check_values_and_warn, load_config
from data.datasets import RETRIEVAL_FORMATS, ClipDataset
from data.preprocess import ClipPreprocess
from data.text import pre_caption, pre_question
from data.video import VideoReadError, worker_init_fn
from inference.search import approximate_top_k, exact_top_k, open_approximate
from inference.stored import encoder_fingerprint
from models import create_model_and_transforms
from models.checkpoint import CheckpointError, checkpoint_family, read_checkpoint, state_dict_of, task_of
from models.testa_retrieval import rerank_scores
from runtime.distributed import choose_device
from runtime.errors import UserError, check_exists
from runtime.interrupts import ignore_interrupts, interrupts_held
from runtime.precision import Precision, inference_precision, quantize_linear_layers

# The front door's name of the model of each checkpoint family (models.create_model_and_transforms).
MODEL_TASKS = {"retrieval": "retrieval", "QA": "qa", "pre-training": "pretrain"}
# The models a checkpoint of each task gives meaningful results as: a pre-training checkpoint
# searches zero-shot as a retrieval model. Training may start a QA model from one as well
# (docs/checkpoints.md, "Loading rules"), but that model has not learnt to answer.
LOADABLE_AS = {"retrieval": ("retrieval",), "QA": ("QA",), "pre-training": ("pre-training", "retrieval")}
DEFAULT_BATCH_SIZE = 8


class VideoFiles(ClipDataset):
    """Any list of video files as an evaluation dataset: item i is (clip, i, None), or
    (None, i, reason) for a file that is missing or that no reader can decode, so one broken
    file stops nothing."""

    def __init__(self, config: dict, paths):
        super().__init__(config, "video files", train=False, substitute_black_on_error=False)
        self.paths = [str(path) for path in paths]

    def __len__(self):
        return len(self.paths)

    def item(self, index, rng=None):
        if not os.path.exists(self.paths[index]):  # not tried by every reader (decord would print its failure)
            return None, index, f"file not found: {self.paths[index]}"
        try:
            return self.load_video(self.paths[index]), index, None
        except VideoReadError as error:
            return None, index, str(error)


def decoding_worker_init(worker_id):
    """A decoding worker leaves Ctrl-C to the main process (runtime/interrupts.py), which ends it."""
    ignore_interrupts()
    worker_init_fn(worker_id)


class VideoLoader(DataLoader):
    """A DataLoader whose workers start with SIGINT held back until they ignore it (decoding_worker_init)."""

    def __iter__(self):
        with interrupts_held():
            return super().__iter__()


def collate_clips(batch):
    """(clips (B, C, T, H, W) or None, their indices, {index: reason} of the unreadable ones)."""
    clips = [clip for clip, _, reason in batch if reason is None]
    indices = [index for _, index, reason in batch if reason is None]
    failed = {index: reason for _, index, reason in batch if reason is not None}
    return (torch.stack(clips) if clips else None), indices, failed


@dataclass
class EncodedBatch:
    indices: list[int]  # positions in the list of paths given
    embeddings: torch.Tensor  # (B, embed_dim) float32, L2-normalised, on the CPU
    tokens: torch.Tensor | None  # (B, N, D) float32 on the CPU: the video tokens ITM attends to
    failed: dict[int, str]  # position -> one-line reason
    spans: list[tuple[float, float]] | None = None  # windows of long files (inference/windows.py): row -> seconds

    @property
    def num_files(self) -> int:
        """The files this batch is done with: those it has rows of (all of a file's windows are in one
        batch) and the failed ones."""
        return len(set(self.indices)) + len(self.failed)

    def split_at(self, position: int) -> tuple[EncodedBatch, EncodedBatch]:
        """(this batch's files before `position` in the list of paths, its files from there on)."""
        def part(keep) -> EncodedBatch:
            rows = [row for row, index in enumerate(self.indices) if keep(index)]
            return EncodedBatch([self.indices[row] for row in rows], self.embeddings[rows],
                                None if self.tokens is None else self.tokens[rows],
                                {index: reason for index, reason in self.failed.items() if keep(index)},
                                None if self.spans is None else [self.spans[row] for row in rows])
        return part(lambda index: index < position), part(lambda index: index >= position)

    def span_fields(self) -> list[dict]:
        """Each row's {"start", "end"} seconds for an index's manifest ({} for a whole file)."""
        if self.spans is None:
            return [{} for _ in self.indices]
        return [{"start": round(start, 6), "end": round(end, 6)} for start, end in self.spans]


@dataclass
class VideoEncoding:
    paths: list[str]  # the files that decoded, in the order given; row i of embeddings is paths[i]
    embeddings: torch.Tensor
    tokens: torch.Tensor | None = None
    failed: dict[str, str] = field(default_factory=dict)  # path -> one-line reason


@dataclass
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, 3): the sampled frames at the model's size, before normalisation
    tensor: torch.Tensor  # (1, C, T, H, W) uint8: what the video encoder gets (it normalises on its device)


@dataclass
class Hit:
    path: str
    score: float | None  # ITM logit + ITC similarity when re-ranked (ITC alone with rerank=0), else None
    itc_score: float
    start: float | None = None  # the moment's seconds in an index with windows; None: the whole file
    end: float | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "itc_score": self.itc_score, "start": self.start,
                "end": self.end}


def itc_shortlist(text_embedding: torch.Tensor, video_embeddings: np.ndarray, count: int, approximate=None):
    """The `count` best rows for one text, best first (equal similarities: lower row first), and their
    ITC similarities (1, count): exact search in chunks of the (memory-mapped) embeddings, or
    `approximate` (an inference.search.ApproximateIndex) re-scored exactly."""
    if approximate is None:
        scores, rows = exact_top_k(text_embedding, video_embeddings, count)
    else:
        scores, rows = approximate_top_k(text_embedding, video_embeddings, count, approximate)
    return scores[None], rows.tolist()


class VideoLanguageModel:
    """A model of the family its checkpoint holds, in eval mode, with its config's decoding."""

    def __init__(self, model, preprocess: ClipPreprocess, config: dict, checkpoint: Path, task: str,
                 device: torch.device, precision: Precision):
        self.model, self.preprocess, self.config, self.checkpoint, self.task = model, preprocess, config, checkpoint, task
        self.device, self.precision = device, precision
        self.autocast = precision.autocast
        self._encoder_sha256: str | None = None

    @classmethod
    def load(cls, config, checkpoint, device=None, precision: str = "auto", overrides=(), task: str | None = None,
             verbose: bool = False, purpose: str | None = None) -> VideoLanguageModel:
        """config: a YAML path or a dict; task: the model wanted ('retrieval', 'QA', 'pre-training'),
        None for the checkpoint's own. A checkpoint that cannot give that model (LOADABLE_AS) is
        refused before the model is built (one of another family would fail on its config's keys)
        in a line naming both families and `purpose`, what the model is for (e.g. 'caption')."""
        device = choose_device(device)
        precision = inference_precision(precision, device)
        if isinstance(config, (str, Path)):
            config = load_config(config, overrides)
        else:  # e.g. the config an index stored: held to the same rules as a file
            config = dict(config)
            check(config, "the config")
            check_values_and_warn(config, lambda name: "the config")
        # Its keys alone (the tensors mapped, not read) say which model it can be.
        state_dict = state_dict_of(read_checkpoint(str(checkpoint), mmap=True), str(checkpoint))
        own_task = task_of(state_dict)
        if own_task not in LOADABLE_AS:
            raise CheckpointError(f"{checkpoint} is no retrieval, QA or pre-training checkpoint (it has neither an "
                                  "ITM head nor a text decoder)")
        task = task or own_task
        if task not in LOADABLE_AS[own_task]:
            needed = " or ".join(source for source, models in LOADABLE_AS.items() if task in models)
            raise CheckpointError(f"{purpose or f'a {task} model'} needs a {needed} checkpoint; {checkpoint} is a "
                                  f"{checkpoint_family(state_dict)} checkpoint")
        model, preprocess = create_model_and_transforms(config, MODEL_TASKS[task], checkpoint=str(checkpoint),
                                                        device=device, verbose=verbose)
        encoder_sha256 = None
        if precision.int8:  # the fingerprint is of the weights as loaded, before they are quantised
            encoder_sha256 = encoder_fingerprint(model.visual_encoder)
            model.visual_encoder = quantize_linear_layers(model.visual_encoder)
        if precision.reason:  # 'auto' says what it chose, in one line
            print(f"precision: auto -> {precision.name} ({precision.reason})", file=sys.stderr, flush=True)
        loaded = cls(model.eval(), preprocess, config, Path(checkpoint), task, device, precision)
        loaded._encoder_sha256 = encoder_sha256
        return loaded

    @property
    def encoder_sha256(self) -> str:
        """sha256 of the video encoder's weights as loaded (inference.stored.encoder_fingerprint): equal
        for two models whose encoders give the same tokens, whatever their checkpoints' other parts."""
        if self._encoder_sha256 is None:
            self._encoder_sha256 = encoder_fingerprint(self.model.visual_encoder)
        return self._encoder_sha256

    def _require(self, tasks: tuple, action: str) -> None:
        if self.task not in tasks:
            names = " or ".join(tasks)
            raise UserError(f"{action} needs a {names} checkpoint; {self.checkpoint} is a {self.task} checkpoint")

    # -- videos ---------------------------------------------------------------------
    def video_loader(self, paths, batch_size: int | None = None, num_workers: int | None = None) -> DataLoader:
        """Decoding in `num_workers` worker processes (default: the config's num_workers) while
        the model encodes the previous batch."""
        workers = value(self.config, "num_workers") if num_workers is None else num_workers
        return VideoLoader(VideoFiles(self.config, paths), batch_size=batch_size or DEFAULT_BATCH_SIZE,
                           num_workers=workers, collate_fn=collate_clips, worker_init_fn=decoding_worker_init,
                           pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def iter_encoded(self, paths, batch_size: int | None = None, return_tokens: bool = False,
                     num_workers: int | None = None):
        """EncodedBatch after EncodedBatch, in the order of `paths` (for progress and streaming writes)."""
        self._require(("retrieval", "pre-training"), "encoding videos")
        for clips, indices, failed in self.video_loader(paths, batch_size, num_workers):
            if clips is None:
                yield EncodedBatch([], torch.empty(0, value(self.config, "embed_dim")), None, failed)
                continue
            with self.autocast():
                tokens, embeddings = self.model.encode_video(clips.to(self.device, non_blocking=True))
            yield EncodedBatch(indices, embeddings.float().cpu(), tokens.float().cpu() if return_tokens else None,
                               failed)

    def encode_videos(self, paths, batch_size: int | None = None, return_tokens: bool = False,
                      num_workers: int | None = None) -> VideoEncoding:
        """Normalised ITC embeddings of the files that decode (and their tokens, on request);
        the others are in `.failed` with their reason."""
        paths = [str(path) for path in paths]
        batches = list(self.iter_encoded(paths, batch_size, return_tokens, num_workers))
        indices = [index for batch in batches for index in batch.indices]
        tokens = [batch.tokens for batch in batches if batch.tokens is not None]
        no_rows = torch.empty(0, value(self.config, "embed_dim"))  # for an empty list of paths
        return VideoEncoding([paths[i] for i in indices], torch.cat([no_rows, *(b.embeddings for b in batches)]),
                             torch.cat(tokens) if return_tokens and tokens else None,
                             {paths[i]: reason for batch in batches for i, reason in batch.failed.items()})

    def load_clip(self, path, span: tuple | None = None) -> Clip:
        """One video as the model sees it, or seconds `span` (start, end) of it as a clip of its own
        (inference/windows.py); a missing file raises FileNotFoundError, an unreadable one
        VideoReadError, a span outside the file UserError."""
        check_exists(path)
        if span is not None:
            from inference.windows import read_span
            clip = read_span(path, self.preprocess.clips, *span)  # decoded at image_size: its frames as they are
            return Clip(clip.permute(1, 2, 3, 0).numpy(), clip.unsqueeze(0))
        frames, clip = self.preprocess.with_frames(path)
        return Clip(frames.permute(0, 2, 3, 1).numpy(), clip.unsqueeze(0))

    # -- texts and search ---------------------------------------------------------------
    def clean_text(self, text: str) -> str:
        """A query as the config's retrieval dataset cleans its captions (pre_caption otherwise)."""
        _, clean = RETRIEVAL_FORMATS.get(self.config.get("dataset"), (None, pre_caption))
        return clean(text, value(self.config, "caption_max_words"))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, embed_dim) float32 normalised ITC embeddings of texts."""
        self._require(("retrieval",), "encoding texts")
        input_ids, attention_mask = self.model.tokenize([self.clean_text(text) for text in texts])
        with self.autocast():
            return self.model.encode_text(input_ids, attention_mask)[1].float().cpu()

    @torch.no_grad()
    def search(self, query: str, index, k: int = 10, rerank: int = 16, approximate: bool = False) -> list[Hit]:
        """The index's `k` best videos for `query`: ITC top-k, its top `rerank` re-ranked by ITM +
        ITC exactly as the evaluation re-ranks. Without tokens in the index the candidates are
        re-encoded from their files (their paths must still be readable). `approximate`: the ITC
        top-k of a faiss inverted-file index (optional package; built on first use, kept in the index
        folder) instead of exact search (inference/search.py)."""
        self._require(("retrieval",), "search")
        index.check_model(self)
        ann = open_approximate(index) if approximate else None
        itc, shortlist = itc_shortlist(self.encode_texts([query]), index.embeddings, max(k, rerank), ann)
        reranked = shortlist[:rerank]
        hits = []
        if reranked:
            final = self._rerank(query, itc[:, :len(reranked)], index, reranked)
            hits = sorted((Hit(index.paths[i], float(score), float(sim), *index.span_of(i))
                           for i, score, sim in zip(reranked, final, itc[0])),
                          key=lambda hit: -hit.score)  # stable: ITC order among equal scores
        hits += [Hit(index.paths[i], None if rerank else float(sim), float(sim), *index.span_of(i))
                 for i, sim in zip(shortlist[len(reranked):], itc[0, len(reranked):])]
        return hits[:k]

    def _rerank(self, query: str, candidate_sims: torch.Tensor, index, rows: list[int]) -> torch.Tensor:
        """rerank_scores over the candidates alone: (R,) ITM logit + ITC similarity."""
        tokens = index.tokens_of(rows)
        if tokens is None and index.windowed:
            tokens = self._moment_tokens(index, rows)
        if tokens is None:
            encoding = self.encode_videos([index.paths[i] for i in rows], return_tokens=True, num_workers=0)
            if encoding.failed:
                reason = next(iter(encoding.failed.values()))
                raise UserError(f"cannot re-rank: {reason} (re-index to drop changed files)")
            tokens = encoding.tokens
        input_ids, attention_mask = self.model.tokenize([self.clean_text(query)])
        with self.autocast():
            scores = rerank_scores(self.model, candidate_sims.to(self.device), len(rows), tokens.to(self.device),
                                   input_ids, attention_mask, torch.tensor([0]), video_rows=False,
                                   batch_size=value(self.config, "k_test_batch_size"))
        return scores[0].float().cpu()

    def _moment_tokens(self, index, rows: list[int]) -> torch.Tensor:
        """The video tokens of index rows that are windows, each span decoded from its file again."""
        clips = []
        for row in rows:
            try:
                clips.append(self.load_clip(index.paths[row], index.span_of(row)).tensor)
            except (FileNotFoundError, VideoReadError) as error:
                raise UserError(f"cannot re-rank: {error} (re-index to drop changed files)") from None
        with self.autocast():
            return self.model.encode_video(torch.cat(clips).to(self.device))[0].float()

    # -- question answering and captions ---------------------------------------------------
    @torch.no_grad()
    def ask(self, video_path, question: str, answers: list[str] | None = None,
            tokens: torch.Tensor | None = None, span: tuple | None = None) -> str:
        """The best of `answers` (the evaluation's ranking), or a generated answer without a list.
        `tokens`: the video's encoder tokens (1, N, D) read from an index (inference.stored), used
        instead of decoding and encoding `video_path`; `span`: (start, end) seconds of the video only."""
        self._require(("QA",), "ask")
        clip = self._video_input(video_path, tokens, span)
        questions = [pre_question(question)]
        with self.autocast():
            if not answers:
                return self.model.generate_answers(clip, questions)[0]
            answer_ids, answer_mask, _ = self.model.tokenize_answers(list(answers))
            k = self.config.get("k_test") or len(answers)  # the evaluation's k, when the config has one
            return answers[int(self.model.rank_answers(clip, questions, answer_ids, answer_mask, k)[0])]

    @torch.no_grad()
    def caption(self, video_path, method: str = "beam", seed: int | None = None,
                tokens: torch.Tensor | None = None, span: tuple | None = None, **settings) -> str:
        """A caption by beam search or nucleus sampling (settings: VideoPretrainModel.generate_caption_ids);
        `seed` makes sampling repeatable without touching the global random state; `tokens`, `span` as for ask."""
        self._require(("pre-training",), "caption")
        if method not in ("beam", "nucleus"):
            raise UserError(f"unknown caption method {method!r}; expected beam or nucleus")
        clip = self._video_input(video_path, tokens, span)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.autocast():
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate_captions(clip, sample=method == "nucleus", **settings)[0]

    def _video_input(self, video_path, tokens: torch.Tensor | None, span: tuple | None = None) -> torch.Tensor:
        """What the model's video input is: stored tokens (1, N, D) as float32, or the decoded clip."""
        if tokens is not None:
            return tokens.to(self.device, torch.float32)
        return self.load_clip(video_path, span).tensor.to(self.device)
