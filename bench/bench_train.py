"""One SRL step with every pair (Eq. 5) over one step with the full pair only (Eq. 6), side by side.

    python bench/bench_train.py [--repeats 5]

The packaged MiniLM on a real batch of the embedded inverse-cloze data; steps alternate so that both
variants see the same machine state; the ratio is the median of the per-round ratios. All pairs come
from the same forward pass, so the extra cost is only the (B x BG) score matrices of the small
pairs: the goal is <= 1.05.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402


def main():
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--train_group_size", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = models.load_model(data.DEFAULT_MODEL, torch.device("cpu"))
    model.train()
    pairs = sb.default_pairs(model.config.num_hidden_layers, model.config.hidden_size)
    records = data.embedded_training_data(num_negatives=args.train_group_size - 1)
    import random
    queries, passages, _ = training.batch_texts(records, "contrastive",
                                                list(range(args.per_device_train_batch_size)),
                                                args.train_group_size, random.Random(0))
    q = tok(queries, padding=True, truncation=True, max_length=32, return_tensors="pt")
    d = tok(passages, padding=True, truncation=True, max_length=128, return_tensors="pt")
    losses = {"srl_all_pairs": lambda qe, pe: sb.srl_loss(qe, pe, pairs, 0.05, 1.0, "cos"),
              "full_pair_only": lambda qe, pe: sb.full_loss(qe, pe, pairs, 0.05, "cos")}
    embed = {"srl_all_pairs": pairs, "full_pair_only": [pairs[-1]]}
    times = {name: [] for name in losses}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, loss_fn in losses.items():
            start = time.perf_counter()
            qe = sb.embed_2d(model, q["input_ids"], q["attention_mask"], embed[name], "mean")
            pe = sb.embed_2d(model, d["input_ids"], d["attention_mask"], embed[name], "mean")
            loss_fn(qe, pe).backward()
            model.zero_grad(set_to_none=True)
            if repeat:
                times[name].append(time.perf_counter() - start)
    srl, full = statistics.median(times["srl_all_pairs"]), statistics.median(
        times["full_pair_only"])
    ratio = statistics.median(a / b
                              for a, b in zip(times["srl_all_pairs"], times["full_pair_only"]))
    print(f"# MiniLM-L6 train step, B={args.per_device_train_batch_size} "
          f"G={args.train_group_size}, {len(pairs)} pairs, median of {args.repeats}: srl "
          f"{srl:.3f}s, full {full:.3f}s, threads {torch.get_num_threads()}")
    print(f"RATIO srl_step_vs_full_step {ratio:.3f} goal <=1.05")


if __name__ == "__main__":
    main()
