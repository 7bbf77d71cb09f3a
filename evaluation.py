"""Evaluating a model at every layer-dim pair: STS Spearman and retrieval metrics from one forward
pass per batch (Eq. 1), tables and heat maps (2D adaptive retrieval, Eq. 14: deploy/funnel.py).

evaluate.py is the command line over these; bench/ and recipe/compute_optimal.py call them directly.
"""
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import corpus_index as ci
import data
import metrics
import models
import starbucks as sb


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
    index_dir: str = "output/index"  # corpora read from files are encoded here once: <index_dir>/<model>-<tag>/<dataset>
    storage_dtype: str = "float16"  # the index's vectors on disk
    shard_size: int = 100_000  # passages per shard
    index: str = "exact"  # exact (streamed over the shards) or faiss-flat / faiss-ivf / faiss-hnsw


@dataclass
class CorpusFile:
    """A corpus read from its file one line at a time, never held as one dict: encoded into a sharded index."""
    path: str
    read: object  # () -> iterator of (docid, text)


# ----------------------------------------------------------------------------------------------
# Evaluating a model at every pair


def sts_scores(model, tokenizer, dataset, pairs, pooling, max_length=256, batch_size=64):
    """Spearman x 1 of cosine similarity at every pair: {pair: value}."""
    a, b, gold = dataset
    texts = sorted(set(a) | set(b))
    index = {t: i for i, t in enumerate(texts)}
    emb = sb.encode_2d(model, tokenizer, texts, pairs, pooling, max_length, batch_size, normalize=True)
    ia, ib = torch.tensor([index[t] for t in a]), torch.tensor([index[t] for t in b])
    return {pair: metrics.spearman((emb[pair][ia] * emb[pair][ib]).sum(-1).numpy(), gold) for pair in pairs}


def score_matrices(model, tokenizer, dataset, pairs, pooling, similarity, query_max_len=32, passage_max_len=128,
                   batch_size=64):
    """Query x corpus scores at every pair: {pair: (Q, N)}, from one encoding pass per batch."""
    corpus, queries, _ = dataset
    normalize = similarity == "cos"
    d_emb = sb.encode_2d(model, tokenizer, list(corpus.values()), pairs, pooling, passage_max_len, batch_size,
                         normalize, progress=lambda it: tqdm(it, desc="corpus", leave=False))
    q_emb = sb.encode_2d(model, tokenizer, list(queries.values()), pairs, pooling, query_max_len, batch_size,
                         normalize)
    return {pair: q_emb[pair] @ d_emb[pair].T for pair in pairs}  # (Q, N) each


def load_datasets(sts_files=(), beir_dirs=(), beir_split="test", msmarco=None):
    """{name: ('sts', (a, b, gold)) or ('retrieval', (corpus, queries, qrels))}; embedded default if none given.

    msmarco: (collection, queries, qrels) paths."""
    sets = {}
    for path in sts_files or []:
        sets[os.path.basename(path)] = ("sts", data.read_sts_file(path))
    for folder in beir_dirs or []:  # the corpus is streamed into an index; queries and qrels are small
        corpus = CorpusFile(os.path.join(folder, "corpus.jsonl"), lambda folder=folder: data.stream_beir_corpus(folder))
        sets[os.path.basename(folder.rstrip("/"))] = ("retrieval", (corpus, *data.read_beir_queries(folder, beir_split)))
    if msmarco:
        corpus = CorpusFile(msmarco[0], lambda: data.stream_msmarco_collection(msmarco[0]))
        sets["msmarco"] = ("retrieval", (corpus, *data.read_msmarco_queries(msmarco[1], msmarco[2])))
    if not sets:
        sets["lee2005"] = ("sts", data.lee_sts())
        sets["wiki-ict"] = ("retrieval", data.embedded_retrieval_set())
    return sets


