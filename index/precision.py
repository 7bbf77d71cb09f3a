"""Precision as a third axis beside depth and width: binary and int8 codes of an index's stored
vectors, searched by FAISS, the shortlist rescored in float (Eq. 14 with a precision axis).

    from index import corpus_index as ci, precision
    precision.write_codes(ci.open_index("index/msmarco"))  # once; old indexes gain codes too
    codes = precision.open_codes(ci.open_index("index/msmarco"))
    # Hamming search over 6x384's 48-byte codes, the top 400 rescored in float at 6x384
    scores, rows = precision.quantized_funnel(codes, "binary", [(6, 384), (6, 384)],
                                              [q[(6, 384)], q[(6, 384)]], [400])

Codes are computed per layer from the stored (raw, un-normalised) vectors of width D_n, so every
prefix (n, d) reads a prefix of them (Eq. 1):

- binary: the sign bits (x > 0) packed 8 to a byte, first dimension in the highest bit
  (np.packbits, big-endian): the first ceil(d/8) bytes hold the codes of the d-prefix; where d is
  not a multiple of 8, the bits past d are zeroed in the documents' last byte, as np.packbits pads
  the queries', so that they never differ. Signs do not change when a prefix is L2-normalised, so
  the codes serve cosine and dot-product indexes alike. Searched by FAISS's IndexBinaryFlat
  (Hamming distance H); the score is d - 2H, the dot product of the two +-1 sign vectors.
- int8: per dimension, 255 steps between the minimum and maximum of a calibration sample of the
  stored rows, offset -128 (sentence-transformers' quantize_embeddings), rounded and clipped.
  Per-dimension ranges serve every prefix. Searched by FAISS's exact inner-product search over the
  dequantised values, L2-normalised after truncation for a cosine index (Eq. 2); the queries stay
  in float (asymmetric).

Files, beside each shard's float vectors, written after the index is complete:

    codes.json                      calibration: sample rows, per layer the int8 ranges, and the
                                    SHA-256 of the vectors they were derived from
    shard-00000/codes-<n>-binary.npy  (rows, ceil(D_n / 8)) uint8
    shard-00000/codes-<n>-int8.npy    (rows, D_n) int8
    codes_complete.json             written last: every code file's size

Each code file is written to a temporary name, flushed and renamed, so it is whole or absent; a
run killed part-way resumes with the missing files. codes.json is kept apart from
index_config.json, which encode_corpus compares on every resume.
"""
import dataclasses
import glob
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from index import corpus_index as ci
import metrics
import models
import training

PRECISIONS = ("float32", "float16", "int8", "binary")
CODE_PRECISIONS = ("int8", "binary")  # stored as codes; float16 and float32 are the index itself
CODES = "codes.json"
CODES_MARKER = "codes_complete.json"
CODE_FORMAT = 1


