"""Bad inputs: tool_files (docs/reliability.md). video_tool.py's files survive a full disk, a
damaged manifest and a second writer; its numbers, missing paths and the --report folder are
checked before any work; a checkpoint of another family is named as such; a folder without
videos is indexed with a warning."""
import json
import os
import socket

import numpy as np

from tests.bad_inputs import Case

QUICK = 60  # seconds: these cases stop before or right after the model is loaded
TOY = ["depth=2", "testa_r=[1,2,1,2]", "num_workers=0"]
EMBED_DIM = 256  # configs/toy: embed_dim's default


def tool(*argv) -> list[str]:
    return ["video_tool.py", *argv]


def model(ws, family: str, config: str | None = None) -> list[str]:
    """--config configs/toy/<config or family>.yaml and the toy checkpoint of `family`."""
    return ["--config", f"configs/toy/{config or family}.yaml", "--checkpoint", str(ws.checkpoints[family]),
            "--precision", "fp32", "--options", *TOY]


def video(ws) -> str:
    return str(ws.corpus / "videos" / "v_toy00000.mp4")


def index_into(ws, *extra, family: str = "retrieval") -> list[str]:
    return tool("index", str(ws.corpus / "videos"), "--index", str(ws.folder / "index"),
                *model(ws, family, "retrieval"), *extra)


def search_in(ws, *extra) -> list[str]:
    return tool("search", "a red circle moves left", "--index", str(ws.folder / "index"), *extra)


def write_index(ws, damage=None) -> None:
    """Set-up: an index of no videos made with the retrieval checkpoint, its manifest passed
    through `damage(manifest) -> text` first when given."""
    index = ws.folder / "index"
    index.mkdir()
    np.save(index / "embeddings-0.npy", np.zeros((0, EMBED_DIM), np.float32))
    checkpoint = ws.checkpoints["retrieval"]
    manifest = {"format": 1, "root": str(ws.corpus / "videos"), "files": [], "unreadable": [],
                "checkpoint": {"path": str(checkpoint), "size": checkpoint.stat().st_size,
                               "mtime_ns": checkpoint.stat().st_mtime_ns, "sha256": "0" * 64},
                "embedding_config": {"embed_dim": EMBED_DIM}, "config": {}, "with_tokens": False,
                "embeddings": "embeddings-0.npy", "tokens": None}
    (index / "manifest.json").write_text(damage(manifest) if damage else json.dumps(manifest))


def without(key):
    return lambda ws: write_index(ws, lambda manifest: json.dumps({k: v for k, v in manifest.items() if k != key}))


def held_by_a_live_run(ws) -> None:
    """Set-up: the index folder's lock as a running index run holds it (this test's own process)."""
    (ws.folder / "index").mkdir()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-01-01 12:00:00"}
    (ws.folder / "index" / ".lock").write_text(json.dumps(owner))


def truncated_embeddings(ws) -> None:
    write_index(ws)
    path = ws.folder / "index" / "embeddings-0.npy"
    path.write_bytes(path.read_bytes()[:40])


def folder_of_notes(ws) -> None:
    """Set-up: ws.folder/notes, a folder of the user's that is no search report."""
    (ws.folder / "notes").mkdir()
    (ws.folder / "notes" / "keep.txt").write_text("mine")


def folder_without_videos(ws) -> None:
    (ws.folder / "empty").mkdir()
    (ws.folder / "empty" / "readme.txt").write_text("no video here")


def undecodable_video(ws) -> None:
    (ws.folder / "broken.mp4").write_bytes(b"\x00garbage" * 64)


def _error(name, command, expect, setup=None, timeout=QUICK):
    return Case(name, command, expect, setup=setup, timeout=timeout)


DAMAGED = r"^error: index .*/index is damaged: its "
REBUILD = r"; delete the folder and run video_tool.py index again"

