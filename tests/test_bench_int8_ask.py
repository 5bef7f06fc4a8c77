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
    assert {check["target"].split(" ")[1] for check in payload["checks"]} >= {"4f", "ITC", "top-10"}


def test_ask_benchmark_gives_the_same_answers_both_ways(tmp_path):
    payload = run_benchmark("bench_ask", tmp_path, "--size", "toy", "--frames", 4, "--depth", 2, "--videos", 1,
                            "--warmup", 0)
    assert [(row["mode"], row["from"]) for row in payload["rows"]] == [
        ("generate", "file"), ("generate", "index"), ("rank", "file"), ("rank", "index")]
    assert all(row["same_answers"] for row in payload["rows"])
