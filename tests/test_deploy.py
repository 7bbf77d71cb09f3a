"""Using the sizes (README Eq. 14): early-exit encode, adaptive search, FLOPs, deploy/export.py,
evaluate.py --adaptive."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from conftest import assert_same_ranking
import data
import metrics
import models
import starbucks as sb
from deploy import export, funnel
from recipe import flops

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply in early trading on Monday.",
         "A short one.", "Rain is expected across the south of the country tomorrow afternoon."]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random 4-layer x 32 BERT with the packaged bert-base-uncased tokenizer, saved as a model
    folder."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(models.resolve_model_path(
        data.DEFAULT_MODEL)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return AutoModel.from_pretrained(tiny_folder).eval(), AutoTokenizer.from_pretrained(tiny_folder)


def exhaustive(q, c, depth):
    """Independent exhaustive search: every document scored by one matmul."""
    top = (q @ c.T).topk(depth, dim=1)
    return top.values, top.indices


def funnel_by_hand(queries, corpus, ks, depth, margin=1e-5):
    """Eq. 14 one query at a time with numpy and Python sorts: the reference adaptive_search is
    checked against -> [(ranked documents, decided)]. decided: every cut of the funnel falls between
    scores further apart than margin, so that no kernel's rounding can change who makes the list."""
    results = []
    for i in range(queries[0].shape[0]):
        first = corpus[0].numpy() @ queries[0][i].numpy()
        candidates = np.argsort(-first, kind="stable").tolist()
        scores, decided = dict(enumerate(first.tolist())), True
        for j, keep in enumerate([ks[0]] + list(ks[1:]) + [depth]):
            if j:
                scores = {c: float(corpus[j][c] @ queries[j][i]) for c in candidates}
                candidates = sorted(candidates, key=lambda c: -scores[c])
            ranked = [scores[c] for c in candidates]
            decided &= keep >= len(ranked) or ranked[keep - 1] - ranked[keep] > margin
            decided &= all(a - b > margin for a, b in zip(ranked[:keep], ranked[1:keep]))
            candidates = candidates[:keep]
        results.append((candidates, decided))
    return results


# ----------------------------------------------------------------------------------------------
# encode: early exit at one pair

def test_encode_equals_embed_2d_and_never_runs_later_layers(tiny):
    model, tokenizer = tiny
    calls = []
    # layer 3
    handle = sb.transformer_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = models.encode(model, tokenizer, TEXTS, (2, 16), pooling="mean", batch_size=3)
    finally:
        handle.remove()
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[2]  # (B, T, H): layer 2
    mask = enc["attention_mask"].unsqueeze(-1).float()
    # Eq. 1 by hand: mean over real tokens, first 16
    expected = ((hidden * mask).sum(1) / mask.sum(1))[:, :16]
    assert got.shape == (4, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == []  # layer 3 never ran


def test_encode_normalize_gives_unit_vectors(tiny):
    model, tokenizer = tiny
    got = models.encode(model, tokenizer, TEXTS, (4, 8), normalize=True)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("texts, pair, message", [
    ("one string", (2, 16), "list of strings"),
    (TEXTS, (5, 16), "outside 1..4"),
    (TEXTS, (2, 33), "outside 1..32"),
    (TEXTS, (0, 16), "outside 1..4"),
])
def test_encode_bad_input(tiny, texts, pair, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        models.encode(model, tokenizer, texts, pair)


# ----------------------------------------------------------------------------------------------
# Funnels and adaptive search (Eq. 14)

def test_parse_funnel():
    assert funnel.parse_funnel("2x24:50:6x384") == ([(2, 24), (6, 384)], [50])
    assert funnel.parse_funnel("1x12:200:2x24:50:6x384") == ([(1, 12), (2, 24), (6, 384)], [
        200, 50])


@pytest.mark.parametrize("text", [
    "2x24", "2x24:50", "2x24:0:6x384", "2x24:k:6x384", "2x24:50:6x", "2x24,3x48:50:6x384"])
def test_parse_funnel_errors(text):
    with pytest.raises(ValueError, match="funnel|pair"):
        funnel.parse_funnel(text)


def test_adaptive_search_by_hand():
    # small pair ranks documents 3, 2, 1, 0; the shortlist of 2 keeps {3, 2}; the large pair would
    # prefer document 0 (score 10) but it was not shortlisted, so the answer is 3 (score 2) then 2
    # (score 1)
    small, large = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[10.0], [0.0], [1.0],
                                                                             [2.0]])
    q = torch.tensor([[1.0]])
    scores, indices = funnel.adaptive_search([q, q], [small, large], [2], depth=2)
    assert indices.tolist() == [[3, 2]] and scores.tolist() == [[2.0, 1.0]]
    scores, indices = funnel.adaptive_search([q], [large], [], depth=2)  # one stage: exhaustive
    assert indices.tolist() == [[0, 3]] and scores.tolist() == [[10.0, 2.0]]


