"""Evaluate every layer-dim pair of one or more encoders: Spearman (STS), nDCG@10, MRR@10, recall.

    python evaluate.py                                          # packaged MiniLM on the embedded data
    python evaluate.py --model_name_or_path out/full out/srl    # side by side, one table per metric
    python evaluate.py --sts_files sts-test.tsv --beir_dirs scifact --runs runs/
    python evaluate.py --adaptive 2x24:200:6x384               # 2D adaptive retrieval (Eq. 14) beside exhaustive
    python evaluate.py --precision int8 --pairs 2x24,6x384     # every pair in int8 beside float32

Every pair's embeddings come from one forward pass per batch (up to the largest requested layer).
Metrics follow trec_eval (README, Evaluate; docs/evaluation.md); --runs writes one TREC run file
per pair so that trec_eval reproduces every retrieval figure.
"""
import json
import os
import sys

import data


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", nargs="+", default=[data.DEFAULT_MODEL])
    p.add_argument("--names", nargs="+", default=None,
                   help="column names for the models (default: folder names)")
    p.add_argument("--output_dir", default="output/evaluate",
                   help="results.json and table.txt go here")
    p.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="replace an earlier evaluation's results.json and table.txt in --output_dir")
    p.add_argument("--pairs", default=None, help="LAYERxDIM list; default: the checkpoint's pairs")
    p.add_argument("--grid", action="store_true", help="every layer x every dim of the pairs")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default=None,
                   help="default: the checkpoint's, else mean")
    p.add_argument("--similarity", choices=("dot", "cos"), default=None,
                   help="default: the checkpoint's, else cos")
    p.add_argument("--sts_files", nargs="*", help="scored-pair files (STS-B TSV/CSV/JSONL)")
    p.add_argument("--beir_dirs", nargs="*",
                   help="BEIR folders: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--beir_split", default="test")
    p.add_argument("--msmarco", nargs=3, metavar=("COLLECTION", "QUERIES", "QRELS"), default=None)
    p.add_argument("--runs", "--save_runs", default=None,
                   help="write one TREC run file per model, dataset and pair here (trec_eval "
                        "reproduces every figure)")
    p.add_argument("--index_dir", default=None,
                   help="--beir_dirs and --msmarco corpora are encoded here once, in shards "
                        "(resumable), and searched shard by shard: "
                        "<index_dir>/<model>-<tag>/<dataset>; default: <output_dir>/index")
    p.add_argument(
        "--index", choices=("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"), default="exact",
        help="search of an indexed corpus: exact (streamed top-k), or FAISS (pip install faiss-cpu), "
        "reported with its recall@10 against exact search")
    p.add_argument("--storage_dtype", choices=("float16", "float32"), default="float16",
                   help="the index's vectors on disk (docs/scale.md: what float16 costs)")
    p.add_argument("--shard_size", type=data.positive_int, default=100_000,
                   help="passages per index shard")
    p.add_argument("--depth", type=data.positive_int, default=1000)
    p.add_argument("--adaptive", default=None, metavar="SMALL:K:LARGE",
                   help="also report 2D adaptive retrieval (Eq. 14), e.g. 2x24:50:6x384 or a "
                        "funnel 1x12:200:2x24:50:6x384")
    p.add_argument("--precision", choices=("float16", "int8", "binary"), default=None,
                   help="also report every pair's retrieval at this precision beside float32 "
                        "(index/precision.py)")
    p.add_argument("--query_max_len", type=data.positive_int, default=32)
    p.add_argument("--passage_max_len", type=data.positive_int, default=128)
    p.add_argument("--max_seq_length", type=data.positive_int, default=256, help="STS texts")
    p.add_argument("--per_device_eval_batch_size", type=data.positive_int, default=64)
    p.add_argument("--plot", action="store_true",
                   help="heat maps (layer x dim) as PNG; needs matplotlib")
    args = p.parse_args(argv)
    problem = data.output_dir_problem(
        args.output_dir, "pass --overwrite_output_dir to replace them",
        overwrite=args.overwrite_output_dir, held=("results.json", "table.txt"))
    paths = [*(args.sts_files or []), *(args.beir_dirs or []), *(args.msmarco or [])]
    for problem in (problem, *map(data.model_problem, args.model_name_or_path),
                    *(f"{path}: no such file or folder"
                      for path in paths if not os.path.exists(path))):
        if problem:
            p.error(problem)
    return args


if __name__ == "__main__":  # --help, a bad flag or a missing path answer before torch loads
    data.run_command(parse_args)

