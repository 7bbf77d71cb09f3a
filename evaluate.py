"""Evaluate every layer-dim pair of one or more encoders: Spearman (STS) and nDCG@10 / MRR@10 / recall.

    python evaluate.py                                          # packaged MiniLM on the embedded data
    python evaluate.py --model_name_or_path out/full out/srl    # side by side, one table per metric
    python evaluate.py --sts_files sts-test.tsv --beir_dirs scifact --runs runs/
    python evaluate.py --adaptive 2x24:200:6x384               # 2D adaptive retrieval (Eq. 14) beside exhaustive

Every pair's embeddings come from one forward pass per batch (up to the largest requested layer).
Metrics follow trec_eval (README, Evaluation); --runs writes one TREC run file per pair so that
trec_eval reproduces every retrieval figure.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import starbucks as sb

# ----------------------------------------------------------------------------------------------
# Metrics (trec_eval's definitions)


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


def ranked_docids(doc_scores):
    """trec_eval's order: score descending, ties broken by docid in descending string order."""
    return [docid for docid, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _evaluated_queries(run, qrels):
    """trec_eval's default: queries that have judgments and appear in the run."""
    return [q for q in run if q in qrels]


def ndcg_at_k(run, qrels, k=10):
    """nDCG@k: gain = grade, discount log2(rank + 1), ideal DCG from all judged documents of the query."""
    values = []
    for q in _evaluated_queries(run, qrels):
        gains = [max(qrels[q].get(docid, 0), 0) for docid in ranked_docids(run[q])[:k]]
        ideal = sorted((g for g in qrels[q].values() if g > 0), reverse=True)[:k]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(values)) if values else 0.0


def mrr_at_k(run, qrels, k=10):
    """MRR@k: reciprocal rank of the first relevant (grade >= 1) document within k, else 0."""
    values = []
    for q in _evaluated_queries(run, qrels):
        rr = 0.0
        for rank, docid in enumerate(ranked_docids(run[q])[:k], 1):
            if qrels[q].get(docid, 0) >= 1:
                rr = 1.0 / rank
                break
        values.append(rr)
    return float(np.mean(values)) if values else 0.0


def recall_at_k(run, qrels, k):
    """Recall@k: relevant (grade >= 1) documents in the top k over all relevant; 0 when none is."""
    values = []
    for q in _evaluated_queries(run, qrels):
        relevant = {d for d, g in qrels[q].items() if g >= 1}
        found = sum(1 for d in ranked_docids(run[q])[:k] if d in relevant)
        values.append(found / len(relevant) if relevant else 0.0)
    return float(np.mean(values)) if values else 0.0


# ----------------------------------------------------------------------------------------------
# Evaluating a model at every pair


def sts_scores(model, tokenizer, dataset, pairs, config, args):
    """Spearman x 1 of cosine similarity at every pair: {pair: value}."""
    a, b, gold = dataset
    texts = sorted(set(a) | set(b))
    index = {t: i for i, t in enumerate(texts)}
    emb = sb.encode_2d(model, tokenizer, texts, pairs, config.pooling, args.max_seq_length,
                       args.per_device_eval_batch_size, normalize=True)
    ia, ib = torch.tensor([index[t] for t in a]), torch.tensor([index[t] for t in b])
    return {pair: spearman((emb[pair][ia] * emb[pair][ib]).sum(-1).numpy(), gold) for pair in pairs}


def score_matrices(model, tokenizer, dataset, pairs, config, args):
    """Query x corpus scores at every pair: {pair: (Q, N)}, from one encoding pass per batch."""
    corpus, queries, _ = dataset
    normalize = config.similarity == "cos"
    d_emb = sb.encode_2d(model, tokenizer, list(corpus.values()), pairs, config.pooling,
                         args.passage_max_len, args.per_device_eval_batch_size, normalize,
                         progress=lambda it: tqdm(it, desc="corpus", leave=False))
    q_emb = sb.encode_2d(model, tokenizer, list(queries.values()), pairs, config.pooling,
                         args.query_max_len, args.per_device_eval_batch_size, normalize)
    return {pair: q_emb[pair] @ d_emb[pair].T for pair in pairs}  # (Q, N) each


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
        judged = [(column[d], g) for d, g in qrels.get(qid, {}).items() if d in column]
        if qid not in qrels:
            continue
        cols = torch.tensor([c for c, _ in judged], dtype=torch.long)
        s = scores[row, cols][:, None]  # (J, 1)
        ahead = (scores[row][None] > s) | ((scores[row][None] == s) & (order[None] > order[cols][:, None]))
        ranks[qid] = [(g, int(r) + 1) for (_, g), r in zip(judged, ahead.sum(1).tolist())]
    return ranks


