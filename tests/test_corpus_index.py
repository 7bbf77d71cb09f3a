"""index/corpus_index.py: the sharded 2D index, exact streamed search against evaluation's dense
path, Eq. 14 on shards."""
import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from index import corpus_index as ci
from conftest import assert_same_ranking
import training
import metrics
import models
import starbucks as sb
from deploy import funnel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PAIRS = [(2, 8), (2, 16), (4, 32)]


def build_index(folder, docids, vectors, shard_size, normalize=False, dtype="float32"):
    """An index written straight from vectors {n: (N, D_n)} (no encoder), shard by shard as
    encode_corpus writes it."""
    pairs = [(n, v.shape[1]) for n, v in vectors.items()]
    ci.start_index(folder, ci.index_config(pairs, dtype, shard_size, normalize=normalize))
    for shard, start in enumerate(range(0, len(docids), shard_size)):
        ci.write_shard(folder, shard, docids[start:start + shard_size], {
            n: v[start:start + shard_size].numpy().astype(ci.DTYPES[dtype])
            for n, v in vectors.items()})
    ci.finalize_index(folder, -(-len(docids) // shard_size))
    return ci.open_index(folder)


def shuffled_docids(count, seed=0):
    """Docids whose string order differs from row order (d10 < d2), some of them not ASCII."""
    docids = [f"d{i}" for i in range(count - 3)] + ["é1", "Z", "ü"]
    random.Random(seed).shuffle(docids)
    return docids


def judged_ranks_of_run(run, qids, qrels):
    """{qid: [(grade, rank)]} of the judged documents found in a run (in qrels order, as
    metrics.judged_ranks)."""
    ranks = {}
    for qid in qids:
        if qid in qrels:
            position = {docid: rank for rank, docid in enumerate(run[qid], 1)}
            ranks[qid] = [(g, position[d]) for d, g in qrels[qid].items() if d in position]
    return ranks


def random_qrels(qids, docids, seed=0):
    rng = random.Random(seed)
    qrels = {q: {d: rng.choice([0, 1, 2, 3]) for d in rng.sample(docids, 6)} for q in qids[:-1]}
    qrels[qids[0]]["not_in_corpus"] = 2
    return qrels


# ----------------------------------------------------------------------------------------------
# Exact search equals the dense path, ties included, with FAISS and with torch.topk

@pytest.fixture(params=["faiss", "torch"])
def path(request, monkeypatch):
    """Each test that takes it runs on FAISS's flat search (skipped when FAISS is absent) and on the
    torch.topk fallback that runs without FAISS."""
    if request.param == "faiss":
        pytest.importorskip("faiss")
    else:
        monkeypatch.setattr(ci, "faiss", None)
    return request.param


def trec_order(scores, docids, k):
    """trec_eval's order of one query's (N,) scores, written independently: score, then docid, both
    descending (docids compared as Python strings) -> [(docid, score)] of the first k."""
    ranked = sorted(zip(scores.tolist(), docids), key=lambda pair: (pair[0], pair[1]), reverse=True)
    return [(docid, score) for score, docid in ranked[:k]]


def quarter_vectors(count, dim, generator):
    """Values in {-0.5, ..., 0.5}: their dot products are exact in float32 in any summation order,
    so every kernel gives the same scores, and many of them tie."""
    return torch.randint(-2, 3, (count, dim), generator=generator).float() / 4


@pytest.mark.parametrize("depth, shard_size, chunk_rows, query_block", [
    (10, 300, 256, 64), (100, 300, 128, 5), (1000, 1000, None, 1024), (5000, 77, 64, 16),
    (1, 1000, 512, 37), (600, 700, 256, 16)])
def test_streamed_search_equals_the_dense_path_exactly_with_ties(tmp_path, path, depth, shard_size,
                                                                 chunk_rows, query_block):
    """Exact scores (quarter_vectors), so scores and order are compared exactly, ties included."""
    g = torch.Generator().manual_seed(0)
    vectors, queries = quarter_vectors(1000, 8, g), quarter_vectors(37, 8, g)
    docids, qids = shuffled_docids(1000), [f"q{i}" for i in range(37)]
    qrels = random_qrels(qids, docids)
    index = build_index(str(tmp_path), docids, {1: vectors}, shard_size)
    for d in (3, 8):  # a prefix pair and the stored width
        scores, rows = ci.search(index, (1, d), queries[:, :d], depth, query_block, chunk_rows)
        run = ci.run_from_hits(index, scores, rows, qids)
        dense_scores = queries[:, :d] @ vectors[:, :d].T  # (Q, N)
        dense = metrics.run_from_scores(dense_scores, docids, qids, min(depth, 1000))
        assert [list(run[q].items()) for q in qids] == [list(dense[q].items()) for q in qids]
        assert [list(run[q].items()) for q in qids] == \
            [trec_order(dense_scores[i], docids, depth) for i in range(len(qids))]
        assert metrics.retrieval_scores(judged_ranks_of_run(run, qids, qrels), qrels, depth) == \
            metrics.retrieval_scores(metrics.judged_ranks(dense_scores, docids, qids, qrels), qrels,
                                     depth)


def test_many_documents_tied_at_the_cut_off_come_in_trec_evals_order(tmp_path, path):
    """400 documents of one vector, spread over shards and chunks, straddle the cut-off: at the top
    of a list, or below up to 1248 others. Which of them make the top k is decided by docid
    (descending as strings), as trec_eval sorts."""
    g = torch.Generator().manual_seed(21)
    vectors = quarter_vectors(3000, 8, g)
    vectors[torch.randperm(3000, generator=g)[:400]] = 0.5  # each scores sum(q) / 2
    queries = torch.full((4, 8), 0.25)
    queries[1, :2], queries[2, :3], queries[3, :4] = torch.tensor([0.5, -0.5]), \
        torch.tensor([-0.5, -0.5, 0.5]), torch.tensor([-0.5, -0.5, -0.5, 0.5])
    docids = shuffled_docids(3000, seed=3)
    index = build_index(str(tmp_path), docids, {1: vectors}, shard_size=700)
    dense = queries @ vectors.T  # (Q, N), exact
    for i, query in enumerate(queries):
        tie = float(query.sum()) / 2
        above, tied = int((dense[i] > tie).sum()), int((dense[i] == tie).sum())
        for depth in (above + 50, above + 300):  # 50 or 300 of the tied documents make the list
            assert tied >= 400 and depth < above + tied
            for chunk_rows in (None, 128, 333):
                scores, rows = ci.search(index, (1, 8), query[None], depth, chunk_rows=chunk_rows)
                ranked = list(ci.run_from_hits(index, scores, rows, ["q"])["q"].items())
                assert ranked == trec_order(dense[i], docids, depth)


def test_faiss_and_torch_topk_give_the_same_lists(tmp_path, monkeypatch):
    """Random float vectors: the same ranking, scores within float32 rounding (the two paths
    multiply through different kernels)."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(22)
    vectors = torch.randn(5000, 24, generator=g)
    docids = shuffled_docids(5000, seed=4)
    for normalize in (True, False):
        index = build_index(str(tmp_path / str(normalize)), docids, {3: vectors}, shard_size=1200,
                            normalize=normalize)
        queries = torch.randn(30, 16, generator=g)
        queries = F.normalize(queries, dim=-1) if normalize else queries
        with_faiss = ci.search(index, (3, 16), queries, depth=300, chunk_rows=500)
        monkeypatch.setattr(ci, "faiss", None)
        with_torch = ci.search(index, (3, 16), queries, depth=300, chunk_rows=500)
        monkeypatch.undo()
        assert_same_ranking(with_faiss, with_torch, atol=1e-5)


def test_chunk_size_and_threads_change_no_ranking(tmp_path, path):
    """Chunks of other sizes and other numbers of threads: the same ranking, scores within
    rounding."""
    g = torch.Generator().manual_seed(23)
    vectors = torch.randn(4000, 32, generator=g)
    index = build_index(str(tmp_path), shuffled_docids(4000), {2: vectors}, 1500, normalize=True)
    queries = F.normalize(torch.randn(40, 32, generator=g), dim=-1)
    threads = torch.get_num_threads()
    try:
        results = []
        for chunk_rows, num_threads in ((None, 1), (97, 2), (1024, 1), (4000, 2)):
            torch.set_num_threads(num_threads)
            results.append(ci.search(index, (2, 32), queries, depth=200, query_block=16,
                                     chunk_rows=chunk_rows))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert_same_ranking(result, results[0], atol=1e-6)


def test_default_chunks_hold_64_mb_of_vectors_and_on_the_torch_path_8_mb_of_scores(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert ci.default_chunk_rows(1024, 768, gpu) == 2 ** 21 // 1024  # torch on a GPU: scores bind
    assert ci.default_chunk_rows(1, 768, gpu) == 2 ** 24 // 768  # one query: the vectors bind
    if ci.faiss is not None:
        assert ci.default_chunk_rows(1024, 768, cpu) == 2 ** 24 // 768  # FAISS scores in blocks
    monkeypatch.setattr(ci, "faiss", None)
    assert ci.default_chunk_rows(1024, 768, cpu) == 2 ** 21 // 1024


def test_search_shows_every_chunk_to_progress_and_returns_the_same(tmp_path):
    vectors = torch.randn(300, 8, generator=torch.Generator().manual_seed(13))
    index = build_index(str(tmp_path), [str(i) for i in range(300)], {2: vectors}, shard_size=100)
    queries = torch.randn(5, 8, generator=torch.Generator().manual_seed(14))
    seen = []

    def progress(chunks, total):
        seen.append(total)
        for chunk in chunks:
            seen.append(chunk[0])  # its first global row
            yield chunk

    scores, rows = ci.search(index, (2, 8), queries, depth=7, chunk_rows=64, progress=progress)
    assert seen == [6, 0, 64, 100, 164, 200, 264]  # shards of 100 rows in chunks of 64
    expected = ci.search(index, (2, 8), queries, depth=7, chunk_rows=64)
    assert torch.equal(scores, expected[0]) and torch.equal(rows, expected[1])


def test_float_ties_constructed_on_purpose_keep_trec_eval_order(tmp_path, path):
    """Irrational-looking float scores, exactly tied across shards: each document has one non-zero
    coordinate, so its score is one rounded product in any kernel; one document is all zeros (-0.0
    against +0.0)."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, generator=g)  # few distinct values: many exact ties
    vectors = torch.zeros(600, 8)
    vectors[torch.arange(600), torch.randint(0, 8, (600,), generator=g)] = \
        values[torch.randint(0, 4, (600,), generator=g)]
    vectors[17] = 0.0
    queries = torch.randn(9, 8, generator=g)
    docids, qids = shuffled_docids(600, seed=2), [f"q{i}" for i in range(9)]
    index = build_index(str(tmp_path), docids, {3: vectors}, shard_size=128)
    scores, rows = ci.search(index, (3, 8), queries, depth=250, chunk_rows=100)
    run = ci.run_from_hits(index, scores, rows, qids)
    dense = metrics.run_from_scores(queries @ vectors.T, docids, qids, 250)
    assert [list(run[q].items()) for q in qids] == [list(dense[q].items()) for q in qids]
    assert len(set(scores[0].tolist())) < 20  # the lists are mostly ties


def test_index_of_the_real_set_gives_evaluates_runs_and_metrics(tmp_path, minilm, path):
    """The packaged MiniLM on wiki-ict: encode_corpus + search == score_matrices + run_from_scores /
    judged_ranks.

    One shard holds the 318 passages, so they are batched as score_matrices batches them; with
    several shards each shard's passages are padded differently, which moves embeddings by about
    1e-7. On the torch path the one chunk is scored by the dense path's very matmul: runs equal bit
    for bit. FAISS multiplies through its own kernel: scores within rounding, the same ranking
    wherever two documents are further apart than that, and on this set the same metrics."""
    model, tokenizer = minilm
    corpus, queries, qrels = metrics.embedded_retrieval_set()
    docids, qids = list(corpus), list(queries)
    row_of = {docid: row for row, docid in enumerate(docids)}  # one shard, in corpus order
    pairs = sb.default_pairs(6, 384)
    dense = metrics.score_matrices(model, tokenizer, (corpus, queries, qrels), pairs,
                                   sb.StarbucksConfig(pairs, "mean", "cos"),
                                   metrics.EvalSettings(query_max_len=32, passage_max_len=128,
                                                        batch_size=64))
    ci.encode_corpus(model, tokenizer, iter(corpus.items()), pairs, str(tmp_path),
                     ci.EncodeSettings("mean", 128, 64, normalize=True, shard_size=1000,
                                       dtype="float32"))
    index = ci.open_index(str(tmp_path))
    q = models.encode_2d(model, tokenizer, [queries[x]
                                            for x in qids], pairs, "mean", 32, 64, normalize=True)
    for pair in pairs:
        scores, rows = ci.search(index, pair, q[pair], depth=1000)
        run = ci.run_from_hits(index, scores, rows, qids)
        expected = metrics.run_from_scores(dense[pair], docids, qids, len(docids))
        if path == "torch":
            assert [list(run[x].items()) for x in qids] == [list(expected[x].items()) for x in qids]
        else:
            expected_rows = torch.tensor([[row_of[d] for d in expected[x]] for x in qids])
            expected_scores = torch.tensor([list(expected[x].values()) for x in qids])
            assert_same_ranking((scores, rows), (expected_scores, expected_rows), atol=1e-6)
        assert metrics.retrieval_scores(judged_ranks_of_run(run, qids, qrels), qrels, 1000) == \
            metrics.retrieval_scores(metrics.judged_ranks(dense[pair], docids, qids, qrels), qrels,
                                     1000)


def test_search_rejects_pairs_not_stored_unnormalised_or_non_finite_queries_and_non_finite_scores(
        tmp_path):
    index = build_index(str(tmp_path), shuffled_docids(20), {2: torch.randn(20, 16)}, 8,
                        normalize=True)
    with pytest.raises(ValueError, match="not in the index"):
        ci.search(index, (2, 32), torch.randn(3, 32))
    with pytest.raises(ValueError, match="not in the index"):
        ci.search(index, (3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="L2-normalised"):
        ci.search(index, (2, 8), torch.randn(3, 8) * 3)
    with pytest.raises(ValueError, match=r"not \(Q, 8\)"):
        ci.search(index, (2, 8), torch.randn(3, 9))
    dot_product = build_index(str(tmp_path / "dot"), [str(i) for i in range(5)],
                              {2: torch.randn(5, 8)}, shard_size=5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            ci.search(dot_product, (2, 8), torch.full((2, 8), bad))
    vectors = torch.randn(5, 8)
    # written around encode_corpus, which refuses non-finite embeddings
    vectors[3, 0] = float("nan")
    broken = build_index(str(tmp_path / "broken"), [str(i)
                                                    for i in range(5)], {2: vectors}, shard_size=5)
    with pytest.raises(ValueError, match="non-finite scores"):
        ci.search(broken, (2, 8), torch.randn(2, 8))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("row", [5, 280])  # in the first chunk, in the last
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_search_refuses_a_non_finite_document_even_when_the_lists_fill_without_it(
        tmp_path, path, normalize, row, bad):
    """At depth 3 of 300 the lists fill up without the broken document: it used to be skipped, with
    exit 0."""
    vectors = torch.randn(300, 8, generator=torch.Generator().manual_seed(8))
    vectors[row, 2] = bad
    index = build_index(str(tmp_path), [str(i) for i in range(300)], {2: vectors}, shard_size=300,
                        normalize=normalize)
    queries = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(9)), dim=-1)
    with pytest.raises(ValueError, match="non-finite scores"):
        ci.search(index, (2, 8), queries, depth=3, chunk_rows=128)  # chunks of 128, 128 and 44 rows


def test_a_minus_infinite_score_ranks_last_and_the_funnel_refuses_a_non_finite_rerank(
        tmp_path, path):
    vectors = torch.randn(300, 8, generator=torch.Generator().manual_seed(10))
    vectors[7] = 0.0
    vectors[7, 0] = float("-inf")  # scores -inf against queries whose first coordinate is positive
    queries = torch.randn(4, 8, generator=torch.Generator().manual_seed(11))
    queries[:, 0] = queries[:, 0].abs() + 0.1
    dot_product = build_index(str(tmp_path / "dot"), [str(i) for i in range(300)], {2: vectors},
                              shard_size=300)
    scores, rows = ci.search(dot_product, (2, 8), queries, depth=300, chunk_rows=128)
    assert (rows[:, -1] == 7).all() and (scores[:, -1] == float("-inf")).all()

    large = torch.randn(300, 16, generator=torch.Generator().manual_seed(12))
    large[40, 3] = float("nan")  # only in the later stage's layer: the first stage shortlists it
    index = build_index(str(tmp_path / "funnel"), [str(i) for i in range(300)],
                        {2: torch.randn(300, 8), 4: large}, shard_size=100)
    stage_queries = [torch.randn(4, 8), torch.randn(4, 16)]
    with pytest.raises(ValueError, match="non-finite scores"):
        ci.adaptive_search(index, [(2, 8), (4, 16)], stage_queries, [300], depth=3)


# ----------------------------------------------------------------------------------------------
# Encoding: prefixes stored once, raw; shards written whole or not at all; resume

TEXTS = [
    f"passage {i}: " + " ".join(["coffee", "tea", "milk", "water", "bread"][j % 5]
                                for j in range(i % 7 + 1)) for i in range(10)]
DOCS = [(f"p{i}", t) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir)


def test_encode_stores_each_layer_once_at_its_widest_dim_raw(tmp_path, tiny):
    model, tokenizer = tiny
    assert ci.stored_widths(TINY_PAIRS) == {2: 16, 4: 32}
    encoded = ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, str(tmp_path),
                               ci.EncodeSettings("mean", 32, 4, normalize=True, shard_size=4,
                                                 dtype="float32"))
    assert encoded == 10
    index = ci.open_index(str(tmp_path))
    assert index.shard_rows == [4, 4, 2] and index.widths == {2: 16, 4: 32} and index.normalize
    assert sorted(os.listdir(tmp_path / "shard-00000")) == [
        "docids.npy", "layer-2.npy", "layer-4.npy", "shard_complete.json"]
    for shard, start in enumerate((0, 4, 8)):
        # not normalised
        raw = models.encode_2d(model, tokenizer, TEXTS[start:start + 4], [(2, 16), (4, 32)], "mean",
                               32, 4)
        for n, width in ((2, 16), (4, 32)):
            stored = np.load(tmp_path / f"shard-{shard:05d}" / f"layer-{n}.npy")
            assert stored.dtype == np.float32 and torch.equal(torch.from_numpy(stored),
                                                              raw[(n, width)])
    # the search normalises each pair's prefix after truncation (Eq. 2): 2x8 is not the first 8 of
    # unit 2x16
    q = models.encode_2d(model, tokenizer, ["coffee"], TINY_PAIRS, "mean", 32, normalize=True)
    scores, rows = ci.search(index, (2, 8), q[(2, 8)], depth=10)
    docs = models.encode_2d(model, tokenizer, TEXTS, [(2, 8)], "mean", 32, 4,
                            normalize=True)[(2, 8)]
    torch.testing.assert_close(scores[0], (docs @ q[(2, 8)][0])[rows[0]], rtol=0, atol=1e-6)


def test_float16_storage_is_the_default_and_halves_the_files(tmp_path, tiny):
    model, tokenizer = tiny
    ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, str(tmp_path / "default"),
                     ci.EncodeSettings("mean", 32, 4))
    ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, str(tmp_path / "float32"),
                     ci.EncodeSettings("mean", 32, 4, dtype="float32"))
    half, full = (np.load(tmp_path / t / "shard-00000" / "layer-4.npy")
                  for t in ("default", "float32"))
    assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)