def judgment_coverage(name, dataset, warn_share=0.1):
    """How many of a retrieval set's queries can be evaluated -> {'queries', 'evaluated', 'judgments',
    'unknown_query_judgments', 'unknown_document_judgments'}; before any model is loaded.

    A query is evaluated when it has a judgment and a text (trec_eval's rule); a judgment naming an
    unknown query or document is counted, and over warn_share of them is a warning naming a few. No
    evaluable query, or no judged document in the corpus, is an error: the table would be all zeros.
    A corpus file is read once here, so that a malformed line stops the run before any model loads."""
    corpus, queries, qrels = dataset
    judgments = [(q, d) for q, judged in qrels.items() for d in judged]
    unknown_queries = [(q, d) for q, d in judgments if q not in queries]
    if not isinstance(corpus, dict):  # one pass over the file: every line checked, only judged ids kept
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
        raise data.DataError(f"{name}: no query can be evaluated: none of the {len(qrels)} judged query ids is among "
                             f"the {len(queries)} queries (e.g. qrels {sorted(qrels)[:3]}, queries {sorted(queries)[:3]})")
    if len(unknown_docs) == len(judgments) - len(unknown_queries):
        raise data.DataError(f"{name}: no judged document is in the corpus "
                             f"(e.g. {[d for _, d in unknown_docs[:3]]}); check the qrels and corpus ids")
    for kind, unknown in (("queries", unknown_queries), ("documents", unknown_docs)):
        if len(unknown) > warn_share * len(judgments):
            print(f"warning: {name}: {len(unknown)} of {len(judgments)} judgments name unknown {kind}, e.g. "
                  f"{sorted({q if kind == 'queries' else d for q, d in unknown})[:3]}", file=sys.stderr)
    return {"queries": len(queries), "evaluated": evaluated, "judgments": len(judgments),
            "unknown_query_judgments": len(unknown_queries), "unknown_document_judgments": len(unknown_docs)}


def hits_graded(index, scores, rows, qids, qrels):
    """{qid: [(grade, rank)]} of the judged documents among each judged query's hits (rows best first; -1: none)."""
    graded = {}
    for qid, ranked in ci.ranked_lists(index, scores, rows, qids):
        judgments = qrels.get(qid)
        if judgments:
            graded[qid] = [(judgments[d], rank) for rank, (d, _) in enumerate(ranked, 1) if d in judgments]
    return graded


def index_folder(settings, model_path, name):
    """Where a model's index of a dataset lives: <index_dir>/<model folder name>-<tag>/<dataset>; the tag hashes
    the model's weights by content (checkpoints.file_fingerprint), so that another or a retrained model never
    reuses this one's vectors and a moved copy does (the index itself refuses other pairs, pooling, lengths or
    corpus text)."""
    weights = checkpoints.file_fingerprint(model_path) or os.path.abspath(model_path)  # no weight file: by place
    tag = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(settings.index_dir, f"{os.path.basename(os.path.normpath(model_path))}-{tag}", name)


def encoded_index(model, tokenizer, model_path, name, corpus, config, settings):
    """The corpus's sharded index for this model (encoded once, resumably; under torchrun each rank encodes its
    slice of the shards): every evaluated pair and every --adaptive pair, so that both use one folder."""
    pairs = set(config.pairs)
    if settings.adaptive:
        from deploy import funnel
        pairs |= set(funnel.parse_funnel(settings.adaptive)[0])
    pairs = sorted(pairs)
    folder = index_folder(settings, model_path, name)
    ci.encode_corpus(model, tokenizer, corpus.read(), pairs, folder, config.pooling, settings.passage_max_len,
                     settings.batch_size, config.similarity == "cos", settings.shard_size, settings.storage_dtype,
                     progress=lambda it: tqdm(it, desc=f"{name} shard", leave=False))
    return ci.open_index(folder)


def index_retrieval(model, tokenizer, model_path, name, dataset, pairs, config, settings):
    """{pair: (scores, rows)} of every query at every pair over the corpus's sharded index, exact or FAISS;
    the index; and, for FAISS, {pair: recall@10 against exact search}."""
    corpus, queries, qrels = dataset
    normalize = config.similarity == "cos"
    index = encoded_index(model, tokenizer, model_path, name, corpus, config, settings)
    q_emb = sb.encode_2d(model, tokenizer, list(queries.values()), pairs, config.pooling, settings.query_max_len,
                         settings.batch_size, normalize)
    depth = min(settings.depth, index.num_docs)
    hits, recall = {}, {}
    for pair in pairs:
        queries_at = q_emb[pair].to(next(model.parameters()).device)
        hits[pair] = ci.search(index, pair, queries_at, depth, progress=functools.partial(
            tqdm, desc=f"{name} {pair[0]}x{pair[1]} search", unit="chunk", leave=False))
        if settings.index != "exact":
            built = ci.faiss_index(index, pair, settings.index.split("-", 1)[1])
            approximate = ci.faiss_search(built, q_emb[pair], depth)
            recall[pair] = ci.overlap_at_k(approximate[1], hits[pair][1].cpu(), min(10, depth))
            hits[pair] = approximate
    return hits, index, recall