def retrieval_scores(ranks, qrels, depth):
    """nDCG@10, MRR@10, R@100, R@1000 from judged ranks; equal to the run-dict metrics above (tested)."""
    ndcg, mrr, r100, r1000 = [], [], [], []
    for qid, graded in ranks.items():
        ideal = sorted((g for g in qrels[qid].values() if g > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        dcg = sum(g / math.log2(r + 1) for g, r in graded if g > 0 and r <= min(10, depth))
        ndcg.append(dcg / idcg if idcg > 0 else 0.0)
        first = min((r for g, r in graded if g >= 1 and r <= min(10, depth)), default=None)
        mrr.append(1.0 / first if first else 0.0)
        relevant = sum(1 for g in qrels[qid].values() if g >= 1)
        for k, values in ((100, r100), (1000, r1000)):
            found = sum(1 for g, r in graded if g >= 1 and r <= min(k, depth))
            values.append(found / relevant if relevant else 0.0)
    mean = lambda v: float(np.mean(v)) if v else 0.0
    return {"nDCG@10": mean(ndcg), "MRR@10": mean(mrr), "R@100": mean(r100), "R@1000": mean(r1000)}


def run_from_scores(scores, docids, qids, depth):
    """The top `depth` of every query in trec_eval's order -> run {qid: {docid: score}}."""
    by_docid = torch.argsort(docid_order(docids), descending=True)  # ties: larger docid first
    ordered = scores[:, by_docid].sort(dim=1, descending=True, stable=True)
    top = by_docid[ordered.indices[:, :depth]]  # (Q, depth)
    return {qid: {docids[j]: s for j, s in zip(top[row].tolist(), ordered.values[row, :depth].tolist())}
            for row, qid in enumerate(qids)}


def write_trec_run(run, path, name):
    with open(path, "w") as f:
        for qid, doc_scores in run.items():
            for rank, docid in enumerate(ranked_docids(doc_scores), 1):
                f.write(f"{qid} Q0 {docid} {rank} {doc_scores[docid]:.9g} {name}\n")


def load_datasets(args):
    """{name: ('sts', (a, b, gold)) or ('retrieval', (corpus, queries, qrels))}; embedded default if none given."""
    sets = {}
    for path in args.sts_files or []:
        sets[os.path.basename(path)] = ("sts", data.read_sts_file(path))
    for folder in args.beir_dirs or []:
        sets[os.path.basename(folder.rstrip("/"))] = ("retrieval", data.read_beir(folder, args.beir_split))
    if args.msmarco:
        sets["msmarco"] = ("retrieval", data.read_msmarco(*args.msmarco))
    if not sets:
        sets["lee2005"] = ("sts", data.lee_sts())
        sets["wiki-ict"] = ("retrieval", data.embedded_retrieval_set())
    return sets


def read_config(path, model, args):
    """The checkpoint's StarbucksConfig (pairs, pooling, similarity), flags overriding it."""
    saved = {}
    config_file = os.path.join(path, "starbucks_config.json")
    if os.path.exists(config_file):
        saved = json.load(open(config_file))
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    pairs = sb.parse_pairs(args.pairs) if args.pairs else [tuple(p) for p in saved.get("pairs", [])] or sb.default_pairs(L, H)
    pairs = sb.check_pairs(pairs, L, H)
    if args.grid:
        pairs = [(n, d) for n in sorted({n for n, _ in pairs}) for d in sorted({d for _, d in pairs})]
    config = sb.StarbucksConfig(pairs, args.pooling or saved.get("pooling", "mean"),
                                args.similarity or saved.get("similarity", "cos"))
    return config, saved.get("separate")


def checkpoint_folders(name_or_path):
    """-> (path, folder to load): the checkpoint and its model folder, the same folder except for
    separately trained models (Eq. 7), whose top folder holds only starbucks_config.json and whose
    first layer's model is loaded (all share one config)."""
    config_file = os.path.join(name_or_path, "starbucks_config.json")
    separate = None
    if os.path.exists(config_file) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        separate = json.load(open(config_file)).get("separate")
    if not separate:
        path = data.resolve_model_path(name_or_path)
        return path, path
    return name_or_path, os.path.join(name_or_path, next(iter(separate.values())))


def evaluate_model(name_or_path, datasets, args, device):
    """{dataset: {'n x d': {metric: value}}} for every pair of one model (or one per layer: Eq. 7)."""
    from finetune import load_model
    path, folder = checkpoint_folders(name_or_path)
    model, tokenizer = load_model(folder, device)
    model.eval()
    config, separate = read_config(path, model, args)
    # separately trained models (Eq. 7): each layer's pairs come from that layer's own model
    groups = {path: config.pairs} if not separate else {
        os.path.join(path, sub): [p for p in config.pairs if p[0] == int(n)] for n, sub in separate.items()}
    results = {}
    for model_path, pairs in groups.items():
        if not pairs:
            continue
        if model_path not in (path, folder):
            model, tokenizer = load_model(model_path, device)
            model.eval()
        for name, (kind, dataset) in datasets.items():
            if kind == "sts":
                for pair, value in sts_scores(model, tokenizer, dataset, pairs, config, args).items():
                    results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = {"Spearman": value}
                continue
            corpus, queries, qrels = dataset
            docids, qids = list(corpus), list(queries)
            for pair, scores in score_matrices(model, tokenizer, dataset, pairs, config, args).items():
                ranks = judged_ranks(scores, docids, qids, qrels)
                results.setdefault(name, {})[f"{pair[0]}x{pair[1]}"] = retrieval_scores(ranks, qrels, args.depth)
                if args.runs:
                    os.makedirs(args.runs, exist_ok=True)
                    tag = f"{os.path.basename(path.rstrip('/'))}.{name}.{pair[0]}x{pair[1]}"
                    run = run_from_scores(scores, docids, qids, min(args.depth, len(docids)))
                    write_trec_run(run, os.path.join(args.runs, f"{tag}.trec"), tag)
    return config, results


def print_tables(all_results, datasets, metrics=("Spearman", "nDCG@10", "MRR@10")):
    """One table per dataset and metric: rows = pairs, columns = models; the mean over pairs last."""
    names = list(all_results)
    lines = []
    for dataset in datasets:
        for metric in metrics:
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


def adaptive_retrieval(name_or_path, datasets, args, device):
    """{dataset: {search: nDCG@10, MRR@10, FLOPs and ms per query}} for --adaptive and each of its pairs alone.

    Times are per query over the whole query set: encoding (up to the search's largest layer) and search.
    """
    from finetune import load_model
    path, folder = checkpoint_folders(name_or_path)
    model, tokenizer = load_model(folder, device)
    model.eval()
    config, separate = read_config(path, model, args)
    if separate:
        raise ValueError(f"--adaptive needs one 2D model; {path} holds one separately trained model per layer")
    pairs, ks = sb.parse_funnel(args.adaptive)
    pairs = sb.check_pairs(pairs, model.config.num_hidden_layers, model.config.hidden_size)
    searches = {f"exhaustive {n}x{d}": ([(n, d)], []) for n, d in pairs}
    searches[f"adaptive {args.adaptive}"] = (pairs, ks)
    normalize = config.similarity == "cos"
    results = {}
    for name, (kind, (corpus, queries, qrels)) in datasets.items():
        if kind != "retrieval":
            continue
        docids, texts = list(corpus), [queries[q] for q in queries]
        d_emb = sb.encode_2d(model, tokenizer, [corpus[d] for d in docids], pairs, config.pooling,
                             args.passage_max_len, args.per_device_eval_batch_size, normalize,
                             progress=lambda it: tqdm(it, desc="corpus", leave=False))
        tokens = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.query_max_len)["input_ids"]]
        sb.encode_2d(model, tokenizer, texts[:args.per_device_eval_batch_size], pairs, config.pooling,
                     args.query_max_len)  # warm-up, untimed
        for label, (stage_pairs, stage_ks) in searches.items():
            start = time.perf_counter()
            q_emb = sb.encode_2d(model, tokenizer, texts, stage_pairs, config.pooling, args.query_max_len,
                                 args.per_device_eval_batch_size, normalize)  # stops at the largest stage's layer
            encoded = time.perf_counter()
            scores, indices = sb.adaptive_search([q_emb[p] for p in stage_pairs], [d_emb[p] for p in stage_pairs],
                                                 stage_ks, depth=10)
            searched = time.perf_counter()
            run = {qid: {docids[j]: s for s, j in zip(scores[row].tolist(), indices[row].tolist())}
                   for row, qid in enumerate(queries)}
            layers = max(n for n, _ in stage_pairs)
            results.setdefault(name, {})[label] = {
                "nDCG@10": ndcg_at_k(run, qrels, 10), "MRR@10": mrr_at_k(run, qrels, 10),
                "encode GFLOPs/q": float(np.mean([sb.encoder_flops(model, layers, t) for t in tokens])) / 1e9,
                "search MFLOPs/q": sb.search_flops(len(docids), [d for _, d in stage_pairs], stage_ks) / 1e6,
                "encode ms/q": (encoded - start) * 1000 / len(texts), "search ms/q": (searched - encoded) * 1000 / len(texts)}
    return results