class Crash(Exception):
    pass


def crash_after(docs, count):
    """The documents, then a crash after `count` of them (a run killed mid-shard)."""
    for i, doc in enumerate(docs):
        if i == count:
            raise Crash
        yield doc


def test_an_interrupted_or_torn_encoding_resumes_at_the_first_missing_shard(tmp_path, tiny):
    model, tokenizer = tiny
    folder, clean = str(tmp_path / "index"), str(tmp_path / "clean")
    encode = lambda docs, out: ci.encode_corpus(model, tokenizer, docs, TINY_PAIRS, out,
                                                ci.EncodeSettings("mean", 32, 4, shard_size=3,
                                                                  dtype="float32"))
    assert encode(iter(DOCS), clean) == 10
    with pytest.raises(Crash):
        # shards 0 and 1 written, shard 2 (documents 6-8) lost mid-way
        encode(crash_after(DOCS, 8), folder)
    with pytest.raises(ValueError, match="not a complete index"):
        ci.open_index(folder)
    layer = os.path.join(folder, "shard-00001", "layer-4.npy")
    with open(layer, "r+b") as f:  # shard 1 torn: its file cut short after its marker was written
        f.truncate(os.path.getsize(layer) // 2)
    os.makedirs(os.path.join(folder, ".shard-00002.tmp"))  # a rename that never happened
    assert "bytes where" in ci.shard_problem(folder, 1)
    assert encode(iter(DOCS), folder) == 3 + 3 + 1  # shards 1 (torn), 2 and 3; shard 0 kept
    assert encode(iter(DOCS), folder) == 0  # complete: nothing to redo
    for shard in range(4):
        for name in ("docids.npy", "layer-2.npy", "layer-4.npy"):
            a, b = (np.load(os.path.join(f, f"shard-{shard:05d}", name)) for f in (folder, clean))
            assert np.array_equal(a, b)
    assert ci.open_index(folder).shard_rows == [3, 3, 3, 1]
    with open(layer, "r+b") as f:  # a shard torn after the index was finished is never read
        f.truncate(10)
    with pytest.raises(ValueError, match=r"shard-00001: layer-4\.npy has 10 bytes"):
        ci.open_index(folder)


def test_resume_refuses_other_settings_another_corpus_and_bad_docids(tmp_path, tiny):
    model, tokenizer = tiny
    folder = str(tmp_path)
    ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, folder,
                     ci.EncodeSettings("mean", 32, 4, shard_size=3))
    with pytest.raises(ValueError, match="other settings.*dtype"):
        ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, folder,
                         ci.EncodeSettings("mean", 32, 4, shard_size=3, dtype="float32"))
    changed = [(docid, text + " changed") if docid == "p4" else (docid, text)
               for docid, text in DOCS]
    with pytest.raises(ValueError, match=r"shard-00001 was encoded from other text"):
        ci.encode_corpus(model, tokenizer, iter(changed), TINY_PAIRS, folder,
                         ci.EncodeSettings("mean", 32, 4, shard_size=3))
    with pytest.raises(ValueError, match="whitespace"):
        ci.encode_corpus(model, tokenizer, iter([("a b", "text")]), TINY_PAIRS, str(tmp_path / "x"),
                         ci.EncodeSettings("mean", 32))
    with pytest.raises(ValueError, match="'p1' occurs more than once"):
        ci.encode_corpus(model, tokenizer, iter(DOCS + [("p1", "again")]), TINY_PAIRS,
                         str(tmp_path / "y"), ci.EncodeSettings("mean", 32))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoding_rank(rank, port, model_dir, folder):
    """One of two gloo ranks: encodes shards rank, rank + 2, ...; rank 0 finishes the index."""
    from transformers import AutoModel, AutoTokenizer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    training.setup()
    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(
        model_dir)
    encoded = ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, folder,
                               ci.EncodeSettings("mean", 32, 4, shard_size=3))
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(encoded, f)
    training.cleanup()


