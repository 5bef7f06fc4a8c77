"""Bad inputs: inputs that make a metric meaningless are reported (docs/reliability.md)."""
import json
import os
import random

from data.toy import make_clip, random_events
from tests.bad_inputs import Case, Workspace


def corpus_with_a_short_clip(ws: Workspace, split_file: str) -> None:
    """ws.folder/corpus: the shared corpus (linked), with the first clip of `split_file` cut to 3
    frames, fewer than the 8 every toy config samples."""
    corpus = ws.folder / "corpus"
    (corpus / "videos").mkdir(parents=True)
    os.symlink(ws.corpus / "ann", corpus / "ann")
    first = json.loads((ws.corpus / "ann" / split_file).read_text().splitlines()[0])["clip_name"]
    for video in (ws.corpus / "videos").iterdir():
        if video.stem != first:
            os.symlink(video, corpus / "videos" / video.name)
    make_clip(corpus / "videos" / f"{first}.mp4", random_events(random.Random(0)), num_frames=3, size=64)


def short_clip_run(ws: Workspace, *extra):
    corpus = ws.folder / "corpus"
    return ws.retrieval(f"video_root={corpus}/videos", f"ann_root={corpus}/ann", *extra)


def answer_list(ws: Workspace) -> None:
    (ws.folder / "answers.json").write_text(json.dumps(["red", "blue"]))


CASES = [
    Case("qa_candidates_without_most_answers",
         lambda ws: ws.qa(f"pretrained={ws.checkpoints['qa']}", f"answer_list={ws.folder / 'answers.json'}",
                          "--evaluate"),
         r"test questions have a true answer outside the 2 candidates \(answer_candidates: answer_list\): "
         r"rank inference cannot answer them, so accuracy is at most", exit_code=0, stream="warning",
         setup=answer_list),
    Case("qa_training_validates_with_a_list_missing_answers",
         lambda ws: ws.qa(f"answer_list={ws.folder / 'answers.json'}", "val_question_every=1"),
         r"val questions have a true answer outside the 2 candidates", exit_code=0, stream="warning",
         setup=answer_list),
    Case("training_clip_shorter_than_the_frames_sampled",
         lambda ws: short_clip_run(ws), r"has fewer frames than sampled \(only 1 distinct of the 8 frames "
                                        r"sampled\): its frames repeat", exit_code=0, stream="warning",
         setup=lambda ws: corpus_with_a_short_clip(ws, "train.jsonl")),
    Case("evaluation_clip_shorter_than_the_frames_sampled",
         lambda ws: short_clip_run(ws, f"pretrained={ws.checkpoints['retrieval']}", "--evaluate"),
         r"has fewer frames than sampled \(only 1 distinct of the 8 frames sampled\)", exit_code=0,
         stream="warning",
         setup=lambda ws: corpus_with_a_short_clip(ws, "test.jsonl")),
]
