"""The CPU benchmark scripts run at tiny sizes and write what RESULTS.md quotes.

Timings are not asserted (benchmarks, not timed tests); the exactness checks they carry are.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # starts processes or runs whole pipelines: not in make test-fast


def run_benchmark(module, tmp_path, *args, timed=True):
    """Run a benchmark (python -m benchmarks.<module> from the repository root) and return its JSON;
    ``timed`` ones take the common timing flags."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timing = ["--device", "cpu", "--runs", "1"] if timed else []
    command = [sys.executable, "-m", f"benchmarks.{module}", *timing, "--out", str(out), *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def by_section(payload):
    sections = {}
    for row in payload["rows"]:
        sections.setdefault(row["section"], []).append(row)
    return sections


def test_evaluation_benchmark_sections(tmp_path):
    payload = run_benchmark("bench_eval", tmp_path, "--sections", "throughput,rerank,full,shared_kv",
                            "--throughput_videos", 4, "--throughput_pairs", 16, "--itm_batches", "4,8",
                            "--k_test", 4, "--k_test_batch_size", 8, "--rerank_n", 8, "--full_n", 8,
                            "--shared_kv_pairs", 2)
    sections = by_section(payload)
    assert [row["itm_batch"] for row in sections["throughput"]] == [4, 8]
    rerank, = sections["rerank"]
    assert rerank["identical"] and rerank["same_ranking"] and rerank["pairs"] == 2 * 8 * 4
    shared, = sections["shared_kv"]
    assert shared["max_abs_score_diff"] == 0.0 and shared["video_tokens"] == 4801
    full, = sections["full"]
    assert full["n"] == 8 and full["median_s"] > 0


def test_low_resource_evaluation_benchmark_measures_both_paths(tmp_path):
    payload = run_benchmark("bench_eval", tmp_path, "--sections", "low_resource", "--low_n", 4,
                            "--low_k_test", 2, "--low_itm_batch", 2)
    default, low = payload["rows"]
    assert (default["low_resource_eval"], low["low_resource_eval"]) == (False, True)
    assert default["fp32_token_cache_mib"] == pytest.approx(4 * 4801 * 768 * 4 / 2 ** 20)
    assert "eval_peak_cut_vs_default" in low
    assert payload["machine"]["malloc_mmap_threshold_env"] == "65536"  # RSS peaks need freed memory returned


def test_encoder_benchmark_rows_and_targets(tmp_path):
    payload = run_benchmark("bench_encoder", tmp_path, "--width", 64, "--depth", 12, "--heads", 2,
                            "--img_size", 32, "--patch_size", 16, "--frames", 8, "--warmup", 0, "--profile")
    rows = {(row["merging"], row["precision"]): row for row in payload["rows"]}
    assert set(rows) == {(merging, precision) for merging in ("off", "on") for precision in ("fp32", "bf16")}
    assert rows[("on", "fp32")]["tokens_out"] < rows[("off", "fp32")]["tokens_out"] == 1 + 4 * 8
    assert 0 <= rows[("on", "fp32")]["bookkeeping_share"] < 1
    assert rows[("off", "bf16")]["cos_vs_fp32"] > 0.99
    assert payload["machine"]["allocator_keeps_freed_memory"] is True
    assert any(check["target"].startswith("fp32 8f merging on") for check in payload["checks"])


def test_training_step_benchmark_with_and_without_checkpointing(tmp_path):
    payload = run_benchmark("bench_train_step", tmp_path, "--preset", "toy", "--warmup", 0,
                            "--grad_ckpt", "off,on", "--override", "depth=2")
    assert [row["grad_ckpt"] for row in payload["rows"]] == ["off", "on"]
    assert all(row["peak_mib"] > 0 and row["median_s"] > 0 for row in payload["rows"])


def test_data_benchmark_times_both_decoders_and_both_paths(tmp_path):
    rows = run_benchmark("bench_data", tmp_path, "--clips", 1, "--repeats", 1, "--seconds", 2,
                         timed=False)["results"]
    assert {(row["backend"], row["mode"]) for row in rows} == {
        (backend, mode) for backend in ("decord", "pyav") for mode in ("augmented", "plain")}
    assert all(row["clips_per_s"] > 0 and 0 <= row["decode_share"] <= 1 for row in rows)


def test_gpu_eval_check_runs_on_the_cpu(tmp_path):
    payload = run_benchmark("gpu_eval_check", tmp_path, "--device", "cpu", "--precisions", "none",
                            "--formats", "queryd", timed=False)
    run, = payload["runs"]
    assert run["metrics_equal"] and run["max_abs_diff_v2t"] < 1e-5
    assert payload["generation"] == {"pretrain": {"ids_equal": True}, "vqa": {"ids_equal": True}}


def test_search_benchmark_at_scale_is_exact(tmp_path):
    """bench_search's `large` section at a tiny size: chunked search over memory maps equals the full
    product for both storages; the faiss rows where faiss imports (it is optional)."""
    payload = run_benchmark("bench_search", tmp_path, "--sections", "itc,large", "--videos", 2000,
                            "--large_videos", 20_000, "--clusters", 50, "--queries", 5, "--threads", 1,
                            "--nprobe", 4)
    results = payload["results"]
    assert results["itc_ms"]["median_ms"] > 0 and results["itc_ms"]["full_product_median_ms"] > 0
    checked = [row for row in results["large"]["exact"] if "identical_to_full_product" in row]
    assert [(row["storage"], row["identical_to_full_product"]) for row in checked] == [
        ("float32", "5/5"), ("float16", "5/5")]
    approximate = results["large"]["approximate"]
    if isinstance(approximate, dict):
        assert {row["nprobe"] for row in approximate["by_nprobe"]} == {4, approximate["default_nprobe"]}
        assert all(0 <= row["recall@10"] <= 1 for row in approximate["by_nprobe"])
    else:
        assert approximate.startswith("not run: faiss does not import")


def test_rules_benchmark_times_every_rule_on_the_axes_it_reduces(tmp_path):
    from models.rules import RULES
    payload = run_benchmark("bench_rules", tmp_path, "--quick", "--warmup", 0)
    rows = {row["rule"]: row for row in payload["rows"]}
    assert set(rows) == {name for name, rule in RULES.items() if rule.axes}
    assert rows["vid_tldr"]["attention_map_included"] and not rows["tome"]["attention_map_included"]
    for name, row in rows.items():  # an axis a rule does not reduce is not timed
        assert [row[f"{axis}_ms"] is not None for axis in ("time", "space")] == [
            axis in RULES[name].axes for axis in ("time", "space")]
        assert row["decision_ms"] > 0 and row["share_pct"] > 0


@pytest.mark.parametrize("section", [[], ["--contention"]])
def test_window_benchmark_counts_the_windows_of_its_video(tmp_path, section):
    """bench_windows at 224 px with one block on a 3 s video: windows of 2 s every 1 s are two."""
    payload = run_benchmark("bench_windows", tmp_path, "--model", 224, "--depth", 1, "--seconds", 3, "--window", 2,
                            "--batch_size", 2, "--rounds", 1, "--precision", "fp32", *section, timed=False)
    if section:
        assert set(payload["medians"]) == {"alone", "beside decoding", "beside a busy loop"}
        assert all(rate > 0 for rate in payload["medians"].values())
    else:
        assert payload["results"]["windows"] == 2 and payload["results"]["ratio"] > 0