def test_two_ranks_encode_alternate_shards_and_rank_0_finishes_the_index(
        tmp_path, tiny, tiny_model_dir):
    folder = str(tmp_path / "ranks")
    mp.spawn(_encoding_rank, args=(_free_port(), tiny_model_dir, folder), nprocs=2)
    # shards 0, 2 | 1, 3
    assert [json.load(open(os.path.join(folder, f"rank{r}.json")))
            for r in (0, 1)] == [3 + 3, 3 + 1]
    torch.set_num_threads(1)
    model, tokenizer = tiny
    ci.encode_corpus(model, tokenizer, iter(DOCS), TINY_PAIRS, str(tmp_path / "one"),
                     ci.EncodeSettings("mean", 32, 4, shard_size=3))
    assert ci.open_index(folder).shard_rows == [3, 3, 3, 1]
    for name in ["docid_rank.npy"] + [
            f"shard-{s:05d}/{f}" for s in range(4) for f in ("docids.npy", "layer-4.npy")]:
        assert np.array_equal(np.load(os.path.join(folder, name)), np.load(tmp_path / "one" / name))


# ----------------------------------------------------------------------------------------------
# Memory: a corpus whose dense score matrix is several times the process's whole allowance

LIMITED_SEARCH = textwrap.dedent("""
    import resource, sys, json
    sys.path.insert(0, {root!r})
    import torch
    from index import corpus_index as ci
    ci.faiss = ci.faiss if {with_faiss} else None
    torch.set_num_threads(1)
    index = ci.open_index({folder!r})
    queries = torch.load({queries!r})
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + {allowance}, size + {allowance}))
    try:
        torch.empty(len(queries), index.num_docs)  # the dense path's score matrix alone
        sys.exit("the limit does not bind")
    except RuntimeError:
        pass
    scores, rows = ci.search(index, (1, queries.shape[1]), queries, depth={depth})
    run = ci.run_from_hits(index, scores, rows, [f"q{{i}}" for i in range(len(queries))])
    json.dump({{q: list(docs.items()) for q, docs in run.items()}}, open({out!r}, "w"))
""")


