"""Evaluation at every layer-dim pair: the metrics with trec_eval's definitions, Spearman (STS);
nDCG@k, MRR@k, Recall@k (retrieval); TREC run files; and a model's metrics at every pair from one
forward pass per batch (Eq. 1), with the tables evaluate.py prints. The evaluation data: STS
files (scored pairs, as data.py reads them), BEIR folders (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv), MS MARCO TSV (collection.tsv, queries.tsv) with TREC qrels (qid 0 docid
grade), and the embedded Lee et al. (2005) STS and wiki-ict sets.

The metrics are pure functions of numbers, runs {qid: {docid:
score}} and qrels {qid: {docid: grade}}.

Each retrieval metric is computed once per query from the judged documents' ranks
(query_ndcg, query_mrr, query_recall); the run-dict functions and the fast path over a score
matrix (judged_ranks, retrieval_scores) both feed them, so the two cannot disagree.
"""
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import models


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
    """nDCG@k: gain = grade, discount log2(rank + 1), ideal DCG from
    all judged documents of the query."""
    ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    dcg = sum(g / math.log2(r + 1) for g, r in sorted(graded, key=lambda gr: gr[1])
              if g > 0 and r <= k)
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
    """The mean over evaluated queries; none is an error, not a score of 0 (trec_eval prints no
    figure then)."""
    if not values:
        raise ValueError("no query has both judgments and a ranked list: nothing to evaluate")
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# Runs as dicts (readable; any run file)

def ranked_docids(doc_scores):
    """trec_eval's order: score descending, ties broken by docid in descending string order."""
    return [
        docid
        for docid, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    ]


def run_graded(doc_scores, judgments):
    """[(grade, rank)] of the judged documents in one query's run, ranked in trec_eval's order."""
    return [(judgments[d], rank) for rank, d in enumerate(ranked_docids(doc_scores), 1)
            if d in judgments]


def _evaluated_queries(run, qrels):
    """trec_eval's default: queries that have at least one judgment and appear in the run (a query
    with no qrels line never reaches trec_eval; one judged all 0 is evaluated and scores 0)."""
    return [q for q in run if qrels.get(q)]


def ndcg_at_k(run, qrels, k=10):
    return _mean([
        query_ndcg(run_graded(run[q], qrels[q]), qrels[q], k)
        for q in _evaluated_queries(run, qrels)
    ])


def mrr_at_k(run, qrels, k=10):
    return _mean([
        query_mrr(run_graded(run[q], qrels[q]), k) for q in _evaluated_queries(run, qrels)
    ])


def recall_at_k(run, qrels, k):
    return _mean([
        query_recall(run_graded(run[q], qrels[q]), qrels[q], k)
        for q in _evaluated_queries(run, qrels)
    ])


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
        ahead = (scores[row][None] > s) | ((scores[row][None] == s) &
                                           (order[None] > order[cols][:, None]))
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
    return {
        qid: {
            docids[j]: s
            for j, s in zip(top[row].tolist(), ordered.values[row, :depth].tolist())
        }
        for row, qid in enumerate(qids)
    }


def write_trec_run(run, path, name):
    """A TREC run file: run is {qid: {docid: score}} or an iterable of (qid, [(docid, score)] best
    first), so that the run of millions of hits is written as it streams."""
    ranked = ((qid, [(d, docs[d]) for d in ranked_docids(docs)]) for qid, docs in run.items()) \
        if isinstance(run, dict) else run
    with open(path, "w") as f:
        for qid, hits in ranked:
            for rank, (docid, score) in enumerate(hits, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.9g} {name}\n")


# ----------------------------------------------------------------------------------------------
# Evaluation data: STS files, BEIR folders and MS MARCO (their corpora streamed one line at a time
# into the index), and the embedded sets

def read_sts_file(path, skip_bad_lines=False):
    """STS evaluation file (scored pairs) -> (texts_a, texts_b, scores)."""
    kind, records, _ = data.read_training_file(path, skip_bad_lines)
    if kind != "scored":
        raise data.DataError(
            f"{path}: an STS file needs scored pairs (sentence1, sentence2, score)")
    a, b, scores = zip(*records)
    return list(a), list(b), list(scores)