def bytes_per_vector(d, precision):
    """Bytes of one (n, d) vector at a precision: 4d, 2d, d or ceil(d/8)."""
    return {"float32": 4 * d, "float16": 2 * d, "int8": d, "binary": -(-d // 8)}[precision]


# ----------------------------------------------------------------------------------------------
# Quantisation

def binary_codes(vectors):
    """(N, D) float -> (N, ceil(D / 8)) uint8: sign bits (x > 0), first dimension in the highest bit
    of the first byte, so the first ceil(d/8) bytes are the codes of the d-prefix (code_chunks
    zeroes the bits past d)."""
    return np.packbits(np.asarray(vectors) > 0, axis=1, bitorder="big")


def int8_ranges(sample):
    """(2, D) float32: each dimension's minimum and maximum over a calibration sample (N, D)."""
    sample = np.asarray(sample, dtype=np.float32)
    if not len(sample) or not np.isfinite(sample).all():
        raise ValueError("int8 calibration needs at least one finite row")
    return np.stack([sample.min(0), sample.max(0)])


def _steps(ranges):
    low, high = ranges
    return low, np.where(high > low, (high - low) / 255, 1).astype(np.float32)  # (D,) each


def int8_codes(vectors, ranges):
    """(N, d) float -> (N, d) int8: 255 steps per dimension between ranges[:, :d] (int8_ranges),
    offset -128; values outside the calibrated range are clipped to it."""
    low, step = _steps(ranges[:, :np.shape(vectors)[1]])
    steps = np.rint((np.asarray(vectors, dtype=np.float32) - low) / step)
    return (np.clip(steps, 0, 255) - 128).astype(np.int8)


def int8_values(codes, ranges):
    """(N, d) int8 codes -> (N, d) float32, the centre of each code's step (int8_codes inverted to
    within half a step)."""
    low, step = _steps(ranges[:, :codes.shape[1]])
    return (codes.astype(np.float32) + 128) * step + low


# ----------------------------------------------------------------------------------------------
# Codes on disk, beside the float shards

def _code_file(folder, shard, n, precision):
    return os.path.join(folder, ci.shard_name(shard), f"codes-{n}-{precision}.npy")


def calibration_sample(index, n, sample_rows):
    """(<= sample_rows + shards, D_n) float32: stored rows of layer n evenly spaced over the
    corpus."""
    step, parts = max(1, index.num_docs // sample_rows), []
    for shard, first in enumerate(index.shard_starts):
        layer = np.load(os.path.join(index.folder, ci.shard_name(shard), f"layer-{n}.npy"),
                        mmap_mode="r")
        parts.append(np.asarray(layer[(-first) % step::step], dtype=np.float32))
    return np.concatenate(parts)


def vectors_sha256(index):
    """{shard: {layer file: SHA-256}} of an index's stored vectors, from the shards' markers: what
    codes derived from them must match (a shard written again leaves codes of other vectors)."""
    return {str(shard): {name: entry["sha256"] for name, entry in
                         ci._read_marker(index.folder, shard)["files"].items()
                         if name.startswith("layer-")}
            for shard in range(len(index.shard_rows))}


def write_codes(index, sample_rows=10_000):
    """Binary and int8 codes of every layer of a complete index (corpus_index.open_index), derived
    from its stored vectors; resumable, each file whole or absent. The int8 ranges are calibrated
    on about sample_rows stored rows evenly spaced over the corpus; codes of other vectors (the
    index written again since) are removed and derived afresh. Returns the files written."""
    config_path = os.path.join(index.folder, CODES)
    vectors = vectors_sha256(index)
    config = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if config.get("vectors") != vectors:  # calibrated and coded from other vectors
            for path in glob.glob(os.path.join(index.folder, "shard-*", "codes-*.npy")):
                os.remove(path)
            config = None
        elif config["sample_rows"] != sample_rows:
            raise ValueError(f"{index.folder} holds codes calibrated on {config['sample_rows']} "
                             f"rows, not {sample_rows}: delete {CODES} and the code files first")
    if config is None:
        config = {"format": CODE_FORMAT, "sample_rows": sample_rows, "vectors": vectors, "ranges": {
            str(n): int8_ranges(calibration_sample(index, n, sample_rows)).tolist()
            for n in index.widths}}
        ci._write_json(config_path, config)
    written, sizes = 0, {}
    for shard in range(len(index.shard_rows)):
        for n in index.widths:
            layer = np.load(ci._layer_file(index, shard, n), mmap_mode="r")
            for precision in CODE_PRECISIONS:
                path = _code_file(index.folder, shard, n, precision)
                if not os.path.exists(path):
                    ranges = np.array(config["ranges"][str(n)], dtype=np.float32)
                    ci._save_npy(path, binary_codes(layer) if precision == "binary" else
                                 int8_codes(layer, ranges))
                    written += 1
                sizes[os.path.relpath(path, index.folder)] = os.path.getsize(path)
    ci._write_json(os.path.join(index.folder, CODES_MARKER), {"files": sizes})
    return written


@dataclass(frozen=True)
class IndexCodes:
    """An index with its codes written (write_codes): the int8 ranges {n: (2, D_n)}."""
    index: ci.CorpusIndex
    ranges: dict


def open_codes(index):
    """The codes of a complete index, checked whole (every file of the size written)."""
    try:
        with open(os.path.join(index.folder, CODES_MARKER)) as f:
            sizes = json.load(f)["files"]
        with open(os.path.join(index.folder, CODES)) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{index.folder} has no complete codes: run index.precision.write_codes "
                         "on it") from None
    problem = training.files_problem(index.folder, sizes)
    if config.get("vectors") != vectors_sha256(index):
        problem = "its codes were derived from other vectors (written again since)"
    if problem:
        raise ValueError(f"{index.folder}: {problem}; run index.precision.write_codes on it")
    return IndexCodes(index, {int(n): np.array(r, dtype=np.float32)
                              for n, r in config["ranges"].items()})


# ----------------------------------------------------------------------------------------------
# Search over codes: the first stage

def _binary_top(queries, codes, m):
    """The m best (scores, columns) (Qb, m) of a chunk's binary codes (C, B) for the queries'
    codes (Qb, B), by FAISS's Hamming search; score 8B - 2 Hamming (search_codes: d - 2H)."""
    searched = faiss_binary_index(codes.numpy())
    hamming, columns = searched.search(np.ascontiguousarray(queries.numpy()), m)
    return (torch.from_numpy(searched.d - 2 * hamming.astype(np.float32)),
            torch.from_numpy(columns))


def faiss_binary_index(codes):
    """A FAISS IndexBinaryFlat holding codes (N, B) uint8 (Hamming distance over 8B bits)."""
    if ci.faiss is None:
        raise ValueError("binary search needs FAISS: pip install faiss-cpu")
    ci.faiss.omp_set_num_threads(torch.get_num_threads())
    built = ci.faiss.IndexBinaryFlat(codes.shape[1] * 8)
    built.add(np.ascontiguousarray(codes))
    return built


def _binary_chunk_top(queries, codes, k):
    # room for ties: Hamming distances are integers, many documents share the k-th
    return ci._chunk_top(queries, codes, k, _binary_top, ties=k + ci.TIES)


def code_chunks(codes, pair, precision, chunk_rows):
    """(first global row, chunk, docid ranks (C,)) shard by shard: binary codes (C, ceil(d/8))
    uint8, or int8 codes dequantised to float32 (C, d), L2-normalised after truncation for cosine
    (Eq. 2)."""
    index, (n, d) = codes.index, pair
    out = torch.empty(min(chunk_rows, max(index.shard_rows)), d)  # (C, d), reused
    low, step = map(torch.from_numpy, _steps(codes.ranges[n][:, :d]))  # (d,) each
    for shard, (first, rows) in enumerate(zip(index.shard_starts, index.shard_rows)):
        stored = ci._map(_code_file(index.folder, shard, n, precision))
        ranks = torch.from_numpy(
            np.array(ci._map(os.path.join(index.folder, ci.DOCID_RANK))[first:first + rows]))
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            if precision == "binary":
                chunk = np.ascontiguousarray(stored[start:stop, :-(-d // 8)])
                if d % 8:  # the bits past d: zero, as np.packbits pads the queries' codes
                    chunk = chunk.copy()
                    chunk[:, -1] &= (0xFF << (8 - d % 8)) & 0xFF
                chunk = torch.from_numpy(chunk)
            else:  # int8_values in place, in torch: one buffer, no temporaries
                chunk = out[:stop - start].copy_(torch.from_numpy(stored[start:stop, :d]))
                chunk.add_(128).mul_(step).add_(low)
                if index.normalize:  # Eq. 2, as corpus_index._prepare
                    chunk.div_(chunk.norm(dim=1, keepdim=True).clamp_min(1e-12))
            yield first + start, chunk, ranks[start:stop]
        del stored


@torch.no_grad()
def search_codes(codes, pair, precision, queries, depth=1000, query_block=1024):
    """Exhaustive search at one pair over its codes -> (scores, rows), each (Q, min(depth, N)), in
    trec_eval's order (score descending, ties by docid).

    queries (Q, d) float, as for corpus_index.search. binary: the queries' sign bits against the
    documents' by FAISS's IndexBinaryFlat, score d - 2 Hamming, one shard at a time; int8: the
    float queries against the dequantised documents by FAISS's flat inner-product search. The
    index's own dtype (float16 or float32) is corpus_index.search over the stored vectors; the
    other one needs a copy of that dtype (corpus_index.copy_index).
    """
    index = codes.index
    ci._check_pair(index, pair)
    queries = ci._check_queries(index, pair, queries)
    if depth < 1:
        raise ValueError(f"depth {depth} must be positive")
    if precision == index.dtype:
        return ci.search(index, pair, queries, depth, query_block)
    if precision not in CODE_PRECISIONS:
        raise ValueError(f"precision {precision!r} of an index stored in {index.dtype}: use "
                         f"{index.dtype}, int8 or binary (another float dtype: "
                         "corpus_index.copy_index)")
    k = min(depth, index.num_docs)
    if precision == "binary":
        stream = code_chunks(codes, pair, precision, max(index.shard_rows))
        scores, rows = ci.search_stream(stream, torch.from_numpy(binary_codes(queries.cpu())), k,
                                        query_block, _binary_chunk_top)
        return scores - (8 * bytes_per_vector(pair[1], "binary") - pair[1]), rows  # d - 2H
    chunk_rows = ci.default_chunk_rows(min(len(queries), query_block), pair[1], queries.device)
    return ci.search_stream(code_chunks(codes, pair, precision, chunk_rows), queries, k,
                            query_block, ci._chunk_top)


@torch.no_grad()
def quantized_funnel(codes, precision, pairs, queries, ks, depth=10, query_block=1024):
    """Eq. 14 with a precision axis: top-k_1 at pairs[0] over its codes (search_codes), then each
    later pair rescoring the shortlist in float (corpus_index.rescore) -> (scores, rows), each
    (Q, min(depth, k_last, N)), best first by the last pair, in trec_eval's order."""
    if len(pairs) != len(queries) or len(ks) != len(pairs) - 1:
        raise ValueError(f"a funnel of {len(pairs)} pairs needs as many query matrices and "
                         f"{len(pairs) - 1} ks")
    for pair in pairs:
        ci._check_pair(codes.index, pair)
    keep = ci.funnel_keep(codes.index, ks, depth)
    scores, rows = search_codes(codes, pairs[0], precision, queries[0], keep[0], query_block)
    for pair, stage_queries, k in zip(pairs[1:], queries[1:], keep[1:]):
        scores, rows = ci.rescore(codes.index, pair, stage_queries, rows, k)
    return scores, rows


# ----------------------------------------------------------------------------------------------
# The trade-off: every pair at every precision against float32 exhaustive search

def precision_results(indexes, pairs, queries, qids, qrels, precisions):
    """{(n, d): {precision: {bytes, nDCG@10, R@100, ms/q}}}: exhaustive search (depth 100) at every
    pair and precision. indexes: {"float32": index, "float16": index with codes (write_codes)}
    (either may be missing where no precision needs it; codes come from the float16 one, else the
    float32 one); queries {pair: (Q, d)} as for search."""
    with_codes = indexes.get("float16") or indexes["float32"]
    missing = {"float16", "float32"} & set(precisions) - set(indexes)
    if missing:
        raise ValueError(f"precisions {sorted(missing)} need an index of that dtype")
    codes = open_codes(with_codes) if set(CODE_PRECISIONS) & set(precisions) else None
    results = {}
    for pair in pairs:
        for precision in precisions:
            index = with_codes if precision in CODE_PRECISIONS else indexes[precision]
            start = time.perf_counter()
            if precision in CODE_PRECISIONS:
                scores, rows = search_codes(codes, pair, precision, queries[pair], 100)
            else:
                scores, rows = ci.search(index, pair, queries[pair], 100)
            seconds = time.perf_counter() - start
            run = ci.run_from_hits(index, scores, rows, qids)
            results.setdefault(pair, {})[precision] = {
                "bytes": bytes_per_vector(pair[1], precision),
                "nDCG@10": metrics.ndcg_at_k(run, qrels, 10),
                "R@100": metrics.recall_at_k(run, qrels, 100),
                "ms/q": seconds * 1000 / len(qids)}
    return results


def kept(results, pair, precision, reference, metric="nDCG@10"):
    """A metric at (pair, precision) over the same metric at reference (pair, precision)."""
    denominator = results[reference[0]][reference[1]][metric]
    return results[pair][precision][metric] / denominator if denominator else float("nan")


def format_table(results, full):
    """Markdown: one row per pair and precision; kept against float32 at the full pair and, for
    quantised rows, against float32 at the same pair."""
    lines = ["| pair | precision | bytes/vector | nDCG@10 | R@100 | nDCG@10 kept (full pair) | "
             "R@100 kept (full pair) | nDCG@10 kept (same pair) | ms/query |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pair, by_precision in results.items():
        for precision, values in by_precision.items():
            same = (f"{kept(results, pair, precision, (pair, 'float32')):.4f}"
                    if "float32" in by_precision else "")
            lines.append(
                f"| {pair[0]}x{pair[1]} | {precision} | {values['bytes']} | "
                f"{values['nDCG@10']:.4f} | {values['R@100']:.4f} | "
                f"{kept(results, pair, precision, (full, 'float32')):.4f} | "
                f"{kept(results, pair, precision, (full, 'float32'), 'R@100'):.4f} | {same} | "
                f"{values['ms/q']:.3f} |")
    return "\n".join(lines)


def format_compact(results, precisions=("int8", "binary")):
    """Markdown, one row per precision and one column per pair: nDCG@10 kept against float32 at the
    same pair, and bytes per vector ('-' where a pair has no such codes)."""
    pairs = list(results)
    lines = ["| nDCG@10 kept (bytes/vector) | " + " | ".join(f"{n}x{d}" for n, d in pairs) + " |",
             "|---|" + "---:|" * len(pairs)]
    for precision in precisions:
        cells = [f"{kept(results, pair, precision, (pair, 'float32')):.4f} "
                 f"({results[pair][precision]['bytes']})" if precision in results[pair] else "-"
                 for pair in pairs]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coded_indexes(model, tokenizer, corpus, pairs, folder, encoding):
    """An in-memory corpus {docid: text} encoded once into folder/float32 (encoding: a
    corpus_index.EncodeSettings, its dtype ignored), copied to folder/float16, codes written from
    the float16 vectors (what an index stores by default) -> {"float32": ..., "float16": index}."""
    full = os.path.join(folder, "float32")
    ci.encode_corpus(model, tokenizer, iter(corpus.items()), pairs, full,
                     dataclasses.replace(encoding, dtype="float32"))
    indexes = {"float32": ci.open_index(full),
               "float16": ci.copy_index(full, os.path.join(folder, "float16"), "float16")}
    write_codes(indexes["float16"])
    return indexes


# ----------------------------------------------------------------------------------------------
# evaluate.py --precision: every pair at one precision beside float32

def evaluate_precision(name_or_path, datasets, settings, device, precision):
    """{dataset: {"n x d": {"float32": {...}, precision: {...}}}} (precision_results' values) for
    every pair of one model and every retrieval dataset. In-memory corpora (the embedded set) are
    encoded into a temporary folder; corpora read from files into their index under
    settings.index_dir (retrieval.index_folder), whose stored dtype is then the reference."""
    from index import retrieval
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"--precision {precision}: use one of {', '.join(PRECISIONS[1:])}")
    path, _, model, tokenizer, config, separate = metrics.load_for_evaluation(
        name_or_path, settings, device)
    if separate:
        raise ValueError(f"--precision needs one 2D model; {path} holds one model per layer")
    normalize = config.similarity == "cos"
    encoding = ci.EncodeSettings(config.pooling, settings.passage_max_len, settings.batch_size,
                                 normalize, settings.shard_size)
    results = {}
    for name, (kind, (corpus, queries, qrels)) in datasets.items():
        if kind != "retrieval":
            continue
        qids = list(queries)
        q = models.encode_2d(model, tokenizer, [queries[x] for x in qids], config.pairs,
                             config.pooling, settings.query_max_len, settings.batch_size,
                             normalize)
        with tempfile.TemporaryDirectory(prefix="precision_") as scratch:
            if isinstance(corpus, metrics.CorpusFile):
                index = retrieval.encoded_index(model, tokenizer, retrieval.index_folder(
                    settings, path, name), corpus, config, settings)
                indexes = {index.dtype: index}
                if precision in ("float16", "float32") and precision != index.dtype:
                    indexes[precision] = ci.copy_index(index.folder, os.path.join(
                        scratch, precision), precision)
                elif precision in CODE_PRECISIONS:  # under torchrun rank 0 writes, the rest wait
                    rank, world_size = training.rank_and_world_size()
                    if rank == 0:
                        write_codes(index)
                    if world_size > 1:
                        torch.distributed.barrier()
                reference = index.dtype
            else:
                indexes, reference = coded_indexes(model, tokenizer, corpus, config.pairs,
                                                   scratch, encoding), "float32"
            found = precision_results(indexes, config.pairs, q, qids, qrels,
                                      list(dict.fromkeys([reference, precision])))
        results[name] = {f"{n}x{d}": values for (n, d), values in found.items()}
    return results


def print_precision(results, model_name):
    """One table per dataset: each pair at the reference and at the asked precision, and what the
    precision keeps of the reference's nDCG@10 and R@100 at the same pair."""
    lines = []
    for dataset, by_pair in results.items():
        precisions = list(next(iter(by_pair.values())))  # [reference, asked] or [reference]
        reference, asked = precisions[0], precisions[-1]
        lines.append(f"\n{dataset} at {asked} beside {reference} (exhaustive search), model "
                     f"{model_name}")
        lines.append(f"{'pair':<8}{'bytes':>7}{'nDCG@10':>9}{'R@100':>8}{'bytes':>7}{'nDCG@10':>9}"
                     f"{'R@100':>8}{'nDCG kept':>11}{'R@100 kept':>12}")
        for pair, values in by_pair.items():
            ref, got = values[reference], values[asked]
            lines.append(
                f"{pair:<8}{ref['bytes']:>7}{ref['nDCG@10']:>9.4f}{ref['R@100']:>8.4f}"
                f"{got['bytes']:>7}{got['nDCG@10']:>9.4f}{got['R@100']:>8.4f}"
                f"{kept(by_pair, pair, asked, (pair, reference)):>11.4f}"
                f"{kept(by_pair, pair, asked, (pair, reference), 'R@100'):>12.4f}")
    text = "\n".join(lines)
    print(text)
    return text
