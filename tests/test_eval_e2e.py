"""Retrieval evaluation end to end, from video files to metrics, against the original's own run.

tests/fixtures/e2e holds ten short clips, annotations in the DiDeMo, ActivityNet Captions,
QuerYD and Condensed Movies formats, and what the original implementation computed from
them (see its README). The data checks build the split as the script does; the score and
metric checks run the entry script itself with --evaluate.
"""
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from data.datasets import create_dataset
from data.video import sample_frame_indices
from models.pixels import normalize
from models.tokenizer import init_tokenizer
from tests.helpers import E2E
from tests.helpers import E2E_FORMATS as FORMATS
from tests.helpers import E2E_METRIC_NAMES, REPO_ROOT, e2e_evaluate_command, e2e_paths, read_yaml


def reference(fmt):
    return torch.load(E2E / f"{fmt}_ref.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=FORMATS)
def split(request):
    fmt = request.param
    config = {**read_yaml(E2E / f"{fmt}.yaml"), **e2e_paths(fmt)}
    return fmt, config, create_dataset(config["dataset"], config, "test"), reference(fmt)


def test_split_lists_the_original_videos_texts_and_ground_truth(split):
    _, _, dataset, ref = split
    assert [Path(path).name for path in dataset.video] == ref["video_files"]
    assert dataset.text == ref["texts"]
    assert dataset.txt2video == ref["txt2video"] and dataset.video2txt == ref["video2txt"]


def test_text_ids_equal_the_original(split):
    _, config, dataset, ref = split
    tokenizer = init_tokenizer(config["tokenizer"])
    tokens = tokenizer(dataset.text, padding="max_length", truncation=True, max_length=config["max_words"],
                       return_tensors="pt")
    assert torch.equal(tokens.input_ids, ref["input_ids"])
    assert torch.equal(tokens["attention_mask"], ref["attention_mask"])
    assert tokenizer.enc_token_id == ref["enc_token_id"]


def test_frame_indices_and_encoder_inputs_are_bit_identical(split):
    fmt, config, dataset, ref = split
    counts = json.loads((E2E / "videos" / "frame_counts.json").read_text())
    for index, name in enumerate(ref["video_files"]):
        vlen = counts[name]
        assert vlen == ref["vlen"][index]
        indices = sample_frame_indices(vlen, config["num_frm_test"], dataset.strategy)
        assert indices == ref["frame_indices"][index].tolist(), name
        clip, video_index = dataset[index]
        assert video_index == index and clip.shape == (3, 8, 64, 64) and clip.dtype == torch.uint8
        # The loaders hand the encoder uint8 (C, T, H, W) clips, which it normalises as it
        # receives them; the reference hashed the normalised (T, C, H, W) tensor.
        encoder_input = normalize(clip[None], channel_dim=1)[0]
        digest = hashlib.sha256(encoder_input.transpose(0, 1).contiguous().numpy().tobytes()).hexdigest()
        assert digest == ref["video_input_sha256"][index], f"{fmt}: {name}"


def evaluate_with_script(fmt, output_dir, *overrides):
    result = subprocess.run(e2e_evaluate_command(fmt, output_dir, "--device", "cpu", *overrides), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k_test, suffix", [(10, ""), (4, "_k4")])
def test_script_scores_and_metrics_equal_the_original(fmt, k_test, suffix, tmp_path):
    ref = reference(fmt)
    evaluate_with_script(fmt, tmp_path, f"k_test={k_test}")
    scores = torch.load(tmp_path / "scores_test.pt", weights_only=True)
    torch.testing.assert_close(scores["video2txt"], ref["scores_v2t" + suffix], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["txt2video"], ref["scores_t2v" + suffix], atol=1e-5, rtol=0)
    # Entries outside each row's top k_test keep the original's -100 fill exactly.
    assert torch.equal(scores["video2txt"] == -100, ref["scores_v2t" + suffix] == -100)
    if fmt == "condensedmovies":  # private test labels: a submission instead of metrics
        assert (tmp_path / "submission.zip").is_file()
        return
    result = json.loads((tmp_path / "evaluate.txt").read_text().splitlines()[-1])
    assert result["tie_rule"] == "original" and result["frame_sampling"] == "uniform"
    for original, ours in E2E_METRIC_NAMES.items():
        assert result[ours] == ref["metrics" + suffix][original], ours
