"""Searching with the sizes (README Eq. 14): exhaustive search at one pair, the 2D adaptive funnel
(shortlist with a small pair, rerank with larger ones), and the search FLOPs of each; and
evaluate.py --adaptive: the funnel beside exhaustive search at each of its sizes, in memory or on
the sharded index (index/corpus_index.py).

Kusupati et al., "Matryoshka Representation Learning" (adaptive retrieval); in 2D the query's small
embedding comes from an early layer, so the shortlist is ready before the forward pass finishes.
"""
import time

import numpy as np
import torch
from tqdm import tqdm

from index import corpus_index as ci, retrieval
import metrics
import models
import starbucks as sb
from recipe import flops


def parse_funnel(text):
    """'2x24:50:6x384' -> ([(2, 24), (6, 384)], [50]): pairs small to large with a shortlist size
    between."""
    parts = text.split(":")
    if len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError(f"cannot read funnel {text!r}: write SMALL:K:LARGE (e.g. 2x24:50:6x384), "
                         f"or a longer funnel such as 1x12:200:2x24:50:6x384")
    pairs = [sb.parse_pairs(p) for p in parts[::2]]
    if any(len(p) != 1 for p in pairs):
        raise ValueError(f"funnel {text!r}: each stage is one LAYERxDIM pair")
    ks = parts[1::2]
    if not all(k.isdigit() and int(k) > 0 for k in ks):
        raise ValueError(f"funnel {text!r}: shortlist sizes must be positive integers, got {ks}")
    return [p[0] for p in pairs], [int(k) for k in ks]


