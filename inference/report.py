"""A static HTML page of search results: one folder (index.html + images/) that opens from disk
in any browser, with relative links only, no script and nothing fetched from the network.

For every hit, already ranked: its rank, path, scores, a strip of a few of its frames and the
picture of the tokens the video encoder kept (inference/aggregation.py). A hit that is a moment
of a file (an index with windows, inference/windows.py) shows its start and end, and the frames
and tokens of that moment.
"""
import html
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from PIL import Image

from inference.aggregation import grid_image
from runtime.errors import UserError

STRIP_FRAMES = 4
STRIP_HEIGHT = 96
GENERATOR = "testa-search-report"  # marks a folder this module wrote, so that it may replace it
STYLE = """
body { font-family: sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 0.5rem; text-align: left; vertical-align: top; }
td.path { font-family: monospace; word-break: break-all; min-width: 14rem; max-width: 22rem; }
img.tokens { width: 100%; min-width: 24rem; max-width: 40rem; height: auto; }
"""


def frame_strip(frames: np.ndarray, count: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> Image.Image:
    """``count`` evenly spaced frames of uint8 (T, H, W, 3) ``frames``, ``height`` pixels tall, side by side."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    tiles = [np.asarray(Image.fromarray(frames[index]).resize((width, height), Image.BILINEAR))
             for index in picks]
    return grid_image(tiles, columns=len(tiles))


def _image_tag(folder: pathlib.Path, relative: str, alt: str, css_class: str) -> str:
    with Image.open(folder / relative) as image:
        width, height = image.size
    return (f'<img class="{css_class}" src="{html.escape(relative)}" alt="{html.escape(alt)}" '
            f'width="{width}" height="{height}">')


def _score(value) -> str:
    return "&ndash;" if value is None else html.escape(f"{float(value):.4f}")


def _hit_row(folder: pathlib.Path, rank: int, hit: dict, frames_of: Callable,
             picture_of: Callable | None) -> str:
    """Write one hit's images into ``folder``/images and return its table row."""
    path = str(hit["path"])
    span = (hit["start"], hit["end"]) if hit.get("start") is not None else None
    moment = {} if span is None else {"span": span}  # callables of whole files need not take a span
    strip = f"images/{rank:03d}_frames.jpg"
    frame_strip(frames_of(hit["path"], **moment)).save(folder / strip, quality=85)
    shown = path if span is None else f"{path} ({span[0]:.2f} s to {span[1]:.2f} s)"
    cells = [f"<td>{rank}</td>", f'<td class="path">{html.escape(shown)}</td>',
             f'<td>{_score(hit.get("score"))}</td>', f'<td>{_score(hit.get("itc_score"))}</td>',
             f'<td>{_image_tag(folder, strip, f"frames of {path}", "frames")}</td>']
    if picture_of is not None:
        picture = f"images/{rank:03d}_tokens.png"
        written = pathlib.Path(picture_of(hit["path"], folder / picture, **moment))
        if written.resolve() != (folder / picture).resolve():
            shutil.copyfile(written, folder / picture)
        cells.append(f'<td>{_image_tag(folder, picture, f"tokens the encoder kept for {path}", "tokens")}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _page(query: str, rows: list[str], with_pictures: bool) -> str:
    headers = ["rank", "video", "score", "ITC score", "frames"] + (["tokens kept"] if with_pictures else [])
    title = html.escape(f"Search: {query}")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">', f"<title>{title}</title>",
        f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{title}</h1>",
        f"<p>{len(rows)} result{'s' if len(rows) != 1 else ''}, best first.</p>",
        "<table>", "<tr>" + "".join(f"<th>{header}</th>" for header in headers) + "</tr>",
        *rows, "</table>", "</body>", "</html>", ""])


class ReportFolderError(UserError, FileExistsError):
    """The report folder exists and is not one this module may replace: one line for the user."""


def _listing(names: list[str], most: int = 3) -> str:
    shown = ", ".join(sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_replaceable(out_dir) -> None:
    """Refuse (ReportFolderError) to replace anything but a missing or empty folder or a report this
    module wrote: its index.html marked by GENERATOR and its images/, nothing else (a report is
    replaced whole, so a file someone added to it would be lost)."""
    out_dir = pathlib.Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ReportFolderError(f"{out_dir} exists and is a file, not a search report written by this tool; choose "
                                "another folder for the report")
    names = [path.name for path in out_dir.iterdir()]
    if not names:
        return
    index = out_dir / "index.html"
    is_report = index.is_file() and f'content="{GENERATOR}"' in index.read_text(encoding="utf-8", errors="replace")
    others = [name for name in names if name not in ("index.html", "images")]
    if is_report and not others:
        return
    holds = f"a search report and other files: {_listing(others)}" if is_report else _listing(names)
    raise ReportFolderError(f"{out_dir} exists and is not a search report written by this tool (it holds {holds}); "
                            "choose another folder, or empty this one (a report replaces its folder whole)")


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename the finished folder over ``out_dir``; a previous report is moved aside first
    (a folder cannot be renamed over a non-empty one) and deleted once the new one is in place."""
    previous = None
    if out_dir.exists():
        previous = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous)


def write_report(out_dir, query: str, hits: list[dict], frames_of: Callable,
                 picture_of: Callable | None = None) -> pathlib.Path:
    """Write the report folder ``out_dir`` for ``hits`` ({"path", "score", "itc_score"} and, for a
    moment, "start" and "end" seconds; ranked).

    frames_of(path) -> uint8 (T, H, W, 3) frames of a hit; picture_of(path, png_path) writes
    the hit's aggregation picture and returns its path (None: no pictures); for a moment both
    are also given span=(start, end). The folder is
    built under a temporary name next to ``out_dir`` and renamed into place, so a crash
    never leaves a half-written report. Returns the path of index.html. An ``out_dir`` that
    exists and is neither empty nor a report of this module raises ReportFolderError
    (check_replaceable), with nothing written.
    """
    out_dir = pathlib.Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staging / "images").mkdir()
        rows = [_hit_row(staging, rank, hit, frames_of, picture_of) for rank, hit in enumerate(hits, start=1)]
        (staging / "index.html").write_text(_page(query, rows, picture_of is not None), encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "index.html"
