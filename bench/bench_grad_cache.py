"""GradCache (--grad_cache_chunk) against the plain step: peak activation memory and step time, side
by side.

    python bench/bench_grad_cache.py [--per_device_train_batch_size 8 --train_group_size 4 --chunk 8]

One SRL step (every pair, Eq. 5) of the packaged MiniLM on a real batch of the embedded data.
Memory: each variant in a fresh process, the peak resident size during one step minus the size
before it (CPU; on a GPU, torch.cuda.max_memory_allocated tells the same). Time: both variants in
one process, alternating, the median of the per-round ratios. GradCache holds one chunk's
activations at a time and pays one extra forward pass without a graph: the goals are memory <= 0.5,
time <= 1.6.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402
from large_batch import grad_cache  # noqa: E402


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def setup(batch_size, group_size, passage_max_len, chunk):
    """-> step(chunk): one SRL training step of MiniLM on a fixed real batch; warmed up."""
    torch.manual_seed(0)
    model, tok = models.load_model(data.DEFAULT_MODEL, torch.device("cpu"))
    model.train()
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    embed_pairs = sb.default_pairs(L, H)
    records = data.embedded_training_data(num_negatives=group_size - 1)
    queries, passages, _ = training.batch_texts(records, "contrastive", list(range(batch_size)),
                                                group_size, random.Random(0))
    q = tok(queries, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    p = tok(passages, padding="max_length", truncation=True, max_length=passage_max_len,
            return_tensors="pt")

    def embed(input_ids, attention_mask):  # Eq. 1, as finetune.py
        return sb.embed_2d(model, input_ids, attention_mask, embed_pairs, "mean")

    def srl(q_2d, p_2d):  # Eq. 5, as finetune.py
        return sb.srl_loss(q_2d, p_2d, embed_pairs, 0.05, 1.0, "cos")

    def step(chunk, q=q, p=p):
        inputs = [(q["input_ids"], q["attention_mask"]), (p["input_ids"], p["attention_mask"])]
        if chunk:
            grad_cache.grad_cache_step(embed, inputs, srl, chunk)
        else:
            srl(*(embed(*x) for x in inputs)).backward()
        model.zero_grad(set_to_none=True)
    warm = {k: v[:2] for k, v in q.items()}  # one small step first: kernels and allocator warmed up
    step(chunk, warm, warm)
    return step


def peak_step_bytes(batch_size, group_size, passage_max_len, chunk):
    """Runs in a fresh process: resident memory added at the peak of one step with --chunk."""
    step = setup(batch_size, group_size, passage_max_len, chunk)
    before = resident_bytes()
    step(chunk)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux reports KiB


def main():
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--train_group_size", type=int, default=4)
    p.add_argument("--passage_max_len", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8, help="--grad_cache_chunk of the cached variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(peak_step_bytes(args.per_device_train_batch_size, args.train_group_size,
                                         args.passage_max_len, args.chunk)))
        return
    memory = {}
    for name, chunk in (("plain", 0), ("grad_cache", args.chunk)):
        argv = [
            sys.executable,
            os.path.abspath(__file__), "--memory_child", "--chunk",
            str(chunk), "--per_device_train_batch_size",
            str(args.per_device_train_batch_size), "--train_group_size",
            str(args.train_group_size), "--passage_max_len",
            str(args.passage_max_len)]
        memory[name] = json.loads(
            subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[-1])
    step = setup(args.per_device_train_batch_size, args.train_group_size, args.passage_max_len,
                 args.chunk)
    times = {"plain": [], "grad_cache": []}
    for _ in range(args.repeats):
        for name, chunk in (("plain", 0), ("grad_cache", args.chunk)):
            start = time.perf_counter()
            step(chunk)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(c / p for c, p in zip(times["grad_cache"], times["plain"]))
    print(f"# MiniLM-L6 SRL step, B={args.per_device_train_batch_size} G={args.train_group_size}, "
          f"passages of {args.passage_max_len} tokens, chunk {args.chunk}, threads "
          f"{torch.get_num_threads()}: plain {statistics.median(times['plain']):.2f}s "
          f"{memory['plain'] / 2**20:.0f} MiB, grad_cache "
          f"{statistics.median(times['grad_cache']):.2f}s {memory['grad_cache'] / 2**20:.0f} MiB")
    print(f"RATIO grad_cache_peak_memory_vs_plain {memory['grad_cache'] / memory['plain']:.3f} "
          "goal <=0.5")
    print(f"RATIO grad_cache_step_time_vs_plain {ratio:.3f} goal <=1.6")


if __name__ == "__main__":
    main()
