"""Bad inputs: paths stay where the user put them (docs/reliability.md)."""
import json
import os

from data.pack_shards import pack
from tests.bad_inputs import Case, Workspace


def annotations_naming(ws: Workspace, name: str) -> None:
    """ws.folder/ann: the toy annotations, with the first training clip of DiDeMo's train.jsonl
    and of the QA questions renamed to `name` (DiDeMo adds .mp4; QA adds v_ and .mp4)."""
    ann = ws.folder / "ann"
    ann.mkdir()
    for path in (ws.corpus / "ann").iterdir():
        os.symlink(path, ann / path.name)
    lines = (ws.corpus / "ann" / "train.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "clip_name": name})
    (ann / "train.jsonl").unlink()
    (ann / "train.jsonl").write_text("\n".join(lines) + "\n")
    questions = json.loads((ws.corpus / "ann" / "train_q.json").read_text())
    questions[0]["video_name"] = name
    (ann / "train_q.json").unlink()
    (ann / "train_q.json").write_text(json.dumps(questions))


def pretrain_annotation_naming(ws: Workspace, path: str) -> None:
    entries = json.loads((ws.corpus / "ann" / "pretrain.json").read_text())
    entries[0]["path"] = path
    (ws.folder / "pretrain.json").write_text(json.dumps(entries))


def piped_shards(ws: Workspace) -> None:
    pack([ws.corpus / "ann" / "pretrain.json"], ws.folder / "shards", ws.corpus, max_samples=100)


OUTSIDE = r"annotation paths lie outside video_root .*; set allow_paths_outside_video_root: true to read them"
CASES = [
    Case("retrieval_annotation_climbing_out_of_video_root",
         lambda ws: ws.retrieval(f"ann_root={ws.folder / 'ann'}"), r"retrieval_didemo train split: 1 of \d+ " + OUTSIDE,
         setup=lambda ws: annotations_naming(ws, "../../../../etc/hostname")),
    Case("retrieval_annotation_with_an_absolute_path",
         lambda ws: ws.retrieval(f"ann_root={ws.folder / 'ann'}"), r"e\.g\. /etc/hostname.mp4",
         setup=lambda ws: annotations_naming(ws, "/etc/hostname")),
    Case("qa_question_naming_a_video_outside_video_root",
         lambda ws: ws.qa(f"ann_root={ws.folder / 'ann'}"), r"activitynet_qa train split: 1 of \d+ " + OUTSIDE,
         setup=lambda ws: annotations_naming(ws, "x/../../../secret")),
    Case("pretraining_relative_path_climbing_out",
         lambda ws: ws.pretrain(f"train_file=[{ws.folder / 'pretrain.json'}]"), r"pretrain train split: 1 of \d+ "
         + OUTSIDE, setup=lambda ws: pretrain_annotation_naming(ws, "../../elsewhere/clip.mp4")),
    Case("pipe_shards_name_the_command_they_run",
         lambda ws: ws.pretrain(f"train_shards=[pipe:cat {ws.folder / 'shards' / 'pretrain-000000.tar'}]",
                                "train_shards_samples=10", "batch_size=2"),
         r"train_shards runs shell commands to read its shards: cat .*pretrain-000000\.tar", exit_code=0,
         stream="warning", setup=piped_shards),
]
