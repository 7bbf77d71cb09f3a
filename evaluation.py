"""Evaluating a model at every layer-dim pair: STS Spearman and retrieval metrics from one forward
pass per batch (Eq. 1), 2D adaptive retrieval (Eq. 14) beside exhaustive search, tables and heat maps.

evaluate.py is the command line over these; bench/ and recipe.py call them directly.
"""
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import corpus_index as ci
import data
import flops
import metrics
import models
import search
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
    pairs = sorted(set(config.pairs) | set(search.parse_funnel(settings.adaptive)[0] if settings.adaptive else []))
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


def evaluate_model(name_or_path, datasets, settings, device):
    """-> (config, {dataset: {'n x d': {metric: value}}}) for every pair of one model (or one per layer: Eq. 7)."""
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
                        tag = f"{os.path.basename(path.rstrip('/'))}.{name}.{n}x{d}"
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
                    tag = f"{os.path.basename(path.rstrip('/'))}.{name}.{pair[0]}x{pair[1]}"
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

# ----------------------------------------------------------------------------------------------
# 2D adaptive retrieval (Eq. 14) beside exhaustive search at each of its sizes


def adaptive_retrieval(name_or_path, datasets, settings, device):
    """{dataset: {search: nDCG@10, MRR@10, FLOPs and ms per query}} for --adaptive and each of its pairs alone.

    Times are per query over the whole query set: encoding (up to the search's largest layer) and search.
    """
    path, _, model, tokenizer, config, separate = load_for_evaluation(name_or_path, settings, device)
    if separate:
        raise ValueError(f"--adaptive needs one 2D model; {path} holds one separately trained model per layer")
    pairs, ks = search.parse_funnel(settings.adaptive)
    pairs = sb.check_pairs(pairs, model.config.num_hidden_layers, model.config.hidden_size)
    searches = {f"exhaustive {n}x{d}": ([(n, d)], []) for n, d in pairs}
    searches[f"adaptive {settings.adaptive}"] = (pairs, ks)
    normalize = config.similarity == "cos"
    results = {}
    for name, (kind, (corpus, queries, qrels)) in datasets.items():
        if kind != "retrieval":
            continue
        texts = [queries[q] for q in queries]
        if isinstance(corpus, CorpusFile):  # the funnel on the sharded index: shortlist, then gather to rerank
            index = encoded_index(model, tokenizer, path, name, corpus, config, settings)
            num_docs, rank = index.num_docs, lambda q, stage_pairs, stage_ks: ci.adaptive_search(
                index, stage_pairs, [q[p] for p in stage_pairs], stage_ks, depth=10)
            name_rows = lambda rows: ci.docids(index, rows)
        else:
            docids = list(corpus)
            d_emb = sb.encode_2d(model, tokenizer, [corpus[d] for d in docids], pairs, config.pooling,
                                 settings.passage_max_len, settings.batch_size, normalize,
                                 progress=lambda it: tqdm(it, desc="corpus", leave=False))
            num_docs, rank = len(docids), lambda q, stage_pairs, stage_ks: search.adaptive_search(
                [q[p] for p in stage_pairs], [d_emb[p] for p in stage_pairs], stage_ks, depth=10)
            name_rows = lambda rows, docids=docids: [[docids[j] for j in row] for row in rows.tolist()]
        tokens = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.query_max_len)["input_ids"]]
        sb.encode_2d(model, tokenizer, texts[:settings.batch_size], pairs, config.pooling,
                     settings.query_max_len)  # warm-up, untimed
        for label, (stage_pairs, stage_ks) in searches.items():
            start = time.perf_counter()
            q_emb = sb.encode_2d(model, tokenizer, texts, stage_pairs, config.pooling, settings.query_max_len,
                                 settings.batch_size, normalize)  # stops at the largest stage's layer
            encoded = time.perf_counter()
            scores, indices = rank(q_emb, stage_pairs, stage_ks)
            searched = time.perf_counter()
            run = {qid: dict(zip(names, values)) for qid, names, values in zip(queries, name_rows(indices),
                                                                              scores.tolist())}
            layers = max(n for n, _ in stage_pairs)
            results.setdefault(name, {})[label] = {
                "nDCG@10": metrics.ndcg_at_k(run, qrels, 10), "MRR@10": metrics.mrr_at_k(run, qrels, 10),
                "encode GFLOPs/q": float(np.mean([flops.encoder_flops(model, layers, t) for t in tokens])) / 1e9,
                "search MFLOPs/q": search.search_flops(num_docs, [d for _, d in stage_pairs], stage_ks) / 1e6,
                "encode ms/q": (encoded - start) * 1000 / len(texts), "search ms/q": (searched - encoded) * 1000 / len(texts)}
    return results


