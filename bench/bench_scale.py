"""Paper-scale retrieval (index/corpus_index.py), measured in one run: memory and time of streamed
exact search against corpus size, its FLOP rate against this machine's matmul, the 2D funnel (Eq.
14) on the sharded index with a binary first stage beside a float16 one, what float16, int8 and
binary storage cost, and the work an interrupted encoding redoes.

    # about 5 minutes on 2 CPU cores
    python bench/bench_scale.py
    # the funnel's quality on the demo's SRL model
    python bench/bench_scale.py --model_name_or_path output/demo/srl
    # only the funnels and the precisions (about 1 minute)
    python bench/bench_scale.py --adaptive_only --model_name_or_path output/demo/srl
    # bigger (not run here: no GPU)
    python bench/bench_scale.py --large_docs 8800000 --dim 768 --device cuda

- peak_memory_2M_vs_200k, search_time_2M_vs_200k: exact search (depth --depth) of the same --queries
  random unit queries over --small_docs and --large_docs random unit vectors written as float16
  shards, each search in its own process (peak resident memory while the search runs: VmHWM, reset
  when it starts; Linux only).
- exact_search_flop_rate_vs_matmul: 2 Q N d / time of exact search (--flop_queries over --flop_docs
  x --flop_dim, depth --depth; the fastest of 3) over the FLOP rate of a 2048^3 float32 matmul (the
  fastest of 5), same device and threads; the search as it runs here (FAISS's flat search per chunk
  where FAISS is installed and the device is a CPU). Beside it: the torch.topk path without FAISS.
- adaptive_speedup_queries_in_blocks: the product's funnel (Eq. 14 with a precision axis):
  --adaptive (default 6x384:100:6x384) with its first stage over --adaptive_precision codes
  (default binary: FAISS's IndexBinaryFlat, Hamming distance over the 48-byte sign codes of 6x384),
  its shortlist rescored in float at the last pair; against exhaustive float16 search at that last
  pair, both over the same float16 shards (and their codes, index/precision.py) of --adaptive_docs
  random vectors, --block queries at once, median of --rounds; beside it, the share of the funnel's
  time that its first stage takes alone, and issue 12's float16 funnel --float_adaptive
  (2x24:200:6x384) timed the same way.
- adaptive_ndcg10_kept: nDCG@10 of the product's funnel over exhaustive float16 search at its last
  pair on the real embedded set (wiki-ict, inverse-cloze over held-out Wikipedia: a NON-STANDARD
  task; 318 passages, so the shortlist holds a large share of it), encoded by --model_name_or_path.
- binary_bytes_vs_float16: bytes per vector on disk of the first stage layer's binary codes over its
  float16 vectors (shard 0 of the synthetic corpus; file size less the .npy header, over rows).
- int8_ndcg10_kept_min_pair: at every pair of the model, nDCG@10 of exhaustive search over int8
  codes (ranges calibrated on the stored float16 vectors; float queries) over exhaustive float32
  search at the same pair, on the real set; the worst pair. The INT8 line lists every pair.
- AT lines: exhaustive search time per query at 1/8, 1/4, 1/2 and all of the last pair's width for
  float16, int8 and binary over the synthetic corpus (random vectors: time only; what each pair and
  precision keeps is `python -m index.precision_table`, docs/precision.md).
- encode_resume_lost_work: the real set encoded in shards of --resume_shard_size passages, kill -9
  once half the passages were handed to the encoder, then resumed: (passages encoded by both runs -
  N) / N. A batch counts as encoded when it starts, so a batch cut short by the kill counts as lost.
- FLOAT16 lines: nDCG@10 at every pair of the model from float32 and from float16 shards of the real
  set.
- FAISS lines (when faiss is installed): flat, IVF and HNSW indexes of the small scaling corpus,
  recall@k against exact search (corpus_index defaults: nlist 4 sqrt(N), nprobe 16; HNSW M 32,
  efSearch 128).
"""
import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from index import corpus_index as ci, precision  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402
import starbucks as sb  # noqa: E402
from deploy import funnel  # noqa: E402
from timing import fastest, median_ratio  # noqa: E402


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL)
    p.add_argument("--small_docs", type=int, default=200_000)
    p.add_argument("--large_docs", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=128, help="dimension of the scaling corpora")
    p.add_argument("--queries", type=int, default=100, help="queries of the scaling searches")
    p.add_argument("--depth", type=int, default=1000)
    p.add_argument("--shard_size", type=int, default=100_000)
    p.add_argument("--flop_docs", type=int, default=200_000)
    p.add_argument("--flop_dim", type=int, default=768)
    p.add_argument("--flop_queries", type=int, default=512)
    p.add_argument("--adaptive", default="6x384:100:6x384",
                   help="the product's funnel SMALL:K:LARGE (or longer), its first stage at "
                        "--adaptive_precision")
    p.add_argument("--adaptive_precision", choices=("float16", "int8", "binary"), default="binary")
    p.add_argument("--float_adaptive", default="2x24:200:6x384",
                   help="the float16 funnel beside it (issue 12's), ending at the same pair")
    p.add_argument("--adaptive_only", action="store_true",
                   help="only part 3: the funnels and the precisions (no scaling, FLOP rate or "
                        "resume)")
    p.add_argument("--adaptive_docs", type=int, default=1_000_000)
    p.add_argument("--block", type=int, default=64, help="queries per block for the funnel's speed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--resume_shard_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side")
    p.add_argument("--device", default="cpu",
                   help="where the synthetic searches and the matmul run")
    p.add_argument("--workdir", default=None,
                   help="where the shards go (default: a new folder in /tmp, removed)")
    p.add_argument("--search_child", nargs=3, metavar=("INDEX", "QUERIES", "OUT"),
                   help=argparse.SUPPRESS)
    p.add_argument("--encode_child", metavar="INDEX", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Synthetic corpora: random unit vectors written as shards (search time does not depend on the
# values)

def write_random_index(folder, num_docs, widths, shard_size, seed):
    """float16 shards of random vectors {n: D_n} for num_docs documents, cosine; -> seconds
    taken."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    ci.start_index(
        folder,
        ci.index_config([(n, d) for n, d in widths.items()], "float16", shard_size, normalize=True))
    for shard, first in enumerate(range(0, num_docs, shard_size)):
        rows = min(shard_size, num_docs - first)
        vectors = {
            n: F.normalize(torch.randn(rows, d, generator=g), dim=-1).numpy().astype(np.float16)
            for n, d in widths.items()}
        ci.write_shard(folder, shard, [str(i) for i in range(first, first + rows)], vectors)
    ci.finalize_index(folder, -(-num_docs // shard_size))
    return time.perf_counter() - start


def random_queries(count, dim, seed):
    # (Q, d)
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)),
                       dim=-1)


def resident_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status."""
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def search_child(folder, queries_path, out, depth, device):
    """One search in a fresh process: its time, and the process's peak resident memory while it ran
    (the peak is reset just before the search, so what importing torch took on the way does not
    count, what it holds does)."""
    index = ci.open_index(folder)
    queries = torch.load(queries_path).to(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current resident size
    before = resident_mb("VmRSS")
    start = time.perf_counter()
    ci.search(index, (1, queries.shape[1]), queries, depth)
    seconds = time.perf_counter() - start
    json.dump({"seconds": seconds, "peak_mb": resident_mb("VmHWM"), "before_mb": before},
              open(out, "w"))


def run_search_child(folder, queries_path, out, depth, threads, device):
    subprocess.run([
        sys.executable,
        os.path.abspath(__file__), "--search_child", folder, queries_path, out, "--depth",
        str(depth), "--threads",
        str(threads), "--device", device], check=True)
    return json.load(open(out))


def faiss_recall(folder, queries):
    """FAISS (optional) against exact search on one index: recall@10 and @100, build and search
    seconds."""
    try:
        import faiss
    except ImportError:
        return ["FAISS not installed (pip install faiss-cpu): skipped"]
    faiss.omp_set_num_threads(torch.get_num_threads())  # the threads every other side has
    index = ci.open_index(folder)
    pair = (1, queries.shape[1])
    start = time.perf_counter()
    _, exact = ci.search(index, pair, queries, 100)
    lines = [f"FAISS against exact search ({time.perf_counter() - start:.2f} s), {len(queries)} "
             f"queries x {index.num_docs} random unit vectors of {pair[1]} dims (no structure: a "
             "hard case for IVF and HNSW)"]
    for kind in ("flat", "ivf", "hnsw"):
        start = time.perf_counter()
        built = ci.faiss_index(index, pair, kind)
        built_s = time.perf_counter() - start
        _, rows = ci.faiss_search(built, queries, 100)
        lines.append(f"FAISS {kind}: recall@10 {ci.overlap_at_k(rows, exact, 10):.4f} recall@100 "
                     f"{ci.overlap_at_k(rows, exact, 100):.4f}; build {built_s:.1f} s, search "
                     f"{time.perf_counter() - start - built_s:.2f} s")
    return lines


def matmul_gflops(device):
    """This machine's float32 matmul rate: the fastest of 5 products of two 2048 x 2048 matrices."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    return 2 * 2048 ** 3 / fastest(lambda: (a @ b).sum().item(), 5) / 1e9


# ----------------------------------------------------------------------------------------------
# The real set: quality of the funnel, float16 storage, resumed encoding

def ndcg10(index, scores, rows, qids, qrels):
    return metrics.ndcg_at_k(ci.run_from_hits(index, scores, rows, qids), qrels, 10)


def load(name_or_path):
    model, tokenizer = models.load_model(name_or_path, torch.device("cpu"))
    model.eval()
    config, _ = models.read_config(models.resolve_model_path(name_or_path), model)
    return model, tokenizer, config


def encode_child(folder, model_name_or_path, shard_size):
    """Encode the real set into folder, printing the passages handed to the encoder so far (killed
    by the parent)."""
    model, tokenizer, config = load(model_name_or_path)
    corpus, _, _ = metrics.embedded_retrieval_set()

    # encode_2d tokenises each batch just before its forward pass
    def counting_tokenizer(texts, **kwargs):
        counting_tokenizer.passages += len(texts)
        print(f"ENCODED {counting_tokenizer.passages}", flush=True)
        return tokenizer(texts, **kwargs)
    counting_tokenizer.passages = 0
    encoded = ci.encode_corpus(model, counting_tokenizer, iter(corpus.items()), config.pairs,
                               folder, ci.EncodeSettings(config.pooling, 128, 8,
                                                         config.similarity == "cos", shard_size))
    print(f"RETURNED {encoded}", flush=True)


def resume_lost_work(folder, model_name_or_path, shard_size, threads, num_docs):
    """kill -9 the encoding once half the passages were handed to the encoder, resume; -> (redone /
    N, details)."""
    command = [
        sys.executable,
        os.path.abspath(__file__), "--encode_child", folder, "--model_name_or_path",
        model_name_or_path, "--resume_shard_size",
        str(shard_size), "--threads",
        str(threads)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    handed = 0
    for line in first.stdout:
        handed = int(line.split()[1]) if line.startswith("ENCODED") else handed
        if handed >= num_docs / 2:
            first.send_signal(signal.SIGKILL)
            break
    handed = max([handed] +
                 [int(line.split()[1]) for line in first.stdout if line.startswith("ENCODED")])
    first.wait()
    complete = sum(ci.shard_problem(folder, s) is None for s in range(-(-num_docs // shard_size)))
    second = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    resumed = int(second.stdout.split("RETURNED")[1])
    ci.open_index(folder)  # the resumed index is complete
    return (handed + resumed - num_docs) / num_docs, (handed, complete, resumed)


def row_bytes(path):
    """Bytes per row of a .npy file on disk: its size less the header, over its rows."""
    array = np.load(path, mmap_mode="r")
    return (os.path.getsize(path) - array.offset) / len(array)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.search_child:
        return search_child(*args.search_child, args.depth, args.device)
    if args.encode_child:
        return encode_child(args.encode_child, args.model_name_or_path, args.resume_shard_size)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_scale_", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    lines = []
    try:
        if not args.adaptive_only:
            # 1. Memory and time against corpus size: the same queries over 200k and 2M random unit
            #    vectors
            queries_path = os.path.join(workdir, "queries.pt")
            torch.save(random_queries(args.queries, args.dim, seed=1), queries_path)
            sizes = {"small": args.small_docs, "large": args.large_docs}
            for name, num_docs in sizes.items():
                seconds = write_random_index(os.path.join(workdir, name), num_docs, {1: args.dim},
                                             args.shard_size, seed=2)
                print(f"wrote {num_docs} x {args.dim} float16 in shards of {args.shard_size} "
                      f"({seconds:.1f} s)", flush=True)
            runs = {name: [] for name in sizes}
            for _ in range(2):  # alternating; the fastest time and the largest peak of each
                for name in sizes:
                    runs[name].append(
                        run_search_child(os.path.join(workdir, name), queries_path,
                                         os.path.join(workdir, f"{name}.json"), args.depth,
                                         args.threads, args.device))
            best = {name: min(r["seconds"] for r in runs[name]) for name in sizes}
            peak = {name: max(r["peak_mb"] for r in runs[name]) for name in sizes}
            before = {name: max(r["before_mb"] for r in runs[name]) for name in sizes}
            for name, num_docs in sizes.items():
                print(f"exact search, {args.queries} queries x {num_docs} x {args.dim}, depth "
                      f"{args.depth}: {best[name]:.2f} s, peak RSS during the search "
                      f"{peak[name]:.0f} MB ({before[name]:.0f} MB resident when it began)")
            print("\n".join(faiss_recall(os.path.join(workdir, "small"), torch.load(queries_path))))
            for name in sizes:
                shutil.rmtree(os.path.join(workdir, name))
            tag = f"{args.large_docs // 1000}k_vs_{args.small_docs // 1000}k".replace("000k", "M")
            lines += [f"RATIO peak_memory_{tag} {peak['large'] / peak['small']:.3f} goal <=1.3",
                      f"RATIO search_time_{tag} {best['large'] / best['small']:.2f} "
                      f"goal <={1.1 * args.large_docs / args.small_docs:g}"]

            # 2. FLOP rate of exact search against a dense matmul on this machine
            folder = os.path.join(workdir, "flops")
            write_random_index(folder, args.flop_docs, {1: args.flop_dim}, args.shard_size, seed=3)
            index = ci.open_index(folder)
            queries = random_queries(args.flop_queries, args.flop_dim, seed=4).to(args.device)
            # warm-up: files read once
            ci.search(index, (1, args.flop_dim), queries[:8], args.depth)
            installed = ci.faiss
            paths = {"FAISS": installed} if ci._uses_faiss(queries.device) else {}
            paths["torch.topk"] = None  # the path without FAISS, beside it
            seconds = {}
            for name, library in paths.items():
                ci.faiss = library
                seconds[name] = fastest(
                    lambda: ci.search(index, (1, args.flop_dim), queries, args.depth), 3)
            ci.faiss = installed
            flops = 2 * args.flop_queries * args.flop_docs * args.flop_dim
            rates = {name: flops / s / 1e9 for name, s in seconds.items()}
            matmul_rate = matmul_gflops(args.device)
            shutil.rmtree(folder)
            timings = ", ".join(f"{name} {seconds[name]:.2f} s = {rate:.1f} GFLOP/s"
                                for name, rate in rates.items())
            print(f"exact search {args.flop_queries} x {args.flop_docs} x {args.flop_dim} float16 "
                  f"shards, depth {args.depth}: {timings}; 2048^3 float32 matmul "
                  f"{matmul_rate:.1f} GFLOP/s")
            rate = next(iter(rates.values()))  # of the path that search takes here
            lines.append(
                f"RATIO exact_search_flop_rate_vs_matmul {rate / matmul_rate:.3f} goal >=0.5")

        # 3. The funnels (Eq. 14) and the precisions on the sharded index: speed on random vectors,
        #    quality on the real set
        pairs, ks = funnel.parse_funnel(args.adaptive)
        float_pairs, float_ks = funnel.parse_funnel(args.float_adaptive)
        last, first, kind = pairs[-1], pairs[0], args.adaptive_precision
        if float_pairs[-1] != last:
            raise ValueError(f"--adaptive and --float_adaptive end at other pairs ({last[0]}x"
                             f"{last[1]}, {float_pairs[-1][0]}x{float_pairs[-1][1]}): one "
                             "exhaustive search is the reference of both")
        folder = os.path.join(workdir, "adaptive")
        widths = ci.stored_widths(pairs + float_pairs)
        seconds = write_random_index(folder, args.adaptive_docs, widths, args.shard_size, seed=5)
        index = ci.open_index(folder)
        start = time.perf_counter()
        precision.write_codes(index)
        codes = precision.open_codes(index)
        print(f"wrote {args.adaptive_docs} documents at {widths} (layer: width), float16 "
              f"({seconds:.1f} s), then their binary and int8 codes "
              f"({time.perf_counter() - start:.1f} s)")
        # precisions at 1M: exhaustive search at an eighth, a quarter, half and all the last width
        table_dims = [widths[last[0]] // part for part in (8, 4, 2, 1)]
        q = {d: random_queries(args.block, d, seed=6 + d).to(args.device)
             for d in {d for _, d in pairs + float_pairs} | set(table_dims)}

        def product():
            return precision.quantized_funnel(codes, kind, pairs, [q[d] for _, d in pairs], ks, 10,
                                              args.block)
        exhaustive = functools.partial(ci.search, index, last, q[last[1]], 10, args.block)
        speedup, exhaustive_s, adaptive_s = median_ratio(exhaustive, product, args.rounds)
        first_share, _, _ = median_ratio(  # where the funnel's time goes: its first stage alone
            lambda: precision.search_codes(codes, first, kind, q[first[1]], ks[0], args.block),
            product, args.rounds)
        float_speedup, _, float_s = median_ratio(exhaustive, lambda: ci.adaptive_search(
            index, float_pairs, [q[d] for _, d in float_pairs], float_ks, 10, args.block),
                                                 args.rounds)
        print(f"over {args.adaptive_docs} documents in blocks of {args.block} queries: exhaustive "
              f"{last[0]}x{last[1]} float16 {exhaustive_s * 1000 / args.block:.2f} ms/query; "
              f"{args.adaptive} with a {kind} first stage {adaptive_s * 1000 / args.block:.2f} "
              f"ms/query ({speedup:.2f}x; its first stage alone, top {ks[0]}, {first_share:.2f} "
              f"of its time); {args.float_adaptive} float16 "
              f"{float_s * 1000 / args.block:.2f} ms/query ({float_speedup:.2f}x)")
        for d in table_dims:
            times = {p: fastest(functools.partial(precision.search_codes, codes, (last[0], d), p,
                                                  q[d], 10, args.block), 2)
                     for p in ("float16", "int8", "binary")}
            print(f"AT {args.adaptive_docs} {last[0]}x{d} exhaustive search, ms/query: " +
                  ", ".join(f"{p} ({precision.bytes_per_vector(d, p)} B/vector) "
                            f"{s * 1000 / args.block:.2f}" for p, s in times.items()))
        on_disk = [row_bytes(os.path.join(folder, ci.shard_name(0), name))
                   for name in (f"codes-{first[0]}-binary.npy", f"layer-{first[0]}.npy")]
        shutil.rmtree(folder)

        model, tokenizer, config = load(args.model_name_or_path)
        sb.check_pairs(sorted(set(pairs + float_pairs)), model.config.num_hidden_layers,
                       model.config.hidden_size)
        corpus, queries_text, qrels = metrics.embedded_retrieval_set()
        qids = list(queries_text)
        every_pair = list(dict.fromkeys(config.pairs + pairs + float_pairs))
        normalize = config.similarity == "cos"
        full_folder = os.path.join(workdir, "real_float32")
        start = time.perf_counter()
        ci.encode_corpus(model, tokenizer, iter(corpus.items()), every_pair, full_folder,
                         ci.EncodeSettings(config.pooling, 128, 64, normalize,
                                           shard_size=len(corpus), dtype="float32"))
        encode_rate = len(corpus) / (time.perf_counter() - start)
        indexes = {"float32": ci.open_index(full_folder),
                   "float16": ci.copy_index(full_folder, os.path.join(workdir, "real_float16"),
                                            "float16")}
        half = indexes["float16"]
        precision.write_codes(half)
        half_codes = precision.open_codes(half)
        q = models.encode_2d(model, tokenizer, [queries_text[x] for x in qids], every_pair,
                             config.pooling, 32, 64, normalize)
        exhaustive = ndcg10(half, *ci.search(half, last, q[last], 10), qids, qrels)
        kept = ndcg10(half, *precision.quantized_funnel(
            half_codes, kind, pairs, [q[p] for p in pairs], ks, 10), qids, qrels) / exhaustive
        float_kept = ndcg10(half, *ci.adaptive_search(
            half, float_pairs, [q[p] for p in float_pairs], float_ks, 10), qids, qrels) / exhaustive
        print(f"real set (wiki-ict, NON-STANDARD inverse-cloze): {len(corpus)} passages, "
              f"{len(qids)} queries, model {args.model_name_or_path}; shortlist {ks[0]} = "
              f"{ks[0] / len(corpus):.0%} of the real set, {ks[0] / args.adaptive_docs:.3%} of the "
              f"synthetic corpus; encode_corpus {encode_rate:.1f} passages/s (max_length 128, "
              f"pairs {every_pair} from one pass per batch, {args.threads} thread(s)); "
              f"{args.float_adaptive} float16 keeps {float_kept:.4f} of nDCG@10")
        lines += [f"RATIO adaptive_speedup_queries_in_blocks {speedup:.2f} goal >=10",
                  f"RATIO adaptive_ndcg10_kept {kept:.4f} goal >=0.99",
                  f"RATIO binary_bytes_vs_float16 {on_disk[0] / on_disk[1]:.4f} goal <=0.0625"]
        for pair in config.pairs:
            values = {
                dtype: ndcg10(index, *ci.search(index, pair, q[pair], 10), qids, qrels)
                for dtype, index in indexes.items()}
            print(f"FLOAT16 {pair[0]}x{pair[1]} nDCG@10 float32 {values['float32']:.4f} float16 "
                  f"{values['float16']:.4f} change {values['float16'] - values['float32']:+.5f}")
        results = precision.precision_results(indexes, config.pairs, q, qids, qrels,
                                              ("float32", "int8"))
        int8_kept = {pair: precision.kept(results, pair, "int8", (pair, "float32"))
                     for pair in config.pairs}
        print("INT8 nDCG@10 kept against float32 at the same pair: " + ", ".join(
            f"{n}x{d} {value:.4f}" for (n, d), value in int8_kept.items()))
        lines.append(f"RATIO int8_ndcg10_kept_min_pair {min(int8_kept.values()):.4f} goal >=0.99")

        if not args.adaptive_only:
            # 4. Resumed encoding: kill -9 half-way, resume
            lost, (handed, complete, resumed) = resume_lost_work(
                os.path.join(workdir, "resume"), args.model_name_or_path, args.resume_shard_size,
                args.threads, len(corpus))
            print(f"encoding {len(corpus)} passages in shards of {args.resume_shard_size}: killed "
                  f"after {handed} were handed to the encoder ({complete} shards complete); the "
                  f"resumed run encoded {resumed}")
            lines.append(f"RATIO encode_resume_lost_work {lost:.3f} goal <=0.1")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