def test_exact_metrics_under_a_memory_limit_the_dense_score_matrix_exceeds_several_times(
        tmp_path, path):
    num_docs, num_queries, dim, depth, allowance = 200_000, 300, 16, 100, 48 * 2 ** 20
    # the dense (Q, N) float32 scores: 240 MB against 50 MB
    assert num_queries * num_docs * 4 >= 4 * allowance
    g = torch.Generator().manual_seed(0)
    # exact scores: the reference is exact
    vectors = torch.randint(-2, 3, (num_docs, dim), generator=g).float() / 4
    queries = torch.randint(-2, 3, (num_queries, dim), generator=g).float() / 4
    docids, qids = shuffled_docids(num_docs), [f"q{i}" for i in range(num_queries)]
    folder = str(tmp_path / "index")
    build_index(folder, docids, {1: vectors}, shard_size=50_000)
    torch.save(queries, tmp_path / "queries.pt")
    script = LIMITED_SEARCH.format(root=ROOT, folder=folder, queries=str(tmp_path / "queries.pt"),
                                   allowance=allowance, depth=depth, out=str(tmp_path / "run.json"),
                                   with_faiss=path == "faiss")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = {q: dict(docs) for q, docs in json.load(open(tmp_path / "run.json")).items()}
    qrels = random_qrels(qids, docids)
    for start in range(0, num_queries, 25):  # the reference: the dense path, 25 queries at a time
        block = qids[start:start + 25]
        scores = queries[start:start + 25] @ vectors.T  # (25, N)
        dense = metrics.run_from_scores(scores, docids, block, depth)
        assert [list(run[q].items()) for q in block] == [list(dense[q].items()) for q in block]
        block_qrels = {q: qrels[q] for q in block if q in qrels}
        assert metrics.retrieval_scores(judged_ranks_of_run(run, block, block_qrels), block_qrels,
                                        depth) == \
            metrics.retrieval_scores(metrics.judged_ranks(scores, docids, block, block_qrels),
                                     block_qrels, depth)