CASES: list[Case] = [
    # a full disk: one line, nothing of the run left behind (tests/test_tool_files.py checks the rest)
    _error("full_disk_embeddings",
           lambda ws: ["tests/bad_inputs/drive_full_disk.py", *index_into(ws)[1:]],
           r"^error: index .*index not updated \(no index was written\): .*/embeddings-\w+\.npy: "
           r"no space left on device$", timeout=300),
    _error("full_disk_tokens",
           lambda ws: ["tests/bad_inputs/drive_full_disk.py", *index_into(ws, "--tokens")[1:]],
           r"^error: index .*index not updated \(no index was written\): .*/tokens-\w+\.npy: "
           r"no space left on device$", timeout=300),
    # a damaged manifest.json: what is wrong, in which file, and what to do
    _error("manifest_truncated_on_index", index_into,
           DAMAGED + r"manifest\.json is not valid JSON \(.*\)" + REBUILD,
           setup=lambda ws: write_index(ws, lambda manifest: json.dumps(manifest)[:70])),
    _error("manifest_wrong_type_on_search", search_in,
           DAMAGED + r"manifest\.json has a str as 'files'" + REBUILD,
           setup=lambda ws: write_index(ws, lambda manifest: json.dumps({**manifest, "files": "a.mp4"}))),
    _error("manifest_missing_key_on_search", search_in,
           DAMAGED + r"manifest\.json has no 'checkpoint'" + REBUILD, setup=without("checkpoint")),
    _error("manifest_bad_entry_on_index", index_into,
           DAMAGED + r"manifest\.json entry 0 of 'files' has no 'mtime_ns'" + REBUILD,
           setup=lambda ws: write_index(ws, lambda manifest: json.dumps({**manifest, "files": [{"path": "a.mp4",
                                                                                                "size": 1}]}))),
    _error("embeddings_truncated_on_search", search_in,
           DAMAGED + r"embeddings-0\.npy is unreadable \(.*\)" + REBUILD, setup=truncated_embeddings),
    # a second writer
    _error("index_folder_in_use", index_into,
           r"index is in use by another run \(host .+, pid \d+, started 2024-01-01 12:00:00\)",
           setup=held_by_a_live_run),
    # numbers out of range, refused before any model is loaded
    _error("k_zero", lambda ws: search_in(ws, "-k", "0"), r"^error: -k must be at least 1, got 0$"),
    _error("rerank_negative", lambda ws: search_in(ws, "--rerank", "-1"),
           r"^error: --rerank must be at least 0, got -1$"),
    _error("batch_size_zero", lambda ws: index_into(ws, "--batch_size", "0"),
           r"^error: --batch_size must be at least 1, got 0$"),
    _error("num_workers_negative", lambda ws: index_into(ws, "--num_workers", "-1"),
           r"^error: --num_workers must be at least 0, got -1$"),
    _error("scale_zero", lambda ws: tool("show", video(ws), "--out", str(ws.folder / "a.png"), "--scale", "0",
                                         *model(ws, "retrieval")),
           r"^error: --scale must be from 1 to 32, got 0$"),
    _error("scale_negative", lambda ws: tool("show", video(ws), "--out", str(ws.folder / "a.png"), "--scale", "-3",
                                             *model(ws, "retrieval")),
           r"^error: --scale must be from 1 to 32, got -3$"),
    _error("seed_negative", lambda ws: tool("caption", video(ws), "--sample", "--seed", "-1", *model(ws, "pretrain")),
           r"^error: --seed must be from 0 to 18446744073709551615, got -1$"),
    _error("device_unknown", lambda ws: tool("caption", video(ws), *model(ws, "pretrain"), "--device", "gpu0"),
           r"^error: unknown device 'gpu0'; expected e\.g\. cpu, cuda or cuda:1$"),
    _error("out_not_a_picture", lambda ws: tool("show", video(ws), "--out", str(ws.folder / "a.txt"),
                                                *model(ws, "retrieval")),
           r"^error: --out .*a\.txt: not a picture file name; use a \.png name$"),
    # a checkpoint of another family: the family it is and the one the command needs
    _error("ask_with_retrieval_checkpoint", lambda ws: tool("ask", video(ws), "what moves?",
                                                            *model(ws, "retrieval", "qa")),
           r"^error: ask needs a QA checkpoint; .*retrieval\.pth is a video retrieval checkpoint$"),
    _error("ask_with_pretraining_checkpoint", lambda ws: tool("ask", video(ws), "what moves?",
                                                              *model(ws, "pretrain", "qa")),
           r"^error: ask needs a QA checkpoint; .*pretrain\.pth is a video pre-training checkpoint$"),
    _error("caption_with_qa_checkpoint", lambda ws: tool("caption", video(ws), *model(ws, "qa", "pretrain")),
           r"^error: caption needs a pre-training checkpoint; .*qa\.pth is a video QA checkpoint$"),
    _error("caption_with_retrieval_checkpoint", lambda ws: tool("caption", video(ws), *model(ws, "retrieval")),
           r"^error: caption needs a pre-training checkpoint; .*retrieval\.pth is a video retrieval checkpoint$"),
    _error("index_with_qa_checkpoint", lambda ws: index_into(ws, family="qa"),
           r"^error: index needs a retrieval or pre-training checkpoint; .*qa\.pth is a video QA checkpoint$"),
    _error("search_with_qa_checkpoint", lambda ws: search_in(ws, *model(ws, "qa")),
           r"^error: search needs a retrieval or pre-training checkpoint; .*qa\.pth is a video QA checkpoint$",
           setup=write_index),
    # --report into a folder that is not a report of the tool: refused before the search, nothing written
    _error("report_into_a_folder_that_is_no_report", lambda ws: search_in(ws, "--report", str(ws.folder / "notes")),
           r"^error: .*/notes exists and is not a search report written by this tool \(it holds keep\.txt\); choose "
           r"another folder, or empty this one \(a report replaces its folder whole\)$", setup=folder_of_notes),
    # a missing path is `file not found` (as everywhere), before any model is loaded; an undecodable one is not
    _error("ask_missing_video", lambda ws: tool("ask", str(ws.folder / "missing.mp4"), "what moves?", *model(ws, "qa")),
           r"^error: file not found: .*/missing\.mp4$"),
    _error("caption_missing_video", lambda ws: tool("caption", str(ws.folder / "missing.mp4"), *model(ws, "pretrain")),
           r"^error: file not found: .*/missing\.mp4$"),
    _error("show_missing_video", lambda ws: tool("show", str(ws.folder / "missing.mp4"), "--out",
                                                 str(ws.folder / "a.png"), *model(ws, "retrieval")),
           r"^error: file not found: .*/missing\.mp4$"),
    _error("index_missing_folder", lambda ws: tool("index", str(ws.folder / "no_videos_here"), "--index",
                                                   str(ws.folder / "index"), *model(ws, "retrieval")),
           r"^error: file not found: .*/no_videos_here$"),
    _error("ask_undecodable_video", lambda ws: tool("ask", str(ws.folder / "broken.mp4"), "what moves?",
                                                    *model(ws, "qa")),
           r"^error: cannot decode video .*/broken\.mp4: ", setup=undecodable_video),
    # a folder without videos: indexed (an empty index), with a warning naming what was looked for
    Case("index_of_a_folder_without_videos",
         lambda ws: tool("index", str(ws.folder / "empty"), "--index", str(ws.folder / "index"),
                         *model(ws, "retrieval")),
         r"^warning: no videos in .*/empty \(looked for \.mp4, \.webm, \.mkv, \.avi, \.mov, \.m4v, \.flv, \.mpg, \.mpeg "
         r"files, in any case, in it "
         r"and its subfolders\); the index .*/index holds none$", exit_code=0, stream="warning",
         setup=folder_without_videos, timeout=QUICK),
]