def test_adaptive_search_with_k_equal_to_corpus_is_exhaustive_with_the_large_pair():
    g = torch.Generator().manual_seed(0)
    q_small, q_large = torch.randn(7, 4, generator=g), torch.randn(7, 32, generator=g)
    c_small, c_large = torch.randn(50, 4, generator=g), torch.randn(50, 32, generator=g)
    scores, indices = funnel.adaptive_search([q_small, q_large], [c_small, c_large], [50], depth=10)
    ref = exhaustive(q_large, c_large, 10)  # another kernel (one matmul): equal up to rounding
    assert_same_ranking((scores, indices), ref, atol=1e-5)
    # k > N
    capped = funnel.adaptive_search([q_small, q_large], [c_small, c_large], [10 ** 6], depth=10)
    assert_same_ranking(capped, ref, atol=1e-5)


def test_adaptive_search_funnel_matches_python_reference_across_query_blocks():
    g = torch.Generator().manual_seed(1)
    # 2**25 // N = 64 queries per block: 150 queries make 3 blocks, the last partial
    num_docs = 2 ** 19
    dims, ks = [2, 4, 8], [40, 12]
    corpus = [torch.randn(num_docs, d, generator=g) for d in dims]
    queries = [torch.randn(150, d, generator=g) for d in dims]
    scores, indices = funnel.adaptive_search(queries, corpus, ks, depth=5)
    assert indices.shape == (150, 5)
    # both sides of each block
    sample = [0, 1, 2, 62, 63, 64, 65, 66, 127, 128, 129, 130, 147, 148, 149]
    expected = funnel_by_hand([q[sample] for q in queries], [c for c in corpus], ks, 5)
    decided = [i for i, (_, ok) in enumerate(expected) if ok]  # the others' cuts are rounding-close
    assert len(decided) >= 10
    assert [indices[sample[i]].tolist() for i in decided] == [expected[i][0] for i in decided]
    torch.testing.assert_close(scores, (corpus[2][indices] * queries[2].unsqueeze(1)).sum(-1))


@pytest.mark.parametrize("queries, corpus, ks, depth, message", [
    ([torch.zeros(2, 4)], [torch.zeros(5, 4), torch.zeros(5, 8)], [
        2], 3, "one query and one corpus"),
    ([torch.zeros(2, 4), torch.zeros(2, 8)], [torch.zeros(5, 4),
                                              torch.zeros(5, 8)], [], 3, "one k between"),
    ([torch.zeros(2, 4), torch.zeros(2, 8)], [torch.zeros(5, 4),
                                              torch.zeros(5, 6)], [2], 3, "not \\(Q, d\\)"),
    ([torch.zeros(2, 4), torch.zeros(3, 8)], [torch.zeros(5, 4),
                                              torch.zeros(5, 8)], [2], 3, "same 2 queries"),
    ([torch.zeros(2, 4), torch.zeros(2, 8), torch.zeros(2, 8)],
     [torch.zeros(5, 4), torch.zeros(5, 8), torch.zeros(5, 8)], [2, 3], 3, "non-increasing"),
    ([torch.zeros(2, 4), torch.zeros(2, 8)], [torch.zeros(5, 4),
                                              torch.zeros(5, 8)], [0], 3, "positive"),
    ([torch.zeros(2, 4)], [torch.zeros(5, 4)], [], 0, "depth 0"),
    ([torch.zeros(0, 4)], [torch.zeros(5, 4)], [], 3, "at least one query"), ])
def test_adaptive_search_bad_input(queries, corpus, ks, depth, message):
    with pytest.raises(ValueError, match=message):
        funnel.adaptive_search(queries, corpus, ks, depth)


# ----------------------------------------------------------------------------------------------
# FLOPs per query