# ----------------------------------------------------------------------------------------------
# Eq. 14 on the shards

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gather_reads_the_prefix_of_any_rows_across_shards(tmp_path, dtype):
    g = torch.Generator().manual_seed(6)
    raw = torch.randn(500, 12, generator=g)
    index = build_index(str(tmp_path), shuffled_docids(500), {3: raw}, shard_size=64,
                        normalize=True, dtype=dtype)
    stored = raw.numpy().astype(ci.DTYPES[dtype])
    rows = torch.tensor([499, 0, 63, 64, 64, 200, 7, 448])  # unsorted, repeated, at shard edges
    vectors, ranks = ci.gather(index, (3, 5), rows)
    assert torch.equal(vectors,
                       F.normalize(torch.from_numpy(stored[rows.numpy(), :5]).float(), dim=-1))
    assert torch.equal(ranks, torch.from_numpy(np.load(tmp_path / ci.DOCID_RANK))[rows])
    layer = tmp_path / ci.shard_name(7) / "layer-3.npy"  # rows 448-499
    os.truncate(layer, os.path.getsize(layer) - 1)  # torn after open_index checked it
    with pytest.raises(ValueError, match="shorter than when the index was opened"):
        ci.gather(index, (3, 12), rows)


def test_adaptive_search_on_shards_equals_starbucks_adaptive_search(tmp_path):
    g = torch.Generator().manual_seed(3)
    raw = {
        1: torch.randn(1500, 8, generator=g), 2: torch.randn(1500, 16, generator=g), 4: torch.randn(
            1500, 48, generator=g)}
    queries = {n: torch.randn(23, v.shape[1], generator=g) for n, v in raw.items()}
    index = build_index(str(tmp_path), shuffled_docids(1500), raw, shard_size=97, normalize=True)
    for pairs, ks, depth in (([(1, 8), (4, 48)], [200], 10), ([
        (1, 4), (2, 16), (4, 32)], [300, 40], 25), ([(4, 48)], [], 10)):
        stage_queries = [F.normalize(queries[n][:, :d], dim=-1) for n, d in pairs]
        # Eq. 2: normalise after truncation
        stage_corpus = [F.normalize(raw[n][:, :d], dim=-1) for n, d in pairs]
        expected_scores, expected_rows = funnel.adaptive_search(stage_queries, stage_corpus, ks,
                                                                depth)
        scores, rows = ci.adaptive_search(index, pairs, stage_queries, ks, depth, query_block=8,
                                          chunk_rows=256)
        # the first stage scores through another kernel (FAISS or a chunked matmul): to rounding
        assert_same_ranking((scores, rows), (expected_scores, expected_rows), atol=1e-6)