def read_qrels(path):
    """TREC qrels (qid 0 docid grade) or BEIR qrels TSV (query-id corpus-id
    score, header) -> {qid: {docid: grade}}."""
    qrels = {}
    lines = data.Lines(path)
    for line_no, row in lines.rows():
        cells = row[0].split() if len(row) == 1 else [c.strip() for c in row]
        if line_no == 1 and cells and cells[0].lower() in ("query-id", "qid", "query_id"):
            continue
        if len(cells) == 4:
            qid, _, docid, grade = cells
        elif len(cells) == 3:
            qid, docid, grade = cells
        else:
            lines.bad(
                line_no,
                f"{len(cells)} columns: expected TREC 'qid 0 docid grade' or BEIR 'qid docid grade'"
            )
            continue
        if data.finite_float(grade) is None and line_no == 1:
            raise data.DataError(
                f"{path}:1: header {cells} not known: BEIR qrels start with 'query-id corpus-id "
                f"score'; TREC qrels have no header")
        if data.finite_float(grade) is None:
            lines.bad(line_no, f"grade {grade!r} is not a number")
            continue
        qrels.setdefault(qid, {})[docid] = int(float(grade))
    if not qrels:
        raise data.DataError(f"{path}: no judgments")
    return qrels


def beir_records(path):
    """(id, record) of each line of a BEIR corpus.jsonl or queries.jsonl; a line without '_id' or
    'text' is an error naming the file and line."""
    lines = data.Lines(path)
    for line_no, record in lines.jsonl():
        if "_id" not in record or not isinstance(record.get("text"), str):
            lines.bad(line_no, f"a BEIR record needs '_id' and 'text' fields, got {sorted(record)}")
            continue
        yield str(record["_id"]), record


def read_beir(folder, split="test"):
    """A BEIR folder -> (corpus {docid: text}, queries {qid: text},
    qrels) limited to judged queries."""
    corpus = {
        docid: data.passage_text(r)
        for docid, r in beir_records(os.path.join(folder, "corpus.jsonl"))
    }
    return (corpus, *read_beir_queries(folder, split))


def read_msmarco(collection, queries_path, qrels_path):
    """MS MARCO TSV (pid<TAB>text, qid<TAB>text) with TREC qrels -> (corpus, queries, qrels)."""
    return (dict(stream_msmarco_collection(collection)),
            *read_msmarco_queries(queries_path, qrels_path))


def stream_beir_corpus(folder):
    """(docid, text) of a BEIR folder's corpus.jsonl in file order, one line at a time, title and
    text joined as read_beir joins them."""
    for docid, record in beir_records(os.path.join(folder, "corpus.jsonl")):
        yield docid, data.passage_text(record)


def stream_msmarco_collection(path):
    """(pid, text) of an MS MARCO collection.tsv (pid<TAB>text) in file
    order, as read_msmarco reads each line."""
    for line_no, line in data.stream_lines(path):
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) < 2:
            raise data.DataError(f"{path}:{line_no}: expected id<TAB>text")
        yield cells[0].strip(), cells[1]


def read_beir_queries(folder, split="test"):
    """The queries and qrels of a BEIR folder, without its corpus ->
    (queries limited to judged ones, qrels)."""
    queries = {qid: r["text"] for qid, r in beir_records(os.path.join(folder, "queries.jsonl"))}
    path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.exists(path):
        qrels_folder = os.path.join(folder, "qrels")
        found = sorted(os.listdir(qrels_folder)) if os.path.isdir(qrels_folder) else []
        raise data.DataError(
            f"{path}: no such file; qrels there: {found or 'none'} (pick one with --beir_split)")
    qrels = read_qrels(path)
    return {q: queries[q] for q in qrels if q in queries}, qrels


def read_msmarco_queries(queries_path, qrels_path):
    """MS MARCO queries (qid<TAB>text) and TREC qrels, without the
    collection -> (judged queries, qrels)."""
    lines, queries = data.Lines(queries_path), {}
    for line_no, row in lines.rows():
        if len(row) < 2:
            lines.bad(line_no, "expected id<TAB>text")
            continue
        queries[row[0].strip()] = row[1]
    qrels = read_qrels(qrels_path)
    return {q: queries[q] for q in qrels if q in queries}, qrels


def lee_sts():
    """Lee et al. (2005) as an STS set: the 1225 document pairs (i < j) with their human score."""
    docs = data.lee_documents()
    rows = [
        list(map(float, line.split())) for line in open(data.gensim_data("similarities0-1.txt"))
        if line.strip()
    ]
    a, b, scores = [], [], []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            a.append(docs[i]), b.append(docs[j]), scores.append(rows[i][j])
    return a, b, scores


