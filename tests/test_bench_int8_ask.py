"""benchmarks.bench_int8 and benchmarks.bench_ask at tiny sizes: they run and write what
RESULTS.md quotes (timings are not asserted; their exactness checks are)."""
import pytest

from tests.test_benchmarks import run_benchmark

pytestmark = pytest.mark.slow  # starts processes


def test_int8_benchmark_speed_and_agreement(tmp_path):
    payload = run_benchmark("bench_int8", tmp_path, "--width", 64, "--depth", 2, "--heads", 2, "--img_size", 32,
                            "--patch_merge", 2, "--frames", 4, "--clips", 12, "--warmup", 0,
                            "--compare", "int8,bf16,fp32-batch1",
                            "--options", "depth=2", "testa_r=[1,2,1,2]")
    speed = {row["precision"]: row for row in payload["rows"] if row["section"] == "speed"}
    assert set(speed) == {"fp32", "int8"} and speed["int8"]["pooled_cosine_vs_fp32"] > 0.99
    assert speed["int8"]["tokens_out"] == speed["fp32"]["tokens_out"]
    agreement = {row["precision"]: row for row in payload["rows"] if row["section"] == "agreement"}
    assert set(agreement) == {"int8", "bf16", "fp32-batch1"}
    agreement = agreement["int8"]
    assert agreement["videos"] == 12 and agreement["queries"] >= 12 and agreement["k"] == 10
    assert agreement["cosine_min"] > 0.99 and 0 <= agreement["top10_overlap_min"] <= 1
    for recall in (agreement["recall_1_5_10"], agreement["recall_1_5_10_fp32"]):  # at k = 10 of 12 videos: most
        assert 0 <= recall[0] <= recall[1] <= recall[2] <= 1 and recall[2] >= 0.5
    assert agreement["fp32_gap_10_11_median"] >= 0 and agreement["fp32_score_std_median"] > 0
    assert -1 <= agreement["fp32_video_cosine_mean"] <= 1
    assert {check["target"].split(" ")[1] for check in payload["checks"]} >= {"4f", "ITC", "top-10"}


def test_int8_benchmark_measures_another_scheme(tmp_path):
    """--int8_scheme other than the tool's: both sections quantise what it names, and say so."""
    payload = run_benchmark("bench_int8", tmp_path, "--width", 64, "--depth", 2, "--heads", 2, "--img_size", 32,
                            "--patch_merge", 2, "--frames", 4, "--clips", 12, "--warmup", 0, "--runs", 1,
                            "--int8_scheme", "channel-noqkv", "--options", "depth=2", "testa_r=[1,2,1,2]")
    rows = {row["section"]: row for row in payload["rows"] if row["precision"] == "int8"}
    assert rows["speed"]["int8_scheme"] == rows["agreement"]["int8_scheme"] == "channel-noqkv"
    assert rows["speed"]["int8_layers"] == [10, 4] and rows["agreement"]["int8_layers"] == [10, 4]
    assert rows["agreement"]["cosine_min"] > 0.99 and rows["speed"]["pooled_cosine_vs_fp32"] > 0.99


def test_ask_benchmark_gives_the_same_answers_both_ways(tmp_path):
    payload = run_benchmark("bench_ask", tmp_path, "--size", "toy", "--frames", 4, "--depth", 2, "--videos", 1,
                            "--warmup", 0)
    assert [(row["mode"], row["from"]) for row in payload["rows"]] == [
        ("generate", "file"), ("generate", "index"), ("rank", "file"), ("rank", "index")]
    assert all(row["same_answers"] for row in payload["rows"])


@pytest.mark.parametrize("scheme, int8, fp32, per_channel", [
    ("tool", 14, 0, False), ("channel", 14, 0, True), ("mlp", 4, 10, False), ("channel-noqkv", 10, 4, True),
    ("noqkv", 10, 4, False),
])
def test_int8_schemes_quantise_the_layers_they_name(scheme, int8, fp32, per_channel):
    """--int8_scheme: 2 divided space-time blocks of 7 linear layers each (qkv, proj, temporal qkv,
    temporal proj, temporal_fc, fc1, fc2); the output stays close to fp32's."""
    import copy

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from benchmarks.bench_encoder import build_encoder
    from benchmarks.bench_int8 import quantised_layers, quantize_scheme
    torch.manual_seed(0)
    encoder = build_encoder(dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=16), 4, False, "cpu")
    video = torch.randint(0, 256, (1, 3, 4, 32, 32), dtype=torch.uint8)
    quantised = quantize_scheme(copy.deepcopy(encoder), scheme)
    assert quantised_layers(quantised) == (int8, fp32)
    if "qkv" in scheme:
        assert all(type(block.attn.qkv) is torch.nn.Linear for block in quantised.blocks)
    layer = next(module for module in quantised.modules() if isinstance(module, DynamicLinear))
    assert (layer.weight().qscheme() == torch.per_channel_affine) == per_channel
    with torch.inference_mode():
        expected, got = encoder(video), quantised(video)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.99