def test_encoder_flops_by_hand(tiny):
    model, _ = tiny
    H, I, T = 32, 64, 10
    per_layer = 4 * H * H + 2 * H * I  # Q, K, V, O and the two MLP matrices (multiply-adds)
    for n in (1, 4):
        assert flops.encoder_flops(model, n, T) == 2 * T * n * per_layer + 4 * n * T * T * H
    with pytest.raises(ValueError):
        flops.encoder_flops(model, 5, T)


def test_search_flops_by_hand():
    assert funnel.search_flops(1000, [384], []) == 2 * 1000 * 384
    assert funnel.search_flops(1000, [24, 384], [50]) == 2 * 1000 * 24 + 2 * 50 * 384
    # k capped at N
    assert funnel.search_flops(10, [12, 24, 384],
                               [200, 5]) == 2 * 10 * 12 + 2 * 10 * 24 + 2 * 5 * 384
    with pytest.raises(ValueError):
        funnel.search_flops(1000, [24, 384], [])


# ----------------------------------------------------------------------------------------------
# deploy/export.py

def test_export_loads_with_automodel_and_equals_embed_2d(tiny, tiny_folder, tmp_path):
    model, tokenizer = tiny
    out = str(tmp_path / "2x16")
    result = export.main([
        "--model_name_or_path", tiny_folder, "--pair", "2x16", "--output_dir", out, "--pooling",
        "cls", "--similarity", "dot"])
    assert result["error"] == 0 and result["size"] < result["source_size"]
    exported = AutoModel.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == 2 and len(sb.transformer_layers(exported)) == 2
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = exported(**enc).last_hidden_state[:, 0, :16]  # CLS, first d
    expected = sb.embed_2d(model, enc["input_ids"], enc["attention_mask"], [(2, 16)],
                           "cls")[(2, 16)]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    saved = json.load(open(os.path.join(out, "starbucks_config.json")))
    assert saved["pairs"] == [[2, 16]
                              ] and saved["pooling"] == "cls" and saved["similarity"] == "dot"
    config, _ = models.read_config(out, exported)
    assert config.pairs == [(2, 16)]  # evaluate.py evaluates the export at its one pair
    st = json.load(open(os.path.join(out, "config_sentence_transformers.json")))
    pooling = json.load(open(os.path.join(out, "1_Pooling", "config.json")))
    assert st["truncate_dim"] == 16 and st["similarity_fn_name"] == "dot" and pooling[
        "pooling_mode_cls_token"]


def test_export_size_shrinks_with_n(tiny_folder, tmp_path):
    sizes = [export.main(["--model_name_or_path", tiny_folder, "--pair", f"{n}x8",
                          "--output_dir", str(tmp_path / str(n))])["size"] for n in (1, 3)]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("pair", ["5x8", "2x64", "2"])
def test_export_bad_pair(tiny_folder, tmp_path, pair):
    with pytest.raises(ValueError):
        export.main([
            "--model_name_or_path", tiny_folder, "--pair", pair, "--output_dir",
            str(tmp_path)])


