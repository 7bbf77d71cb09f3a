"""Searching with the sizes (README Eq. 14): exhaustive search at one pair, the 2D adaptive funnel
(shortlist with a small pair, rerank with larger ones), and the search FLOPs of each.

Kusupati et al., "Matryoshka Representation Learning" (adaptive retrieval); in 2D the query's small
embedding comes from an early layer, so the shortlist is ready before the forward pass finishes.
"""
import torch

from starbucks import parse_pairs


def parse_funnel(text):
    """'2x24:50:6x384' -> ([(2, 24), (6, 384)], [50]): pairs small to large with a shortlist size between."""
    parts = text.split(":")
    if len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError(f"cannot read funnel {text!r}: write SMALL:K:LARGE (e.g. 2x24:50:6x384), "
                         f"or a longer funnel such as 1x12:200:2x24:50:6x384")
    pairs = [parse_pairs(p) for p in parts[::2]]
    if any(len(p) != 1 for p in pairs):
        raise ValueError(f"funnel {text!r}: each stage is one LAYERxDIM pair")
    ks = parts[1::2]
    if not all(k.isdigit() and int(k) > 0 for k in ks):
        raise ValueError(f"funnel {text!r}: shortlist sizes must be positive integers, got {ks}")
    return [p[0] for p in pairs], [int(k) for k in ks]


@torch.no_grad()
def adaptive_search(queries, corpus, ks, depth=10):
    """Eq. 14: shortlist k_1 documents with the first (small) pair, then rerank with each larger pair.

    queries[j] (Q, d_j) and corpus[j] (N, d_j) are stage j's embeddings, scored by dot product
    (normalise them beforehand for cosine). ks: one shortlist size per stage but the last, capped at
    N. One stage and no ks is exhaustive search. Returns (scores, indices), each (Q, min(depth, k)),
    best first by the last stage's scores.
    """
    if not corpus or len(queries) != len(corpus) or len(ks) != len(corpus) - 1:
        raise ValueError(f"adaptive search needs one query and one corpus matrix per stage and one k between "
                         f"stages: got {len(queries)} query, {len(corpus)} corpus matrices and {len(ks)} ks")
    num_queries, num_docs = queries[0].shape[0], corpus[0].shape[0]
    if num_queries == 0 or num_docs == 0:
        raise ValueError(f"adaptive search needs at least one query and one document, got {num_queries} and {num_docs}")
    for j, (q, c) in enumerate(zip(queries, corpus)):
        if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
            raise ValueError(f"stage {j}: queries {tuple(q.shape)} and corpus {tuple(c.shape)} are not (Q, d) and (N, d)")
        if q.shape[0] != num_queries or c.shape[0] != num_docs:
            raise ValueError(f"stage {j}: every stage must embed the same {num_queries} queries and {num_docs} documents")
    if any(k < 1 for k in ks) or list(ks) != sorted(ks, reverse=True) or depth < 1:
        raise ValueError(f"shortlist sizes {list(ks)} must be positive and non-increasing, depth {depth} positive")
    keep = [min(k, num_docs) for k in ks] + [min([depth, num_docs] + list(ks))]  # documents kept after each stage
    rows = min(num_queries, max(1, 2 ** 25 // num_docs))  # queries per block: (rows, N) scores of ~128 MB
    # one score buffer for every block: allocating 128 MB afresh each time costs as much as the small matmul
    buffer = queries[0].new_empty((rows, num_docs))
    all_scores, all_indices = [], []
    for start in range(0, num_queries, rows):
        q = queries[0][start:start + rows]
        top = torch.mm(q, corpus[0].T, out=buffer[:len(q)]).topk(keep[0], dim=1)  # (rows, k_1) of (rows, N)
        scores, indices = top.values, top.indices
        for j in range(1, len(corpus)):
            candidates = corpus[j][indices]  # (rows, k_j, d_j): only the shortlist is read at the larger size
            scores = torch.bmm(candidates, queries[j][start:start + rows].unsqueeze(2)).squeeze(2)  # (rows, k_j)
            top = scores.topk(keep[j], dim=1)
            scores, indices = top.values, indices.gather(1, top.indices)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def search_flops(num_docs, dims, ks):
    """Eq. 14 search FLOPs of one query: 2 N d_1 + sum_j 2 k_j d_(j+1) (dot products; top-k left out)."""
    if len(ks) != len(dims) - 1:
        raise ValueError(f"{len(dims)} stages need {len(dims) - 1} shortlist sizes, got {len(ks)}")
    return 2 * num_docs * dims[0] + sum(2 * min(k, num_docs) * d for k, d in zip(ks, dims[1:]))
