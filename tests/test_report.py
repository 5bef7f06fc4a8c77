"""The static HTML search report: structure, escaping, atomic writing, and a real-browser rendering."""
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from inference.aggregation import render_aggregation
from inference.report import write_report
from models.timesformer import TimeSformer

QUERY = '<script>alert("q")</script> & a dog'
HITS = [{"path": 'videos/<b>"odd" & name</b>.mp4', "score": 0.91234, "itc_score": 0.5},
        {"path": "videos/plain.mp4", "score": 0.25, "itc_score": None}]
RED = (230, 20, 20)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class _Page(HTMLParser):
    """Collects the tags, image sources and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _red_frames(path):
    return np.broadcast_to(np.array(RED, dtype=np.uint8), (8, 64, 64, 3)).copy()


@pytest.fixture(scope="module")
def picture_of():
    """A tiny merging encoder's aggregation picture of the red clip."""
    torch.manual_seed(0)
    encoder = TimeSformer(img_size=64, embed_dim=32, num_heads=2, num_frames=8, depth=1, token_merging=True,
                          testa_r=[1, 4]).eval()

    def picture(path, png_path):
        frames = _red_frames(path)
        clip = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255
        return render_aggregation(encoder, clip, frames, png_path)[0]
    return picture


def _parse(index):
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def test_report_is_one_folder_of_escaped_html_and_existing_relative_images(tmp_path, picture_of):
    index = write_report(tmp_path / "report", QUERY, HITS, _red_frames, picture_of)
    assert index == tmp_path / "report" / "index.html"
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no temporary folder left behind
    page = _parse(index)
    assert "script" not in page.tags and "b" not in page.tags  # the strings stayed text
    text = "".join(page.text)
    assert QUERY in text and HITS[0]["path"] in text and "0.9123" in text
    assert len(page.images) == 4
    for image in page.images:
        assert not os.path.isabs(image["src"]) and ":" not in image["src"]
        with Image.open(index.parent / image["src"]) as picture:
            assert picture.size == (int(image["width"]), int(image["height"]))


def test_report_replaces_its_previous_version_but_nothing_else(tmp_path, picture_of):
    out = tmp_path / "report"
    write_report(out, QUERY, HITS, _red_frames, picture_of)
    write_report(out, "second query", HITS[1:], _red_frames)
    assert "second query" in (out / "index.html").read_text()
    assert len(_parse(out / "index.html").images) == 1 and sorted(os.listdir(tmp_path)) == ["report"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a search report"):
        write_report(other, QUERY, HITS, _red_frames)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_failure_midway_leaves_the_previous_report_untouched(tmp_path):
    out = tmp_path / "report"
    write_report(out, "first", HITS, _red_frames)
    before = (out / "index.html").read_text()

    def broken_frames(path):
        if path == HITS[1]["path"]:
            raise OSError("cannot decode")
        return _red_frames(path)
    with pytest.raises(OSError, match="cannot decode"):
        write_report(out, "second", HITS, broken_frames)
    assert (out / "index.html").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


def _browser():
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def _screenshot(browser, page, png, size, profile):
    """Headless screenshot of ``page`` at ``size`` (width, height)."""
    command = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.as_uri()]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(_browser() is None, reason=f"no headless browser on PATH (looked for {', '.join(BROWSERS)})")
def test_a_real_browser_renders_the_report_with_its_images(tmp_path, picture_of):
    index = write_report(tmp_path / "report", QUERY, HITS, _red_frames, picture_of)
    shot = tmp_path / "shot.png"
    _screenshot(_browser(), index, shot, (1200, 800), tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.size == (1200, 800)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not a blank page
    # The first hit's frame strip (4 red frames of 96x96 pixels) is on screen.
    red = (np.abs(pixels - np.array(RED)).max(axis=2) < 12).sum()
    assert red > 0.9 * 4 * 96 * 96
