"""inference/search.py: chunked exact top-k equals the full product's, memory maps and float16
storage, and the optional faiss backend (skipped where faiss is not installed)."""
import numpy as np
import pytest
import torch

from inference.search import ALIGN, ApproximateIndex, approximate_top_k, exact_top_k, list_count, rescore


def normalised(rows: int, dim: int = 32, seed: int = 0, dtype=np.float32) -> np.ndarray:
    embeddings = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(dtype)


def clustered(rows: int, dim: int = 64, clusters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised vectors around `clusters` centres, and 20 queries drawn the same way."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)

    def draw(count):
        picked = centres[torch.randint(0, clusters, (count,), generator=generator)]
        return torch.nn.functional.normalize(picked + 0.5 * torch.randn(count, dim, generator=generator), dim=1)

    return draw(rows).numpy(), draw(20).numpy()


def needs_faiss():
    """faiss is optional (not in requirements.txt): skip where it is absent or does not import."""
    pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)", exc_type=ImportError)


def full_top_k(query, embeddings, k):
    """Search as it was: the full product and torch.topk (which orders equal scores arbitrarily)."""
    scores = (torch.as_tensor(query).reshape(1, -1) @ torch.from_numpy(np.asarray(embeddings, np.float32)).T)[0]
    return scores.topk(min(k, len(scores)))


@pytest.mark.parametrize("rows", [1, 3, 65, 1000, 4098, 4099])  # every remainder mod 4
@pytest.mark.parametrize("chunk_rows", [64, 100, 256, 1024, 1 << 20])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_chunked_top_k_equals_the_full_product(rows, chunk_rows, k):
    """Rows, order and scores (bit for bit), whether chunks divide the rows or not, k above the chunk
    size or above the rows (then every row, best first)."""
    embeddings = normalised(rows, seed=rows)
    query = torch.from_numpy(normalised(1, seed=7))
    scores, found = exact_top_k(query, embeddings, k, chunk_rows)
    expected = full_top_k(query, embeddings, k)
    assert len(found) == min(k, rows)
    assert torch.equal(found, expected.indices) and torch.equal(scores, expected.values)
    assert scores.dtype == torch.float32 and found.dtype == torch.int64


@pytest.mark.parametrize("rows", [20_001, 20_002])
def test_at_the_embedding_size_of_the_models(rows):
    """embed_dim 256, all rows ranked: every score equals the full product's, bit for bit."""
    embeddings = normalised(rows, 256, seed=rows)
    query = torch.from_numpy(normalised(1, 256, seed=9))
    expected = (query @ torch.from_numpy(embeddings).T)[0].sort(descending=True, stable=True)
    for chunk_rows in (1000, 4096):
        scores, found = exact_top_k(query, embeddings, rows, chunk_rows)
        assert torch.equal(found, expected.indices) and torch.equal(scores, expected.values)


def test_ties_go_to_the_lower_row_whatever_the_chunks():
    """Duplicate videos score equally: lower row first, and the same rows for every chunk size."""
    embeddings = normalised(40)
    embeddings[[3, 17, 29, 38]] = embeddings[5]  # five equal rows, the best of all for this query
    query = torch.from_numpy(embeddings[5].copy())
    for chunk_rows in (1, 64, 4096):
        scores, found = exact_top_k(query, embeddings, 3, chunk_rows)
        assert found.tolist() == [3, 5, 17] and len(set(scores.tolist())) == 1
    scores, found = exact_top_k(query, embeddings, 7)
    assert found[:5].tolist() == [3, 5, 17, 29, 38]
    assert torch.equal(found, torch.sort(torch.from_numpy(embeddings) @ query, descending=True, stable=True)
                       .indices[:7])


