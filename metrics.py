"""Evaluation metrics with trec_eval's definitions: Spearman (STS); nDCG@k, MRR@k, Recall@k
(retrieval); TREC run files. Pure functions of numbers, runs {qid: {docid: score}} and qrels
{qid: {docid: grade}}.

Each retrieval metric is computed once per query from the judged documents' ranks
(query_ndcg, query_mrr, query_recall); the run-dict functions and the fast path over a score
matrix (judged_ranks, retrieval_scores) both feed them, so the two cannot disagree.
"""
import math

import numpy as np
import torch


def spearman(x, y):
    """Spearman's rank correlation, ties given their average rank (as scipy.stats.spearmanr)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("spearman needs two 1-D sequences of the same length >= 2")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom else float("nan")


def _average_ranks(v):
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # average of 1-based ranks i+1..j+1
        i = j + 1
    return ranks


# ----------------------------------------------------------------------------------------------
# One query: graded = [(grade, 1-based rank)] of its judged documents that were ranked

def query_ndcg(graded, judgments, k):
    """nDCG@k: gain = grade, discount log2(rank + 1), ideal DCG from all judged documents of the query."""
    ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    dcg = sum(g / math.log2(r + 1) for g, r in sorted(graded, key=lambda gr: gr[1]) if g > 0 and r <= k)
    return dcg / idcg if idcg > 0 else 0.0


def query_mrr(graded, k):
    """MRR@k: reciprocal rank of the first relevant (grade >= 1) document within k, else 0."""
    first = min((r for g, r in graded if g >= 1 and r <= k), default=None)
    return 1.0 / first if first else 0.0


def query_recall(graded, judgments, k):
    """Recall@k: relevant (grade >= 1) documents in the top k over all relevant; 0 when none is."""
    relevant = sum(1 for g in judgments.values() if g >= 1)
    return sum(1 for g, r in graded if g >= 1 and r <= k) / relevant if relevant else 0.0


def _mean(values):
    return float(np.mean(values)) if values else 0.0


# ----------------------------------------------------------------------------------------------
# Runs as dicts (readable; any run file)

def ranked_docids(doc_scores):
    """trec_eval's order: score descending, ties broken by docid in descending string order."""
    return [docid for docid, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def run_graded(doc_scores, judgments):
    """[(grade, rank)] of the judged documents in one query's run, ranked in trec_eval's order."""
    return [(judgments[d], rank) for rank, d in enumerate(ranked_docids(doc_scores), 1) if d in judgments]


def _evaluated_queries(run, qrels):
    """trec_eval's default: queries that have at least one judgment and appear in the run (a query with
    no qrels line never reaches trec_eval; one judged all 0 is evaluated and scores 0)."""
    return [q for q in run if qrels.get(q)]


def ndcg_at_k(run, qrels, k=10):
    return _mean([query_ndcg(run_graded(run[q], qrels[q]), qrels[q], k) for q in _evaluated_queries(run, qrels)])


def mrr_at_k(run, qrels, k=10):
    return _mean([query_mrr(run_graded(run[q], qrels[q]), k) for q in _evaluated_queries(run, qrels)])


def recall_at_k(run, qrels, k):
    return _mean([query_recall(run_graded(run[q], qrels[q]), qrels[q], k) for q in _evaluated_queries(run, qrels)])


# ----------------------------------------------------------------------------------------------
# A dense (Q, N) score matrix (fast: ranks of the judged documents only, no sort of the corpus)

def docid_order(docids):
    """Position of each docid in string order: trec_eval ranks a tie's larger docid first."""
    position = torch.empty(len(docids), dtype=torch.long)
    position[torch.tensor(sorted(range(len(docids)), key=docids.__getitem__), dtype=torch.long)] = \
        torch.arange(len(docids))
    return position  # (N,)


def judged_ranks(scores, docids, qids, qrels):
    """1-based trec_eval rank of every judged document of every query: {qid: [(grade, rank)]}."""
    column = {d: i for i, d in enumerate(docids)}
    order = docid_order(docids)
    ranks = {}
    for row, qid in enumerate(qids):
        if not qrels.get(qid):  # no judgment: trec_eval never evaluates it
            continue
        judged = [(column[d], g) for d, g in qrels[qid].items() if d in column]
        cols = torch.tensor([c for c, _ in judged], dtype=torch.long)
        s = scores[row, cols][:, None]  # (J, 1)
        ahead = (scores[row][None] > s) | ((scores[row][None] == s) & (order[None] > order[cols][:, None]))
        ranks[qid] = [(g, int(r) + 1) for (_, g), r in zip(judged, ahead.sum(1).tolist())]
    return ranks


def retrieval_scores(ranks, qrels, depth):
    """nDCG@10, MRR@10, R@100, R@1000 from judged ranks, of a run cut at `depth`."""
    cut = {q: [(g, r) for g, r in graded if r <= depth] for q, graded in ranks.items()}
    return {"nDCG@10": _mean([query_ndcg(g, qrels[q], 10) for q, g in cut.items()]),
            "MRR@10": _mean([query_mrr(g, 10) for g in cut.values()]),
            "R@100": _mean([query_recall(g, qrels[q], 100) for q, g in cut.items()]),
            "R@1000": _mean([query_recall(g, qrels[q], 1000) for q, g in cut.items()])}


def run_from_scores(scores, docids, qids, depth):
    """The top `depth` of every query in trec_eval's order -> run {qid: {docid: score}}."""
    by_docid = torch.argsort(docid_order(docids), descending=True)  # ties: larger docid first
    ordered = scores[:, by_docid].sort(dim=1, descending=True, stable=True)
    top = by_docid[ordered.indices[:, :depth]]  # (Q, depth)
    return {qid: {docids[j]: s for j, s in zip(top[row].tolist(), ordered.values[row, :depth].tolist())}
            for row, qid in enumerate(qids)}


def write_trec_run(run, path, name):
    """A TREC run file: run is {qid: {docid: score}} or an iterable of (qid, [(docid, score)] best first), so that
    the run of millions of hits is written as it streams."""
    ranked = ((qid, [(d, docs[d]) for d in ranked_docids(docs)]) for qid, docs in run.items()) \
        if isinstance(run, dict) else run
    with open(path, "w") as f:
        for qid, hits in ranked:
            for rank, (docid, score) in enumerate(hits, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.9g} {name}\n")


# ----------------------------------------------------------------------------------------------
# Classification (MRL's evaluation): accuracy, 1-nearest-neighbour accuracy, class-based mAP@k

def accuracy(predictions, labels):
    return float((torch.as_tensor(predictions) == torch.as_tensor(labels)).float().mean())


def _cosine_neighbours(train, test, k):
    """Indices of each test row's k most cosine-similar training rows, best first: (Q, k)."""
    scores = torch.nn.functional.normalize(test, dim=-1) @ torch.nn.functional.normalize(train, dim=-1).T  # (Q, N)
    return scores.topk(min(k, train.shape[0]), dim=1).indices


def nearest_neighbour_accuracy(train, train_labels, test, test_labels):
    """1-NN accuracy under cosine similarity (MRL's training-free evaluation of a size)."""
    return accuracy(train_labels[_cosine_neighbours(train, test, 1)[:, 0]], test_labels)


def map_at_k(train, train_labels, test, test_labels, k=10):
    """Class-based retrieval mAP@k: each test text ranks the training texts by cosine similarity; relevant =
    same class; AP@k = sum_i P@i rel_i / min(k, relevant in the training set), averaged over test texts.

    MRL's retrieval/compute_metrics.py divides by k and ranks by L2 distance. The divisors agree whenever every
    class has at least k training texts (the embedded sets: 50 per class, k = 10); with fewer, ours still
    reaches 1 for a perfect ranking and MRL's cannot. Cosine: sub-embeddings are compared as Eq. 2 does."""
    relevant = (train_labels[_cosine_neighbours(train, test, k)] == test_labels[:, None]).float()  # (Q, k)
    precision = relevant.cumsum(1) / torch.arange(1, relevant.shape[1] + 1)  # P@i
    available = (train_labels[None, :] == test_labels[:, None]).sum(1).clamp(max=relevant.shape[1])  # min(k, R)
    return float(((precision * relevant).sum(1) / available.clamp(min=1)).mean())