def print_adaptive(adaptive, datasets):
    """One table per model and dataset: exhaustive search at each pair, then the adaptive funnel."""
    columns = ("nDCG@10", "MRR@10", "encode GFLOPs/q", "search MFLOPs/q", "encode ms/q", "search ms/q")
    lines = []
    for model_name, by_dataset in adaptive.items():
        for dataset, rows in by_dataset.items():
            corpus, queries, _ = datasets[dataset][1]
            documents = f"{len(corpus)} documents" if isinstance(corpus, dict) else f"the indexed {corpus.path}"
            lines.append(f"\n{dataset} adaptive retrieval (Eq. 14), model {model_name}: "
                         f"{documents}, {len(queries)} queries")
            width = max(len(label) for label in rows) + 2
            lines.append(f"{'search':<{width}}" + "".join(f"{c:>17}" for c in columns))
            for label, values in rows.items():
                lines.append(f"{label:<{width}}" + "".join(f"{values[c]:>17.4f}" for c in columns))
    text = "\n".join(lines)
    print(text)
    return text


# ----------------------------------------------------------------------------------------------
# Classification with the sizes (Eq. 18-20): costs and the cascade's operating points

def token_counts(tokenizer, texts, max_length=256):
    """Tokens of each text after truncation, as the encoder sees them: [N]."""
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def text_flops(model, tokens, layers):
    """{n: (N,) encoder FLOPs of each text (tokens [N]) through the first n layers} for every n in layers."""
    return {n: np.array([flops.encoder_flops(model, n, t) for t in tokens]) for n in set(layers)}


def classification_costs(model, tokenizer, texts, pairs, num_classes, max_length=256):
    """{pair: mean FLOPs per text} of classifying at one pair: the encoder's first n layers + the head (2 d C)."""
    per_layer = text_flops(model, token_counts(tokenizer, texts, max_length), [n for n, _ in pairs])
    return {(n, d): float(per_layer[n].mean()) + 2 * d * num_classes for n, d in pairs}


@dataclass
class CascadeOutcomes:
    """Every pair's answer to every text, from one forward pass: all that Eq. 20 needs to price any thresholds."""
    pairs: list  # [(n, d)] in order of layer
    confidence: torch.Tensor  # (N, P): max softmax probability of each pair's head
    predicted: torch.Tensor  # (N, P): each pair's class
    cost: np.ndarray  # (N, P): FLOPs of stopping at pair i (layers run + heads consulted) over the full pair's mean
    gold: torch.Tensor  # (N,)


def cascade_outcomes(model, tokenizer, texts, labels, classifier, pairs, pooling="mean", max_length=256, batch_size=32,
                     num_classes=2, features=None):
    """One forward pass per batch (encode_2d) -> CascadeOutcomes, in the texts' order. The cost of an example that
    stops at pair i: the encoder's first n_i layers (the cascade continues its pass, never reruns it) plus every
    head it consulted (2 d_j C each), over the mean cost of classifying at the full pair alone.

    features: encode_2d's {pair: (N, d)} of these texts with the same max_length and batch_size (so the same
    batches and values), when the caller has them already: no second pass.
    """
    sb.cascade_thresholds(pairs, 0.0)  # pairs in order of layer, as the cascade runs them
    if not texts or len(texts) != len(labels):
        raise ValueError(f"the cascade needs texts and one label each, got {len(texts)} texts, {len(labels)} labels")
    if features is None:
        features = sb.encode_2d(model, tokenizer, texts, pairs, pooling, max_length, batch_size)
    elif any(p not in features or len(features[p]) != len(texts) for p in pairs):
        raise ValueError(f"features must hold every pair of {list(pairs)} for the {len(texts)} texts, got "
                         f"{ {p: len(v) for p, v in features.items()} }")
    device = next(classifier.parameters()).device
    with torch.no_grad():
        probabilities = torch.stack([classifier.logits(p, features[p].to(device)).softmax(-1).cpu() for p in pairs],
                                    1)  # (N, P, C)
    per_layer = text_flops(model, token_counts(tokenizer, texts, max_length), [n for n, _ in pairs])
    heads = np.cumsum([2 * d * num_classes for _, d in pairs])  # (P,): heads consulted up to pair i
    cost = np.stack([per_layer[n] for n, _ in pairs], 1) + heads  # (N, P)
    full = per_layer[pairs[-1][0]].mean() + 2 * pairs[-1][1] * num_classes  # the full pair alone, its head only
    return CascadeOutcomes(list(pairs), probabilities.amax(-1), probabilities.argmax(-1), cost / full,
                           torch.tensor(list(labels)))


def cascade_answers(outcomes, thresholds):
    """Eq. 20 text by text, read off outcomes -> (the class each text gets (N,), the index of the pair it stopped
    at (N,)), in the texts' order. thresholds: one for every pair, or one per pair (the last always answers)."""
    per_pair = torch.tensor(sb.cascade_thresholds(outcomes.pairs, thresholds), dtype=outcomes.confidence.dtype)
    confident = outcomes.confidence >= per_pair  # (N, P)
    confident[:, -1] = True
    stopped = confident.float().argmax(1)  # (N,): the first pair confident enough
    return outcomes.predicted[torch.arange(len(stopped)), stopped], stopped