@torch.no_grad()
def adaptive_search(queries, corpus, ks, depth=10):
    """Eq. 14: shortlist k_1 documents with the first (small) pair, then rerank with each larger
    pair.

    queries[j] (Q, d_j) and corpus[j] (N, d_j) are stage j's embeddings, scored by dot product
    (normalise them beforehand for cosine). ks: one shortlist size per stage but the last, capped at
    N. One stage and no ks is exhaustive search. Returns (scores, indices), each (Q, min(depth, k)),
    best first by the last stage's scores.
    """
    if not corpus or len(queries) != len(corpus) or len(ks) != len(corpus) - 1:
        raise ValueError("adaptive search needs one query and one corpus matrix per stage and one "
                         f"k between stages: got {len(queries)} query, {len(corpus)} corpus "
                         f"matrices and {len(ks)} ks")
    num_queries, num_docs = queries[0].shape[0], corpus[0].shape[0]
    if num_queries == 0 or num_docs == 0:
        raise ValueError("adaptive search needs at least one query and one document, got "
                         f"{num_queries} and {num_docs}")
    for j, (q, c) in enumerate(zip(queries, corpus)):
        if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
            raise ValueError(f"stage {j}: queries {tuple(q.shape)} and corpus {tuple(c.shape)} are "
                             "not (Q, d) and (N, d)")
        if q.shape[0] != num_queries or c.shape[0] != num_docs:
            raise ValueError(f"stage {j}: every stage must embed the same {num_queries} queries "
                             f"and {num_docs} documents")
    if any(k < 1 for k in ks) or list(ks) != sorted(ks, reverse=True) or depth < 1:
        raise ValueError(f"shortlist sizes {list(ks)} must be positive and non-increasing, depth "
                         f"{depth} positive")
    # documents kept after each stage
    keep = [min(k, num_docs) for k in ks] + [min([depth, num_docs] + list(ks))]
    # queries per block: (rows, N) scores of ~128 MB
    rows = min(num_queries, max(1, 2 ** 25 // num_docs))
    # one score buffer for every block: allocating 128 MB afresh each time costs as much as the
    # small matmul
    buffer = queries[0].new_empty((rows, num_docs))
    all_scores, all_indices = [], []
    for start in range(0, num_queries, rows):
        q = queries[0][start:start + rows]
        # (rows, k_1) of (rows, N)
        top = torch.mm(q, corpus[0].T, out=buffer[:len(q)]).topk(keep[0], dim=1)
        scores, indices = top.values, top.indices
        for j in range(1, len(corpus)):
            # (rows, k_j, d_j): only the shortlist is read at the larger size
            candidates = corpus[j][indices]
            # (rows, k_j)
            scores = torch.bmm(candidates, queries[j][start:start + rows].unsqueeze(2)).squeeze(2)
            top = scores.topk(keep[j], dim=1)
            scores, indices = top.values, indices.gather(1, top.indices)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def search_flops(num_docs, dims, ks):
    """Eq. 14 search FLOPs of one query: 2 N d_1 + sum_j 2 k_j d_(j+1) (dot products; top-k left
    out)."""
    if len(ks) != len(dims) - 1:
        raise ValueError(f"{len(dims)} stages need {len(dims) - 1} shortlist sizes, got {len(ks)}")
    return 2 * num_docs * dims[0] + sum(2 * min(k, num_docs) * d for k, d in zip(ks, dims[1:]))


# ----------------------------------------------------------------------------------------------
# 2D adaptive retrieval (Eq. 14) beside exhaustive search at each of its sizes: evaluate.py
# --adaptive

def adaptive_retrieval(name_or_path, datasets, settings, device):
    """{dataset: {search: nDCG@10, MRR@10, FLOPs and ms per query}} for --adaptive and each of its
    pairs alone.

    Times are per query over the whole query set: encoding (up to the search's largest layer) and
    search.
    """
    path, _, model, tokenizer, config, separate = metrics.load_for_evaluation(
        name_or_path, settings, device)
    if separate:
        raise ValueError(f"--adaptive needs one 2D model; {path} holds one separately trained "
                         "model per layer")
    pairs, ks = parse_funnel(settings.adaptive)
    pairs = sb.check_pairs(pairs, model.config.num_hidden_layers, model.config.hidden_size)
    searches = {f"exhaustive {n}x{d}": ([(n, d)], []) for n, d in pairs}
    searches[f"adaptive {settings.adaptive}"] = (pairs, ks)
    normalize = config.similarity == "cos"
    results = {}
    for name, (kind, (corpus, queries, qrels)) in datasets.items():
        if kind != "retrieval":
            continue
        texts = [queries[q] for q in queries]
        # the funnel on the sharded index: shortlist, then gather to rerank
        if isinstance(corpus, metrics.CorpusFile):
            folder = retrieval.index_folder(settings, path, name)
            index = retrieval.encoded_index(model, tokenizer, folder, corpus, config, settings)
            num_docs, rank = index.num_docs, lambda q, stage_pairs, stage_ks: ci.adaptive_search(
                index, stage_pairs, [q[p] for p in stage_pairs], stage_ks, depth=10)
            name_rows = lambda rows: ci.docids(index, rows)
        else:
            docids = list(corpus)
            d_emb = models.encode_2d(model, tokenizer, [corpus[d]
                                                        for d in docids], pairs, config.pooling,
                                     settings.passage_max_len, settings.batch_size, normalize,
                                     progress=lambda it: tqdm(it, desc="corpus", leave=False))
            num_docs, rank = len(docids), lambda q, stage_pairs, stage_ks: adaptive_search(
                [q[p] for p in stage_pairs], [d_emb[p] for p in stage_pairs], stage_ks, depth=10)
            name_rows = lambda rows, docids=docids: [[docids[j] for j in row]
                                                     for row in rows.tolist()]
        tokens = [
            len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.query_max_len)
            ["input_ids"]]
        models.encode_2d(model, tokenizer, texts[:settings.batch_size], pairs, config.pooling,
                         settings.query_max_len)  # warm-up, untimed
        for label, (stage_pairs, stage_ks) in searches.items():
            start = time.perf_counter()
            # stops at the largest stage's layer
            q_emb = models.encode_2d(model, tokenizer, texts, stage_pairs, config.pooling,
                                     settings.query_max_len, settings.batch_size, normalize)
            encoded = time.perf_counter()
            scores, indices = rank(q_emb, stage_pairs, stage_ks)
            searched = time.perf_counter()
            run = {
                qid: dict(zip(names, values))
                for qid, names, values in zip(queries, name_rows(indices), scores.tolist())}
            layers = max(n for n, _ in stage_pairs)
            results.setdefault(name, {})[label] = {
                "nDCG@10": metrics.ndcg_at_k(run, qrels, 10), "MRR@10": metrics.mrr_at_k(
                    run, qrels, 10), "encode GFLOPs/q": float(
                        np.mean([flops.encoder_flops(model, layers, t) for t in tokens])) / 1e9,
                "search MFLOPs/q": search_flops(num_docs, [d for _, d in stage_pairs], stage_ks) /
                1e6, "encode ms/q": (encoded - start) * 1000 / len(texts),
                "search ms/q": (searched - encoded) * 1000 / len(texts)}
    return results


def print_adaptive(adaptive, datasets):
    """One table per model and dataset: exhaustive search at each pair, then the adaptive funnel."""
    columns = ("nDCG@10", "MRR@10", "encode GFLOPs/q", "search MFLOPs/q", "encode ms/q",
               "search ms/q")
    lines = []
    for model_name, by_dataset in adaptive.items():
        for dataset, rows in by_dataset.items():
            corpus, queries, _ = datasets[dataset][1]
            documents = f"{len(corpus)} documents" if isinstance(
                corpus, dict) else f"the indexed {corpus.path}"
            lines.append(f"\n{dataset} adaptive retrieval (Eq. 14), model {model_name}: "
                         f"{documents}, {len(queries)} queries")
            width = max(len(label) for label in rows) + 2
            lines.append(f"{'search':<{width}}" + "".join(f"{c:>17}" for c in columns))
            for label, values in rows.items():
                lines.append(f"{label:<{width}}" + "".join(f"{values[c]:>17.4f}" for c in columns))
    text = "\n".join(lines)
    print(text)
    return text