def test_export_and_adaptive_refuse_separately_trained_checkpoints(tiny_folder, tmp_path):
    folder = tmp_path / "separate"
    shutil.copytree(tiny_folder, folder)
    (folder / "starbucks_config.json").write_text(
        json.dumps({"pairs": [[1, 8], [4, 32]], "separate": {"1": "layer_1"}}))
    with pytest.raises(ValueError, match="separately trained"):
        export.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="separately trained"):
        funnel.adaptive_retrieval(str(folder), {}, evaluate_args("1x8:5:4x32"), torch.device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers is not installed")
def test_export_loads_with_sentence_transformers(tiny, tiny_folder, tmp_path):
    from sentence_transformers import SentenceTransformer
    model, tokenizer = tiny
    out = str(tmp_path / "3x8")
    export.main([
        "--model_name_or_path", tiny_folder, "--pair", "3x8", "--output_dir", out, "--pooling",
        "mean"])
    got = SentenceTransformer(out, device="cpu").encode(TEXTS, convert_to_tensor=True)
    expected = models.encode(model, tokenizer, TEXTS, (3, 8), "mean", max_length=256)
    assert got.shape == (4, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# evaluate.py --adaptive

def tiny_retrieval_set():
    docs = data.lee_documents()[:12]
    corpus = {f"d{i}": t for i, t in enumerate(docs)}
    # each document's first sentence
    queries = {f"q{i}": t.split(".")[0] for i, t in enumerate(docs[:6])}
    return corpus, queries, {f"q{i}": {f"d{i}": 1} for i in range(6)}


def evaluate_args(adaptive):
    return metrics.EvalSettings(pairs="1x8,4x32", pooling="cls", similarity="dot",
                                adaptive=adaptive)


def test_evaluate_adaptive_with_k_equal_to_corpus_matches_exhaustive(tiny_folder):
    datasets = {"tiny": ("retrieval", tiny_retrieval_set())}
    args = evaluate_args("1x8:12:4x32")
    rows = funnel.adaptive_retrieval(tiny_folder, datasets, args, torch.device("cpu"))["tiny"]
    assert list(rows) == ["exhaustive 1x8", "exhaustive 4x32", "adaptive 1x8:12:4x32"]
    for metric in ("nDCG@10", "MRR@10"):
        assert rows["adaptive 1x8:12:4x32"][metric] == rows["exhaustive 4x32"][metric]
    # the exhaustive rows agree with evaluate.py's main table
    _, table = metrics.evaluate_model(tiny_folder, datasets, args, torch.device("cpu"))
    for pair in ("1x8", "4x32"):
        for metric in ("nDCG@10", "MRR@10"):
            assert rows[f"exhaustive {pair}"][metric] == pytest.approx(table["tiny"][pair][metric])
    assert rows["adaptive 1x8:12:4x32"]["search MFLOPs/q"] == pytest.approx(
        funnel.search_flops(12, [8, 32], [12]) / 1e6)
    assert rows["exhaustive 1x8"]["encode GFLOPs/q"] < rows["exhaustive 4x32"]["encode GFLOPs/q"]


def test_evaluate_adaptive_rejects_pairs_outside_the_model(tiny_folder):
    with pytest.raises(ValueError, match="outside"):
        funnel.adaptive_retrieval(tiny_folder, {"tiny": ("retrieval", tiny_retrieval_set())},
                                  evaluate_args("1x8:5:6x32"), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# The packaged MiniLM (slow: real weights)

def test_export_of_packaged_minilm_equals_embed_2d(tmp_path):
    out = str(tmp_path / "2x24")
    # check inside: max error on 8 Lee documents
    result = export.main(["--pair", "2x24", "--output_dir", out])
    assert result["error"] < 1e-5
    # 2 of 6 layers; word embeddings kept whole
    assert 0.5 < result["size"] / result["source_size"] < 0.75
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer
        model, tokenizer = \
            AutoModel.from_pretrained(models.resolve_model_path(data.DEFAULT_MODEL)).eval(), \
            AutoTokenizer.from_pretrained(out)
        got = SentenceTransformer(out, device="cpu").encode(TEXTS, convert_to_tensor=True,
                                                            normalize_embeddings=True)
        expected = models.encode(model, tokenizer, TEXTS, (2, 24), "mean", max_length=256,
                                 normalize=True)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_print_adaptive_lists_each_search_with_its_values(capsys):
    dataset = tiny_retrieval_set()
    row = {
        "nDCG@10": 0.5, "MRR@10": 0.25, "encode GFLOPs/q": 1.0, "search MFLOPs/q": 2.0,
        "encode ms/q": 3.0, "search ms/q": 4.0}
    text = funnel.print_adaptive(
        {"m": {"tiny": {"exhaustive 4x32": row, "adaptive 1x8:5:4x32": row}}},
        {"tiny": ("retrieval", dataset)})
    lines = text.strip().splitlines()
    assert "12 documents, 6 queries" in lines[0] and lines[1].split()[:3] == [
        "search", "nDCG@10", "MRR@10"]
    assert lines[3].split() == [
        "adaptive", "1x8:5:4x32", "0.5000", "0.2500", "1.0000", "2.0000", "3.0000", "4.0000"]
    assert capsys.readouterr().out.strip() == text.strip()


def test_adaptive_search_ranks_alike_with_another_thread_count():
    """Another thread count runs other matmul kernels: the same lists up to rounding (issue 24)."""
    g = torch.Generator().manual_seed(7)
    corpus = [torch.randn(20000, d, generator=g) for d in (8, 64)]
    queries = [torch.randn(40, d, generator=g) for d in (8, 64)]
    threads = torch.get_num_threads()
    first = funnel.adaptive_search(queries, corpus, [300], depth=20)
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        second = funnel.adaptive_search(queries, corpus, [300], depth=20)
    finally:
        torch.set_num_threads(threads)
    assert_same_ranking(first, second, atol=1e-4)
