"""Evaluating every pair over evaluating the full pair alone, side by side on the embedded data.

    python bench/bench_eval.py [--repeats 3]

Both runs go through metrics.evaluate_model (encoding, scoring, metrics) on Lee 2005 and the
inverse-cloze retrieval set, alternating; the ratio is the median of the per-round ratios. All pairs
share one forward pass per batch, so the goal is <= 1.1; re-encoding per pair, as the authors'
evaluation does, costs sum(n)/L (3.5x for the paper's grid).
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402
import starbucks as sb  # noqa: E402


def main():
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    datasets = {
        "lee2005": ("sts", metrics.lee_sts()),
        "wiki-ict": ("retrieval", metrics.embedded_retrieval_set())}
    pairs = sb.default_pairs(6, 384)
    settings = {name: metrics.EvalSettings(pairs=",".join(f"{n}x{d}" for n, d in chosen))
                for name, chosen in (("all_pairs", pairs), ("full_pair", pairs[-1:]))}
    times = {name: [] for name in settings}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, eval_settings in settings.items():
            start = time.perf_counter()
            metrics.evaluate_model(data.DEFAULT_MODEL, datasets, eval_settings,
                                   torch.device("cpu"))
            if repeat:
                times[name].append(time.perf_counter() - start)
    every, full = statistics.median(times["all_pairs"]), statistics.median(times["full_pair"])
    ratio = statistics.median(a / b for a, b in zip(times["all_pairs"], times["full_pair"]))
    sum_n = sum(n for n, _ in pairs) / pairs[-1][0]
    print(f"# evaluate_model on lee2005 + wiki-ict, MiniLM-L6, median of {args.repeats}: "
          f"{len(pairs)} pairs {every:.2f}s, full pair {full:.2f}s; re-encoding per pair would "
          f"cost {sum_n:.2f}x")
    print(f"RATIO eval_all_pairs_vs_full_pair {ratio:.3f} goal <=1.1")


if __name__ == "__main__":
    main()