def load_for_evaluation(name_or_path, settings, device):
    """-> (path, model folder, model in eval mode, tokenizer, StarbucksConfig with the settings' overrides,
    'separate' map); see models.checkpoint_folders."""
    path, folder = models.checkpoint_folders(name_or_path)
    model, tokenizer = models.load_model(folder, device)
    model.eval()
    config, separate = models.read_config(path, model, settings.pairs, settings.grid, settings.pooling,
                                          settings.similarity)
    return path, folder, model, tokenizer, config, separate


def evaluate_model(name_or_path, datasets, settings, device, column=None):
    """-> (config, {dataset: {'n x d': {metric: value}}}) for every pair of one model (or one per layer: Eq. 7).

    column: the model's name in the tables, which also names its run files (default: its folder name)."""
    column = column or os.path.basename(name_or_path.rstrip("/"))
    path, folder, model, tokenizer, config, separate = load_for_evaluation(name_or_path, settings, device)
    # separately trained models (Eq. 7): each layer's pairs come from that layer's own model
    groups = {path: config.pairs} if not separate else {
        os.path.join(path, sub): [p for p in config.pairs if p[0] == int(n)] for n, sub in separate.items()}
    results = {}
    for model_path, pairs in groups.items():
        if not pairs:
            continue
        if model_path not in (path, folder):
            model, tokenizer = models.load_model(model_path, device)
            model.eval()
        for name, (kind, dataset) in datasets.items():
            if kind == "sts":
                for pair, value in sts_scores(model, tokenizer, dataset, pairs, config.pooling, settings.max_seq_length,
                                              settings.batch_size).items():
                    results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = {"Spearman": value}
                continue
            corpus, queries, qrels = dataset
            qids = list(queries)
            if isinstance(corpus, CorpusFile):  # encoded once into a sharded index, searched shard by shard
                hits, index, recall = index_retrieval(model, tokenizer, model_path, name, dataset, pairs, config,
                                                      settings)
                for (n, d), (scores, rows) in hits.items():
                    figures = metrics.retrieval_scores(hits_graded(index, scores, rows, qids, qrels), qrels,
                                                       settings.depth)
                    if recall:
                        figures["recall@10 vs exact"] = recall[(n, d)]
                    results.setdefault(name, {})[f"{n}x{d}"] = figures
                    if settings.runs_dir:
                        os.makedirs(settings.runs_dir, exist_ok=True)
                        tag = f"{column}.{name}.{n}x{d}"
                        metrics.write_trec_run(ci.ranked_lists(index, scores, rows, qids),
                                               os.path.join(settings.runs_dir, f"{tag}.trec"), tag)
                continue
            docids = list(corpus)
            for pair, scores in score_matrices(model, tokenizer, dataset, pairs, config.pooling, config.similarity,
                                               settings.query_max_len, settings.passage_max_len,
                                               settings.batch_size).items():
                ranks = metrics.judged_ranks(scores, docids, qids, qrels)
                results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = metrics.retrieval_scores(ranks, qrels,
                                                                                              settings.depth)
                if settings.runs_dir:
                    os.makedirs(settings.runs_dir, exist_ok=True)
                    tag = f"{column}.{name}.{pair[0]}x{pair[1]}"
                    run = metrics.run_from_scores(scores, docids, qids, min(settings.depth, len(docids)))
                    metrics.write_trec_run(run, os.path.join(settings.runs_dir, f"{tag}.trec"), tag)
    return config, results


def print_tables(all_results, datasets, metric_names=("Spearman", "nDCG@10", "MRR@10")):
    """One table per dataset and metric: rows = pairs, columns = models; the mean over pairs last."""
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
                    f"{rows[pair][n]:>{width}.4f}" if n in rows[pair] else f"{'-':>{width}}" for n in names))
            means = [np.mean([rows[p][n] for p in keyed if n in rows[p]]) for n in names]
            lines.append(f"{'mean':<10}" + "".join(f"{m:>{width}.4f}" for m in means))
    text = "\n".join(lines)
    print(text)
    return text


def plot_heatmaps(all_results, output_dir):
    """One PNG per model, dataset and metric: layer x dim grid, colour = metric (matplotlib, optional)."""
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
                path = os.path.join(output_dir, f"heatmap_{model_name}_{dataset}_{metric.replace('@', '')}.png")
                fig.savefig(path, dpi=110)
                plt.close(fig)
                paths.append(path)
    return paths