def test_empty_and_zero_k():
    assert [len(part) for part in exact_top_k(torch.ones(8), np.zeros((0, 8), np.float32), 5)] == [0, 0]
    assert [len(part) for part in exact_top_k(torch.ones(8), normalised(5, 8), 0)] == [0, 0]
    with pytest.raises(ValueError, match="the query has 7 values, the embeddings 8"):
        exact_top_k(torch.ones(7), normalised(5, 8), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_memory_map_equals_in_memory(tmp_path, dtype):
    """A read-only memory map of a .npy file (as an index opens it) gives what the array in memory
    gives; float16 storage scores its values converted to float32 exactly."""
    embeddings = normalised(5000, 64, dtype=dtype)
    np.save(tmp_path / "embeddings.npy", embeddings)
    mapped = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    query = torch.from_numpy(normalised(1, 64, seed=3))
    scores, found = exact_top_k(query, mapped, 20, chunk_rows=1000)
    expected = full_top_k(query, embeddings.astype(np.float32), 20)
    assert torch.equal(found, expected.indices) and torch.equal(scores, expected.values)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rescore_gives_exact_scores_and_order(dtype):
    """Scores of chosen rows read from their blocks alone are the ones exact search computes."""
    embeddings = normalised(2 * ALIGN * 10 + 3, dtype=dtype)  # the last block is a short one
    query = torch.from_numpy(normalised(1, seed=4))
    all_scores, all_rows = exact_top_k(query, embeddings, len(embeddings))
    by_row = torch.empty(len(embeddings))
    by_row[all_rows] = all_scores
    chosen = [len(embeddings) - 1, 0, 700, 64, 63, 1100]
    scores, rows = rescore(query, embeddings, chosen)
    assert sorted(rows.tolist()) == sorted(chosen) and torch.equal(scores, by_row[rows])
    assert torch.equal(rows, all_rows[torch.isin(all_rows, torch.tensor(chosen))])


def test_list_count():
    assert list_count(1_000_000) == 1024 and list_count(10_000_000) == 4096
    assert list_count(1) == 1 and list_count(100) == 2  # enough training vectors per list
    assert all(rows >= 39 * list_count(rows) for rows in (40, 500, 5000, 50_000))


def test_approximate_index_finds_the_exact_top_10(tmp_path):
    needs_faiss()
    embeddings, queries = clustered(20_000)
    built = ApproximateIndex.build(embeddings)
    assert built.nlist == list_count(len(embeddings)) == 128 and built.nprobe == 4
    built.save(tmp_path / "ivf.faiss")
    assert [path.name for path in tmp_path.iterdir()] == ["ivf.faiss"]  # no temporary left
    loaded = ApproximateIndex.load(tmp_path / "ivf.faiss")
    found = 0
    for query in queries:
        exact_scores, exact_rows = exact_top_k(query, embeddings, 10)
        scores, rows = approximate_top_k(query, embeddings, 10, loaded)
        assert torch.equal(rows, approximate_top_k(query, embeddings, 10, built)[1])  # saved = built
        found += len(set(rows.tolist()) & set(exact_rows.tolist()))
        same = torch.isin(rows, exact_rows)  # found rows have their exact score and place
        assert torch.equal(scores[same], exact_scores[torch.isin(exact_rows, rows)])
    assert found / (10 * len(queries)) >= 0.95


def test_approximate_index_is_deterministic_and_handles_tiny_indexes():
    needs_faiss()
    embeddings, queries = clustered(3000, seed=1)
    first, second = ApproximateIndex.build(embeddings), ApproximateIndex.build(embeddings)
    for query in queries[:5]:
        assert torch.equal(approximate_top_k(query, embeddings, 10, first)[1],
                           approximate_top_k(query, embeddings, 10, second)[1])
    half = embeddings.astype(np.float16)  # float16 storage: built from the values converted to float32
    found = approximate_top_k(queries[0], half, 10, ApproximateIndex.build(half))[1]
    assert len(set(found.tolist()) & set(exact_top_k(queries[0], half, 10)[1].tolist())) >= 8
    tiny = normalised(5, 64)
    scores, rows = approximate_top_k(tiny[2], tiny, 10, ApproximateIndex.build(tiny))
    assert torch.equal(rows, exact_top_k(tiny[2], tiny, 10)[1])  # one list: every row, exactly ordered
    empty = np.zeros((0, 64), np.float32)
    assert len(approximate_top_k(tiny[0], empty, 3, ApproximateIndex.build(empty))[1]) == 0