def print_adaptive(adaptive, datasets):
    """One table per model and dataset: exhaustive search at each pair, then the adaptive funnel."""
    columns = ("nDCG@10", "MRR@10", "encode GFLOPs/q", "search MFLOPs/q", "encode ms/q", "search ms/q")
    lines = []
    for model_name, by_dataset in adaptive.items():
        for dataset, rows in by_dataset.items():
            corpus, queries, _ = datasets[dataset][1]
            lines.append(f"\n{dataset} adaptive retrieval (Eq. 14), model {model_name}: "
                         f"{len(corpus)} documents, {len(queries)} queries")
            width = max(len(label) for label in rows) + 2
            lines.append(f"{'search':<{width}}" + "".join(f"{c:>17}" for c in columns))
            for label, values in rows.items():
                lines.append(f"{label:<{width}}" + "".join(f"{values[c]:>17.4f}" for c in columns))
    text = "\n".join(lines)
    print(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", nargs="+", default=[data.DEFAULT_MODEL])
    p.add_argument("--names", nargs="+", default=None, help="column names for the models (default: folder names)")
    p.add_argument("--output_dir", default="output/evaluate", help="results.json and table.txt go here")
    p.add_argument("--pairs", default=None, help="LAYERxDIM list; default: the checkpoint's pairs")
    p.add_argument("--grid", action="store_true", help="every layer x every dim of the pairs")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default=None, help="default: the checkpoint's, else mean")
    p.add_argument("--similarity", choices=("dot", "cos"), default=None, help="default: the checkpoint's, else cos")
    p.add_argument("--sts_files", nargs="*", help="scored-pair files (STS-B TSV/CSV/JSONL)")
    p.add_argument("--beir_dirs", nargs="*", help="BEIR folders: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--beir_split", default="test")
    p.add_argument("--msmarco", nargs=3, metavar=("COLLECTION", "QUERIES", "QRELS"), default=None)
    p.add_argument("--runs", default=None, help="write one TREC run file per model, dataset and pair here")
    p.add_argument("--depth", type=int, default=1000)
    p.add_argument("--adaptive", default=None, metavar="SMALL:K:LARGE",
                   help="also report 2D adaptive retrieval (Eq. 14), e.g. 2x24:50:6x384 or a funnel 1x12:200:2x24:50:6x384")
    p.add_argument("--query_max_len", type=int, default=32)
    p.add_argument("--passage_max_len", type=int, default=128)
    p.add_argument("--max_seq_length", type=int, default=256, help="STS texts")
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--plot", action="store_true", help="heat maps (layer x dim) as PNG; needs matplotlib")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = args.names or [os.path.basename(m.rstrip("/")) for m in args.model_name_or_path]
    if len(names) != len(args.model_name_or_path) or len(set(names)) != len(names):
        raise ValueError("--names needs one distinct name per model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datasets = load_datasets(args)
    if args.adaptive and not any(kind == "retrieval" for kind, _ in datasets.values()):
        raise ValueError("--adaptive needs a retrieval dataset (--beir_dirs, --msmarco or the embedded default)")
    all_results, configs, adaptive = {}, {}, {}
    for name, path in zip(names, args.model_name_or_path):
        if args.adaptive:
            adaptive[name] = adaptive_retrieval(path, datasets, args, device)
        config, all_results[name] = evaluate_model(path, datasets, args, device)
        configs[name] = {"path": path, "pooling": config.pooling, "similarity": config.similarity}
    os.makedirs(args.output_dir, exist_ok=True)
    labels = {"lee2005": "Lee et al. 2005 document similarity (50 docs, 1225 pairs)",
              "wiki-ict": "inverse-cloze retrieval over held-out Wikipedia articles (real text, NON-STANDARD task)"}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"command": "python evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "datasets": {n: labels.get(n, n) for n in datasets}, "models": configs,
                   "results": all_results, **({"adaptive": adaptive} if adaptive else {})}, f, indent=2)
    for n in datasets:
        if n in labels:
            print(f"{n}: {labels[n]}")
    table = print_tables(all_results, list(datasets))
    if adaptive:
        table += "\n" + print_adaptive(adaptive, datasets)
    open(os.path.join(args.output_dir, "table.txt"), "w").write(table + "\n")
    if args.plot:
        print("\n".join(plot_heatmaps(all_results, args.output_dir)))
    return all_results


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