def embedded_retrieval_set(seed=0):
    """Inverse-cloze retrieval over the held-out Wikipedia articles -> (corpus, queries, qrels).
    Each query's one relevant passage (grade 1) is the passage it was cut from."""
    articles = data.wikipedia_articles()[data.HELD_OUT_ARTICLES:]
    items = data.inverse_cloze([t for _, t in articles], seed=seed + 1000,
                               max_passages_per_document=25)
    corpus, queries, qrels = {}, {}, {}
    for i, (_, query, passage) in enumerate(items):
        corpus[f"d{i}"] = passage
        queries[f"q{i}"] = query
        qrels[f"q{i}"] = {f"d{i}": 1}
    return corpus, queries, qrels


# ----------------------------------------------------------------------------------------------
# A model at every pair (evaluate.py; bench/ and the toolkit call these directly)

@dataclass
class EvalSettings:
    pairs: str = None  # LAYERxDIM list; None: the checkpoint's pairs
    grid: bool = False  # every layer x every dim of the pairs
    pooling: str = None  # None: the checkpoint's, else mean
    similarity: str = None  # None: the checkpoint's, else cos
    query_max_len: int = 32
    passage_max_len: int = 128
    max_seq_length: int = 256  # STS texts
    batch_size: int = 64
    depth: int = 1000  # ranked documents per query (run files, recall)
    runs_dir: str = None  # write one TREC run file per model, dataset and pair here
    adaptive: str = None  # SMALL:K:LARGE funnel (Eq. 14)
    # corpora read from files are encoded here once: <index_dir>/<model>-<tag>/<dataset>
    index_dir: str = "output/index"
    storage_dtype: str = "float16"  # the index's vectors on disk
    shard_size: int = 100_000  # passages per shard
    index: str = "exact"  # exact (streamed over the shards) or faiss-flat / faiss-ivf / faiss-hnsw


@dataclass
class CorpusFile:
    """A corpus read from its file one line at a time, never held as one
    dict: encoded into a sharded index."""
    path: str
    read: object  # () -> iterator of (docid, text)


# ----------------------------------------------------------------------------------------------
# Evaluating a model at every pair


def sts_scores(model, tokenizer, dataset, pairs, pooling, max_length=256, batch_size=64):
    """Spearman x 1 of cosine similarity at every pair: {pair: value}."""
    a, b, gold = dataset
    texts = sorted(set(a) | set(b))
    index = {t: i for i, t in enumerate(texts)}
    emb = models.encode_2d(model, tokenizer, texts, pairs, pooling, max_length, batch_size,
                           normalize=True)
    ia, ib = torch.tensor([index[t] for t in a]), torch.tensor([index[t] for t in b])
    return {pair: spearman((emb[pair][ia] * emb[pair][ib]).sum(-1).numpy(), gold) for pair in pairs}


def score_matrices(model, tokenizer, dataset, pairs, config, settings):
    """Query x corpus scores at every pair: {pair: (Q, N)}, from one encoding pass per batch.

    config: the model's pooling and similarity; settings: EvalSettings (lengths, batch size)."""
    corpus, queries, _ = dataset
    normalize, pooling = config.similarity == "cos", config.pooling
    d_emb = models.encode_2d(model, tokenizer, list(corpus.values()), pairs, pooling,
                             settings.passage_max_len, settings.batch_size, normalize,
                             progress=lambda it: tqdm(it, desc="corpus", leave=False))
    q_emb = models.encode_2d(model, tokenizer, list(queries.values()), pairs, pooling,
                             settings.query_max_len, settings.batch_size, normalize)
    return {pair: q_emb[pair] @ d_emb[pair].T for pair in pairs}  # (Q, N) each


def load_datasets(sts_files=(), beir_dirs=(), beir_split="test", msmarco=None):
    """{name: ('sts', (a, b, gold)) or ('retrieval', (corpus, queries,
    qrels))}; embedded default if none given.

    msmarco: (collection, queries, qrels) paths."""
    sets = {}
    for path in sts_files or []:
        sets[os.path.basename(path)] = ("sts", read_sts_file(path))
    # the corpus is streamed into an index; queries and qrels are small
    for folder in beir_dirs or []:
        corpus = CorpusFile(os.path.join(folder, "corpus.jsonl"),
                            lambda folder=folder: stream_beir_corpus(folder))
        sets[os.path.basename(folder.rstrip("/"))] = ("retrieval",
                                                      (corpus,
                                                       *read_beir_queries(folder, beir_split)))
    if msmarco:
        corpus = CorpusFile(msmarco[0], lambda: stream_msmarco_collection(msmarco[0]))
        sets["msmarco"] = ("retrieval", (corpus,
                                         *read_msmarco_queries(msmarco[1], msmarco[2])))
    if not sets:
        sets["lee2005"] = ("sts", lee_sts())
        sets["wiki-ict"] = ("retrieval", embedded_retrieval_set())
    return sets