def cascade_point(outcomes, thresholds):
    """Eq. 20 at one threshold for every pair, or one per pair (the last always answers), priced from outcomes
    -> {'threshold', 'accuracy', 'relative_cost', 'stopped': share per pair}: what sb.cascade_classify decides,
    pass by pass (tested)."""
    predicted, stopped = cascade_answers(outcomes, thresholds)
    return {"threshold": thresholds, "accuracy": metrics.accuracy(predicted, outcomes.gold),
            "relative_cost": float(outcomes.cost[np.arange(len(stopped)), stopped.numpy()].mean()),
            "stopped": [float((stopped == i).float().mean()) for i in range(len(outcomes.pairs))]}


def accuracy_drop(outcomes, thresholds):
    """-> (accuracy of the full pair minus the cascade's on the same texts, the standard error of that paired
    difference): how sure a drop measured on N texts is (the per-text difference is -1, 0 or 1)."""
    full = (outcomes.predicted[:, -1] == outcomes.gold).double()  # (N,) the full pair alone answers every text
    lost = full - (cascade_answers(outcomes, thresholds)[0] == outcomes.gold).double()  # (N,)
    return float(lost.mean()), float(lost.std() / len(lost) ** 0.5) if len(lost) > 1 else float("nan")


def cascade_points(model, tokenizer, texts, labels, classifier, pairs, thresholds, pooling="mean", max_length=256,
                   batch_size=32, num_classes=2, features=None):
    """Eq. 20 at each of thresholds (a number, or one per pair) -> [cascade_point], from one forward pass (none
    with features: see cascade_outcomes)."""
    outcomes = cascade_outcomes(model, tokenizer, texts, labels, classifier, pairs, pooling, max_length, batch_size,
                                num_classes, features)
    return [cascade_point(outcomes, threshold) for threshold in thresholds]


THRESHOLD_GRID = [round(0.01 * i, 2) for i in range(100)] + [0.995, 0.999, 1.01]


def qualifies(outcomes, point, target, margin=0.0):
    """A cascade_point reaches the target accuracy with margin standard errors of its drop (accuracy_drop) to
    spare: a point chosen on held-out texts for reaching it is likely to have been lucky there."""
    return point["accuracy"] - (margin * accuracy_drop(outcomes, point["threshold"])[1] if margin else 0.0) >= target


def cheapest_threshold(outcomes, tolerance=0.005, grid=THRESHOLD_GRID, margin=0.0):
    """The cascade_point of the cheapest single threshold of grid whose accuracy is at least the full pair's
    minus tolerance, with margin (qualifies; grid ends above 1: every text at the full pair, which always does)."""
    target = cascade_point(outcomes, 1.01)["accuracy"] - tolerance
    return min((q for q in (cascade_point(outcomes, t) for t in grid) if qualifies(outcomes, q, target, margin)),
               key=lambda q: q["relative_cost"])


def choose_thresholds(outcomes, tolerance=0.005, grid=THRESHOLD_GRID, margin=0.0):
    """One threshold per pair (as MRL's cascade, one per size, chosen on held-out data) whose accuracy is at least
    the full pair's minus tolerance, with margin (qualifies), at a low expected cost -> (thresholds, their
    cascade_point). A local search: from cheapest_threshold, move one pair's threshold at a time while that lowers
    the cost. Never dearer than one threshold for all; not always the cheapest (a move of two at once can be
    needed)."""
    target = cascade_point(outcomes, 1.01)["accuracy"] - tolerance
    best = cheapest_threshold(outcomes, tolerance, grid, margin)
    thresholds, improved = [best["threshold"]] * len(outcomes.pairs), True
    while improved:
        improved = False
        for i in range(len(outcomes.pairs) - 1):  # the last pair always answers
            for value in grid:
                point = cascade_point(outcomes, thresholds[:i] + [value] + thresholds[i + 1:])
                if point["relative_cost"] < best["relative_cost"] - 1e-12 and qualifies(outcomes, point, target, margin):
                    best, thresholds, improved = point, point["threshold"], True
    return thresholds, {**best, "threshold": thresholds}


def plot_cascade(points, accuracy_by_pair, costs, pairs, path):
    """Accuracy against FLOPs relative to the full pair: each pair alone, and the cascade's thresholds (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([costs[p] / costs[pairs[-1]] for p in pairs], [accuracy_by_pair[p] for p in pairs], "o-",
            label="one pair (MRL head)")
    for (n, d) in pairs:
        ax.annotate(f"{n}x{d}", (costs[(n, d)] / costs[pairs[-1]], accuracy_by_pair[(n, d)]), fontsize=7)
    ax.plot([p["relative_cost"] for p in points], [p["accuracy"] for p in points], "s--", label="cascade (Eq. 20)")
    ax.set_xscale("log")
    ax.set_xlabel("expected FLOPs per text, relative to the full pair")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