def test_the_funnel_returns_the_float_rescoring_of_its_shortlist(tmp_path, path):
    """Exactly: each later stage's scores are its pair's dot products of the shortlisted rows (read
    from the shards, normalised after truncation), ranked in trec_eval's order."""
    g = torch.Generator().manual_seed(24)
    raw = {1: torch.randn(2000, 8, generator=g), 3: torch.randn(2000, 32, generator=g)}
    docids = shuffled_docids(2000, seed=5)
    index = build_index(str(tmp_path), docids, raw, shard_size=300, normalize=True)
    pairs, ks, depth = [(1, 8), (3, 32)], [150], 20
    stage_queries = [F.normalize(torch.randn(12, d, generator=g), dim=-1) for _, d in pairs]
    scores, rows = ci.adaptive_search(index, pairs, stage_queries, ks, depth)
    shortlist = ci.search(index, pairs[0], stage_queries[0], ks[0])[1]  # (Q, 150)
    vectors = ci.read_rows(index, pairs[1], shortlist.reshape(-1)).view(12, ks[0], 32)
    rescored = torch.bmm(vectors, stage_queries[1].unsqueeze(2)).squeeze(2)  # (Q, 150): its bmm
    for i in range(12):
        names = ci.docids(index, shortlist[i])
        expected = trec_order(rescored[i], names, depth)
        assert list(zip(ci.docids(index, rows[i]), scores[i].tolist())) == expected