def judgment_coverage(name, dataset, warn_share=0.1):
    """How many of a retrieval set's queries can be evaluated -> {'queries',
    'evaluated', 'judgments', 'unknown_query_judgments',
    'unknown_document_judgments'}; before any model is loaded.

    A query is evaluated when it has a judgment and a text (trec_eval's rule); a judgment
    naming an unknown query or document is counted, and over warn_share of them is a warning
    naming a few. No evaluable query, or no judged document in the corpus, is an error: the
    table would be all zeros. A corpus file is read once here, so that a malformed line
    stops the run before any model loads."""
    corpus, queries, qrels = dataset
    judgments = [(q, d) for q, judged in qrels.items() for d in judged]
    unknown_queries = [(q, d) for q, d in judgments if q not in queries]
    # one pass over the file: every line checked, only judged ids kept
    if not isinstance(corpus, dict):
        judged_docs, size = {d for _, d in judgments}, 0
        found = set()
        for docid, _ in corpus.read():
            size += 1
            if docid in judged_docs:
                found.add(docid)
        corpus = dict.fromkeys(found) if size else {}
    unknown_docs = [(q, d) for q, d in judgments if q in queries and d not in corpus]
    evaluated = sum(1 for q in queries if qrels.get(q))
    if evaluated == 0:
        raise data.DataError(
            f"{name}: no query can be evaluated: none of the {len(qrels)} judged query ids is "
            "among "
            f"the {len(queries)} queries (e.g. qrels {sorted(qrels)[:3]}, queries "
            f"{sorted(queries)[:3]})"
        )
    if len(unknown_docs) == len(judgments) - len(unknown_queries):
        raise data.DataError(
            f"{name}: no judged document is in the corpus "
            f"(e.g. {[d for _, d in unknown_docs[:3]]}); check the qrels and corpus ids")
    for kind, unknown in (("queries", unknown_queries), ("documents", unknown_docs)):
        if len(unknown) > warn_share * len(judgments):
            print(
                f"warning: {name}: {len(unknown)} of {len(judgments)} judgments name unknown "
                f"{kind}, e.g. "
                f"{sorted({q if kind == 'queries' else d for q, d in unknown})[:3]}",
                file=sys.stderr)
    return {
        "queries": len(queries), "evaluated": evaluated, "judgments": len(judgments),
        "unknown_query_judgments": len(unknown_queries),
        "unknown_document_judgments": len(unknown_docs)
    }


def load_for_evaluation(name_or_path, settings, device):
    """-> (path, model folder, model in eval mode, tokenizer, StarbucksConfig with the settings'
    overrides, 'separate' map); see models.checkpoint_folders."""
    path, folder = models.checkpoint_folders(name_or_path)
    model, tokenizer = models.load_model(folder, device)
    model.eval()
    config, separate = models.read_config(path, model, settings.pairs, settings.grid,
                                          settings.pooling, settings.similarity)
    return path, folder, model, tokenizer, config, separate