import metrics  # noqa: E402 (here, below parse_args: --help and bad paths answer before torch loads)
import models  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    names = args.names or [os.path.basename(m.rstrip("/")) for m in args.model_name_or_path]
    if len(names) != len(args.model_name_or_path) or len(set(names)) != len(names):
        raise ValueError("--names needs one distinct name per model")
    # each rank encodes its slice of an index's shards
    torchrun = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if torchrun:
        import training
        rank, _, device = training.setup()
    else:
        rank, device = 0, models.default_device()
    datasets = metrics.load_datasets(args.sts_files, args.beir_dirs, args.beir_split, args.msmarco)
    index_dir = args.index_dir or os.path.join(args.output_dir, "index")
    settings = metrics.EvalSettings(
        args.pairs, args.grid, args.pooling, args.similarity, args.query_max_len,
        args.passage_max_len, args.max_seq_length, args.per_device_eval_batch_size, args.depth,
        args.runs, args.adaptive, index_dir, args.storage_dtype, args.shard_size, args.index)
    retrieval = [dataset for kind, dataset in datasets.values() if kind == "retrieval"]
    for flag in ("adaptive", "precision"):
        if getattr(args, flag) and not retrieval:
            raise ValueError(f"--{flag} needs a retrieval dataset (--beir_dirs, --msmarco or the "
                             "embedded default)")
    # an in-memory corpus is indexed in each process's own scratch folder: one process only
    if torchrun and args.precision and any(isinstance(corpus, dict) for corpus, _, _ in retrieval):
        raise ValueError("--precision under torchrun needs corpora read from files (--beir_dirs, "
                         "--msmarco); evaluate the embedded set in one process")
    from_files = any(not isinstance(corpus, dict) for corpus, _, _ in retrieval)
    if args.precision == args.storage_dtype and from_files:
        raise ValueError(f"--precision {args.precision}: corpora read from files are indexed in "
                         f"{args.storage_dtype} already, so it would be compared with itself; pass "
                         f"--storage_dtype float32 to see what {args.precision} keeps")
    coverage = {name: metrics.judgment_coverage(name, dataset)  # fails here, before any model loads
                for name, (kind, dataset) in datasets.items() if kind == "retrieval"}
    all_results, configs, adaptive, precision = {}, {}, {}, {}
    for name, path in zip(names, args.model_name_or_path):
        config, all_results[name] = metrics.evaluate_model(path, datasets, settings, device, name)
        if args.adaptive:
            from deploy import funnel
            adaptive[name] = funnel.adaptive_retrieval(path, datasets, settings, device)
        if args.precision:
            from index import precision as quantized
            precision[name] = quantized.evaluate_precision(path, datasets, settings, device,
                                                           args.precision)
        configs[name] = {"path": path, "pooling": config.pooling, "similarity": config.similarity}
    if torchrun:
        training.cleanup()
    if rank != 0:  # the other ranks encoded their shards; rank 0 searched and reports
        return all_results
    os.makedirs(args.output_dir, exist_ok=True)
    labels = {
        "lee2005": "Lee et al. 2005 document similarity (50 docs, 1225 pairs)",
        "wiki-ict": ("inverse-cloze retrieval over held-out Wikipedia articles (real text, "
                     "NON-STANDARD task)")
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        command = "python evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv)
        json.dump({"command": command, "datasets": {n: labels.get(n, n) for n in datasets},
                   "models": configs, "judgments": coverage, "results": all_results,
                   **({"adaptive": adaptive} if adaptive else {}),
                   **({"precision": precision} if precision else {})}, f, indent=2)
    for n in datasets:
        if n in labels:
            print(f"{n}: {labels[n]}")
    for n, c in coverage.items():
        print(
            f"{n}: {c['evaluated']} of {c['queries']} queries evaluated; of {c['judgments']} "
            "judgments, "
            f"{c['unknown_query_judgments']} name unknown queries, "
            f"{c['unknown_document_judgments']} unknown documents"
        )
    table = metrics.print_tables(all_results, list(datasets))
    if adaptive:
        from deploy import funnel
        table += "\n" + funnel.print_adaptive(adaptive, datasets)
    if precision:
        from index import precision as quantized
        for name, by_dataset in precision.items():
            table += "\n" + quantized.print_precision(by_dataset, name)
    open(os.path.join(args.output_dir, "table.txt"), "w").write(table + "\n")
    if args.plot:
        print("\n".join(metrics.plot_heatmaps(all_results, args.output_dir)))
    return all_results


if __name__ == "__main__":
    data.run_command(main)