# ----------------------------------------------------------------------------------------------
# Optional FAISS, exact search its reference

def test_faiss_indexes_against_exact_search(tmp_path):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(4)
    index = build_index(str(tmp_path), shuffled_docids(3000),
                        {2: torch.randn(3000, 32, generator=g)}, 700, normalize=True)
    queries = F.normalize(torch.randn(50, 32, generator=g), dim=-1)
    exact_scores, exact_rows = ci.search(index, (2, 32), queries, depth=10)
    scores, rows = ci.faiss_search(ci.faiss_index(index, (2, 32), "flat"), queries, 10)
    assert torch.equal(rows, exact_rows) and ci.overlap_at_k(rows, exact_rows, 10) == 1.0
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)
    # probing every list is exhaustive
    every_list = ci.faiss_index(index, (2, 32), "ivf", ci.FaissSettings(nlist=16, nprobe=16))
    assert ci.overlap_at_k(ci.faiss_search(every_list, queries, 10)[1], exact_rows, 10) == 1.0
    assert ci.overlap_at_k(
        ci.faiss_search(ci.faiss_index(index, (2, 32), "hnsw"), queries, 10)[1], exact_rows,
        10) >= 0.9
    # approximate: some neighbours missed
    one_list = ci.faiss_index(index, (2, 32), "ivf", ci.FaissSettings(nlist=16, nprobe=1))
    assert 0 < ci.overlap_at_k(ci.faiss_search(one_list, queries, 10)[1], exact_rows, 10) < 1.0
    # one list holds fewer: FAISS pads with -1 at the end
    scores, rows = ci.faiss_search(one_list, queries, 1000)
    # -1 only after the found
    assert (rows == -1).any() and ((rows[:, 1:] >= 0) <= (rows[:, :-1] >= 0)).all()
    qids = [f"q{i}" for i in range(len(queries))]
    for (qid, ranked), found, values in zip(ci.ranked_lists(index, scores, rows, qids), rows,
                                            scores):
        # a run file lists what was found, named; no slot of -1 names a document
        found = found[found >= 0]
        assert [d for d, _ in ranked] == ci.docids(index, found) and [
            v for _, v in ranked] == values[:len(found)].tolist()
    with pytest.raises(ValueError, match="unknown FAISS index"):
        ci.faiss_index(index, (2, 32), "lsh")