def evaluate_model(name_or_path, datasets, settings, device, column=None):
    """-> (config, {dataset: {'n x d': {metric: value}}}) for every pair
    of one model (or one per layer: Eq. 7).

    column: the model's name in the tables, which also names its run
    files (default: its folder name)."""
    column = column or os.path.basename(name_or_path.rstrip("/"))
    path, folder, model, tokenizer, config, separate = load_for_evaluation(
        name_or_path, settings, device)
    # separately trained models (Eq. 7): each layer's pairs come from that layer's own model
    groups = {path: config.pairs} if not separate else {
        os.path.join(path, sub): [p for p in config.pairs if p[0] == int(n)]
        for n, sub in separate.items()
    }
    results = {}
    for model_path, pairs in groups.items():
        if not pairs:
            continue
        if model_path not in (path, folder):
            model, tokenizer = models.load_model(model_path, device)
            model.eval()
        for name, (kind, dataset) in datasets.items():
            if kind == "sts":
                for pair, value in sts_scores(model, tokenizer, dataset, pairs, config.pooling,
                                              settings.max_seq_length, settings.batch_size).items():
                    results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = {"Spearman": value}
                continue
            corpus, queries, qrels = dataset
            qids = list(queries)
            # encoded once into a sharded index, searched shard by shard
            if isinstance(corpus, CorpusFile):
                from index import corpus_index as ci, retrieval
                folder = retrieval.index_folder(settings, model_path, name)
                hits, index, recall = retrieval.index_retrieval(model, tokenizer, folder, dataset,
                                                                pairs, config, settings)
                for (n, d), (scores, rows) in hits.items():
                    graded = retrieval.hits_graded(index, scores, rows, qids, qrels)
                    figures = retrieval_scores(graded, qrels, settings.depth)
                    if recall:
                        figures["recall@10 vs exact"] = recall[(n, d)]
                    results.setdefault(name, {})[f"{n}x{d}"] = figures
                    if settings.runs_dir:
                        os.makedirs(settings.runs_dir, exist_ok=True)
                        tag = f"{column}.{name}.{n}x{d}"
                        write_trec_run(ci.ranked_lists(index, scores, rows, qids),
                                       os.path.join(settings.runs_dir, f"{tag}.trec"), tag)
                continue
            docids = list(corpus)
            scores_at = score_matrices(model, tokenizer, dataset, pairs, config, settings)
            for pair, scores in scores_at.items():
                ranks = judged_ranks(scores, docids, qids, qrels)
                results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = retrieval_scores(
                    ranks, qrels, settings.depth)
                if settings.runs_dir:
                    os.makedirs(settings.runs_dir, exist_ok=True)
                    tag = f"{column}.{name}.{pair[0]}x{pair[1]}"
                    run = run_from_scores(scores, docids, qids, min(settings.depth, len(docids)))
                    write_trec_run(run, os.path.join(settings.runs_dir, f"{tag}.trec"), tag)
    return config, results


def print_tables(all_results, datasets, metric_names=("Spearman", "nDCG@10", "MRR@10")):
    """One table per dataset and metric: rows = pairs, columns =
    models; the mean over pairs last."""
    names = list(all_results)
    lines = []
    for dataset in datasets:
        for metric in metric_names:
            rows = {}
            for name in names:
                for pair, values in all_results[name].get(dataset, {}).items():
                    if metric in values:
                        rows.setdefault(pair, {})[name] = values[metric]
            if not rows:
                continue
            width = max(12, *(len(n) + 2 for n in names))
            lines.append(f"\n{dataset} {metric}")
            lines.append(f"{'pair':<10}" + "".join(f"{n:>{width}}" for n in names))
            keyed = sorted(rows, key=lambda p: tuple(map(int, p.split("x"))))
            for pair in keyed:
                lines.append(f"{pair:<10}" + "".join(
                    f"{rows[pair][n]:>{width}.4f}" if n in rows[pair] else f"{'-':>{width}}"
                    for n in names))
            means = [np.mean([rows[p][n] for p in keyed if n in rows[p]]) for n in names]
            lines.append(f"{'mean':<10}" + "".join(f"{m:>{width}.4f}" for m in means))
    text = "\n".join(lines)
    print(text)
    return text


def plot_heatmaps(all_results, output_dir):
    """One PNG per model, dataset and metric: layer x dim grid, colour
    = metric (matplotlib, optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    paths = []
    for model_name, datasets in all_results.items():
        for dataset, by_pair in datasets.items():
            pairs = [tuple(map(int, p.split("x"))) for p in by_pair]
            layers, dims = sorted({n for n, _ in pairs}), sorted({d for _, d in pairs})
            for metric in next(iter(by_pair.values())):
                grid = np.full((len(layers), len(dims)), np.nan)
                for (n, d), key in zip(pairs, by_pair):
                    grid[layers.index(n), dims.index(d)] = by_pair[key][metric]
                fig, ax = plt.subplots(figsize=(1 + 0.9 * len(dims), 1 + 0.6 * len(layers)))
                image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
                bright = np.nanmin(grid) + 0.6 * (np.nanmax(grid) - np.nanmin(grid))
                for i in range(len(layers)):
                    for j in range(len(dims)):
                        if not np.isnan(grid[i, j]):
                            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7,
                                    color="k" if grid[i, j] > bright else "w")
                ax.set_xticks(range(len(dims)), dims)
                ax.set_yticks(range(len(layers)), layers)
                ax.set_xlabel("dim d")
                ax.set_ylabel("layer n")
                ax.set_title(f"{model_name}: {dataset} {metric}", fontsize=9)
                fig.colorbar(image, ax=ax)
                fig.tight_layout()
                path = os.path.join(
                    output_dir, f"heatmap_{model_name}_{dataset}_{metric.replace('@', '')}.png")
                fig.savefig(path, dpi=110)
                plt.close(fig)
                paths.append(path)
    return paths
