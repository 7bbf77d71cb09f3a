"""Paper-scale retrieval: a corpus encoded once to a sharded on-disk 2D index, and exact search streamed over it.

    import corpus_index as ci, data, starbucks as sb
    ci.encode_corpus(model, tokenizer, data.stream_msmarco_collection("collection.tsv"), pairs, "index/msmarco",
                     pooling="cls", max_length=196)                    # resumable; torchrun: one slice of shards per rank
    index = ci.open_index("index/msmarco")
    q = sb.encode_2d(model, tokenizer, query_texts, pairs, "cls", 32, normalize=index.normalize)
    scores, rows = ci.search(index, (12, 768), q[(12, 768)], depth=1000)          # (Q, 1000) each, exact
    scores, rows = ci.adaptive_search(index, [(2, 32), (12, 768)], [q[(2, 32)], q[(12, 768)]], [200])  # Eq. 14
    run = ci.run_from_hits(index, scores, rows, qids)                               # {qid: {docid: score}}

An index folder (every .npy memory-mappable):

    index_config.json               what was encoded: pairs, stored width per layer, dtype, pooling, max_length, ...
    shard-00000/layer-<n>.npy       (rows, D_n): pool(h^(n))[:D_n], D_n the widest d of layer n's pairs (Eq. 1)
    shard-00000/docids.npy          (rows,): the docids as UTF-8 bytes
    shard-00000/shard_complete.json written last: rows, size and sha256 of every file, sha256 of the source text
    docid_rank.npy                  (N,): each row's position in docid string order (trec_eval's tie order)
    index_complete.json             written last of all: shard sizes, number of documents

Narrower pairs of a layer are prefixes of its stored width (Eq. 1), so nothing is stored twice. The vectors
are stored raw, not normalised: for cosine similarity Eq. 2 normalises after truncation, so the search
normalises each pair's first d coordinates when it reads them (a unit vector at width D_n would do too,
normalisation being scale-invariant, but raw vectors also serve dot-product models unchanged).

Search memory is O(Q x depth) for the running top-k lists, plus one shard's mapped file and one chunk's
scores (16 MB), whatever the corpus size N. The lists order documents by one int64 key, (score, docid rank),
so ties come out as trec_eval orders them: score descending, then docid descending as strings. Scores are
float32 (float16 storage is converted chunk by chunk). A chunk is scored in tiles of rows small enough that a
tile's scores are still in cache when their maximum per group of 64 is taken; only the groups whose maximum
reaches a query's current k-th score are looked into, so after the first chunks the top-k costs about one
pass of max over the scores. At depths of 512 and more, each list starts at a floor taken from a sample of the
corpus, which skips most of what the first chunks would have let in (exact: a list left short is searched again).
"""
import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

import checkpoints
import distributed
import starbucks as sb

FORMAT = 1
CONFIG = "index_config.json"
SHARD_MARKER = "shard_complete.json"
INDEX_MARKER = "index_complete.json"
DOCID_RANK = "docid_rank.npy"
DTYPES = {"float16": np.float16, "float32": np.float32}
EMPTY = torch.iinfo(torch.int64).min  # the key of an empty slot in a top-k list: below every document
GROUP = 64  # scores per group in the top-k pre-filter: one max per group is compared with the k-th score
TILE_BYTES = 2 ** 20  # one matmul's scores, kept in cache for their group maxima
SCORE_BYTES = 2 ** 24  # one chunk's scores: the top-k lists are merged once per chunk
GPU_SCORE_BYTES = 2 ** 29  # one chunk's scores on a GPU, scored in one matmul
SEED_RANK = 64  # a seeded search starts each list at the SEED_RANK-th best score of a sample (seed_floors)
_BAD_DOCID = re.compile(r"[\s\x00]")  # TREC run files split on whitespace; numpy bytes drop trailing NULs


# ----------------------------------------------------------------------------------------------
# Writing: shards, each complete or ignored

def stored_widths(pairs):
    """Eq. 1: {n: D_n}, the widest d that any pair of layer n needs; every (n, d) is a prefix of it."""
    widths = {}
    for n, d in pairs:
        widths[n] = max(widths.get(n, 0), d)
    return dict(sorted(widths.items()))


def shard_name(shard):
    return f"shard-{shard:05d}"


def _write_json(path, value):
    """Atomically: a temporary file, flushed to disk, renamed into place."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    checkpoints.fsync(os.path.dirname(os.path.abspath(path)))


def write_shard(folder, shard, docids, vectors, source_sha256=""):
    """Write shard number `shard` atomically: files into a hidden folder, each flushed, the marker last, one rename.

    docids: list of str; vectors: {n: (rows, D_n) numpy array in the storage dtype}. A crash leaves either the
    complete shard or a hidden folder that no reader opens.
    """
    final, tmp = os.path.join(folder, shard_name(shard)), os.path.join(folder, f".{shard_name(shard)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    arrays = {"docids.npy": np.array([docid.encode("utf-8") for docid in docids])}  # (rows,) fixed-width bytes
    arrays.update({f"layer-{n}.npy": v for n, v in vectors.items()})
    marker = {"rows": len(docids), "source_sha256": source_sha256, "files": {}}
    for name, array in arrays.items():
        if len(array) != len(docids):
            raise ValueError(f"{name} has {len(array)} rows for {len(docids)} docids")
        path = os.path.join(tmp, name)
        np.save(path, array)
        checkpoints.fsync(path)
        marker["files"][name] = {"bytes": os.path.getsize(path), "sha256": checkpoints.sha256_of(path)}
    _write_json(os.path.join(tmp, SHARD_MARKER), marker)
    if os.path.exists(final):  # an earlier attempt whose marker did not match its files
        shutil.rmtree(final)
    os.rename(tmp, final)
    checkpoints.fsync(folder)


def shard_problem(folder, shard, check_hashes=False):
    """None if the shard is complete (marker present, every file of the size written), else what is wrong."""
    path = os.path.join(folder, shard_name(shard))
    try:
        with open(os.path.join(path, SHARD_MARKER)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return "no completeness marker (its encoding did not finish)"
    except (ValueError, KeyError, TypeError):
        return "the completeness marker is unreadable"
    problem = checkpoints.files_problem(path, {name: written["bytes"] for name, written in files.items()})
    if problem or not check_hashes:
        return problem
    for name, written in files.items():
        if checkpoints.sha256_of(os.path.join(path, name)) != written["sha256"]:
            return f"{name} does not have the sha256 it was written with"
    return None


def _read_marker(folder, shard):
    with open(os.path.join(folder, shard_name(shard), SHARD_MARKER)) as f:
        return json.load(f)


def index_config(pairs, dtype="float16", shard_size=100_000, pooling="cls", max_length=128, normalize=False):
    """What an index folder records about its encoding; resuming with anything else is refused."""
    if dtype not in DTYPES:
        raise ValueError(f"storage dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be positive")
    return {"format": FORMAT, "pairs": [list(p) for p in pairs],
            "widths": {str(n): d for n, d in stored_widths(pairs).items()}, "dtype": dtype, "shard_size": shard_size,
            "pooling": pooling, "max_length": max_length, "normalize": normalize}


def start_index(folder, config):
    """Create the folder and its config, or check that an existing one was started with the same config."""
    path = os.path.join(folder, CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config:
            changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise ValueError(f"{folder} holds an index encoded with other settings ({', '.join(changed)}); "
                             f"use a new folder, or the settings it was started with")
        return
    os.makedirs(folder, exist_ok=True)
    _write_json(path, config)


def finalize_index(folder, num_shards):
    """Check every shard, then write each row's rank in docid string order and, last, the index marker.

    Holds every docid once, as fixed-width bytes (MS MARCO's 8.8M pids: about 62 MB); nothing else.
    """
    with open(os.path.join(folder, CONFIG)) as f:
        shard_size = json.load(f)["shard_size"]
    if num_shards == 0:
        raise ValueError(f"{folder}: the corpus has no documents")
    shard_rows = []
    for shard in range(num_shards):
        problem = shard_problem(folder, shard)
        if problem:
            raise ValueError(f"{os.path.join(folder, shard_name(shard))}: {problem}")
        shard_rows.append(_read_marker(folder, shard)["rows"])
    if any(rows != shard_size for rows in shard_rows[:-1]) or not 0 < shard_rows[-1] <= shard_size:
        raise ValueError(f"{folder}: shards of {shard_rows} rows do not make an index of shards of {shard_size}")
    docids = np.concatenate([np.load(os.path.join(folder, shard_name(s), "docids.npy")) for s in range(num_shards)])
    order = np.argsort(docids, kind="stable")  # UTF-8 byte order = Python's str order = trec_eval's strcmp
    in_order = docids[order]
    repeated = np.flatnonzero(in_order[1:] == in_order[:-1])
    if len(repeated):
        raise ValueError(f"docid {in_order[repeated[0]].decode()!r} occurs more than once in the corpus")
    docid_rank = np.empty(len(docids), dtype=np.int64)
    docid_rank[order] = np.arange(len(docids))  # (N,)
    path = os.path.join(folder, DOCID_RANK)
    with open(path + ".tmp", "wb") as f:
        np.save(f, docid_rank)
    checkpoints.fsync(path + ".tmp")
    os.replace(path + ".tmp", path)
    _write_json(os.path.join(folder, INDEX_MARKER),
                {"num_docs": len(docids), "shard_rows": shard_rows,
                 "docid_rank": {"bytes": os.path.getsize(path), "sha256": checkpoints.sha256_of(path)}})


# ----------------------------------------------------------------------------------------------
# Encoding a corpus (Eq. 1), once, to disk

@torch.no_grad()
def encode_corpus(model, tokenizer, docs, pairs, folder, pooling="cls", max_length=128, batch_size=64,
                  normalize=False, shard_size=100_000, dtype="float16", progress=None):
    """Eq. 1 for a whole corpus, to disk, one shard of `shard_size` documents at a time; resumable.

    docs: an iterable of (docid, text), read once in order (data.stream_beir_corpus, data.stream_msmarco_collection);
    only one shard's texts are held. Each shard is one sb.encode_2d call (one forward pass per batch, up to the
    largest layer), stored per layer at the widest d of its pairs, raw; normalize=True records that the pairs
    are compared by cosine, which the search applies after truncation (Eq. 2). A shard complete on disk and
    encoded from the same text is skipped, so a run killed at any point resumes at its first missing shard.
    Under torchrun, rank r encodes shards r, r + W, ...; rank 0 then checks them all and writes the docid ranks
    and the index marker. Returns the number of documents this process encoded.
    """
    config = index_config(pairs, dtype, shard_size, pooling, max_length, normalize)
    rank, world_size = distributed.rank_and_world_size()
    if rank == 0:
        start_index(folder, config)
    if world_size > 1:
        torch.distributed.barrier()
    start_index(folder, config)  # every rank checks the folder it will write into
    layer_pairs = list(stored_widths(pairs).items())  # [(n, D_n)]: one embedding per layer, the widest
    encoded, shard, docids, texts, digest = 0, 0, [], [], hashlib.sha256()

    def finish_shard():
        """Encode and write the shard just read, unless it is another rank's or already on disk from the same text."""
        nonlocal encoded
        if shard % world_size != rank:
            return
        if shard_problem(folder, shard) is None:
            if _read_marker(folder, shard)["source_sha256"] != digest.hexdigest():
                raise ValueError(f"{os.path.join(folder, shard_name(shard))} was encoded from other text than "
                                 f"documents {shard * shard_size}..{shard * shard_size + len(docids) - 1} of this "
                                 f"corpus; an index folder belongs to one corpus")
            return
        embeddings = sb.encode_2d(model, tokenizer, texts, layer_pairs, pooling, max_length, batch_size,
                                  normalize=False, progress=progress)  # {(n, D_n): (rows, D_n)}
        vectors = {}
        for n, width in layer_pairs:
            vectors[n] = embeddings[(n, width)].numpy().astype(DTYPES[dtype])  # (rows, D_n)
            if not np.isfinite(vectors[n]).all():
                raise ValueError(f"layer {n}'s embeddings of shard {shard} are not finite in {dtype} "
                                 f"(too large for float16?); encode with dtype='float32'")
        write_shard(folder, shard, docids, vectors, digest.hexdigest())
        encoded += len(texts)

    read = 0
    for docid, text in docs:
        if not docid or _BAD_DOCID.search(docid):
            raise ValueError(f"document {read}: docid {docid!r} is empty or holds whitespace or NUL")
        if shard % world_size == rank:
            digest.update(f"{docid}\t{text}\n".encode("utf-8"))
            docids.append(docid)
            texts.append(text)
        read += 1
        if read % shard_size == 0:
            finish_shard()
            shard, docids, texts, digest = shard + 1, [], [], hashlib.sha256()
    if read % shard_size:  # a last, shorter shard
        finish_shard()
        shard += 1
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        finalize_index(folder, shard)
    if world_size > 1:
        torch.distributed.barrier()
    return encoded


# ----------------------------------------------------------------------------------------------
# Reading

@dataclass(frozen=True)
class CorpusIndex:
    """A complete index folder; nothing is loaded until a search reads it, shard by shard."""
    folder: str
    pairs: list  # [(n, d)] it was encoded for
    widths: dict  # {n: D_n} stored per layer
    normalize: bool  # cosine: each pair's prefix is L2-normalised after truncation (Eq. 2)
    dtype: str  # storage dtype
    shard_rows: list  # rows of every shard, in order

    @property
    def num_docs(self):
        return sum(self.shard_rows)

    @property
    def shard_starts(self):
        return np.cumsum([0] + self.shard_rows[:-1]).tolist()  # first global row of every shard


def open_index(folder, check_hashes=False):
    """The index in `folder`, checked complete (its marker, every shard's files of the size written)."""
    try:
        with open(os.path.join(folder, INDEX_MARKER)) as f:
            marker = json.load(f)
        with open(os.path.join(folder, CONFIG)) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a complete index: its encoding did not finish "
                         f"(encode_corpus again into the same folder resumes it)") from None
    for shard in range(len(marker["shard_rows"])):
        problem = shard_problem(folder, shard, check_hashes)
        if problem:
            raise ValueError(f"{os.path.join(folder, shard_name(shard))}: {problem}")
    rank_file = os.path.join(folder, DOCID_RANK)
    if not os.path.exists(rank_file) or os.path.getsize(rank_file) != marker["docid_rank"]["bytes"] or \
            (check_hashes and checkpoints.sha256_of(rank_file) != marker["docid_rank"]["sha256"]):
        raise ValueError(f"{rank_file} is missing or not as written")
    return CorpusIndex(folder, [tuple(p) for p in config["pairs"]], {int(n): d for n, d in config["widths"].items()},
                       config["normalize"], config["dtype"], marker["shard_rows"])


def _layer_file(index, shard, n):
    return os.path.join(index.folder, shard_name(shard), f"layer-{n}.npy")


def _check_pair(index, pair):
    n, d = pair
    if n not in index.widths or not 1 <= d <= index.widths[n]:
        raise ValueError(f"pair {n}x{d} is not in the index (stored widths per layer: {index.widths})")


def _prepare(stored, normalize, out):
    """Stored rows (C, d) -> float32 vectors of one pair, written into out (at least C rows); for cosine normalised
    after truncation (Eq. 2). The same values as F.normalize (tested), in place: a buffer reused for every chunk
    costs no fresh pages (a page fault per 4 KB of a fresh array, per chunk).
    """
    vectors = out[:len(stored)].copy_(torch.from_numpy(stored))  # (C, d); float16 -> float32 is exact
    return vectors.div_(vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)) if normalize else vectors


def _map(path):
    """A .npy file memory-mapped copy-on-write: writable for torch.from_numpy, and nothing ever reaches the file."""
    return np.load(path, mmap_mode="c")


def chunks(index, pair, chunk_rows):
    """(first global row, vectors (C, d) float32, docid ranks (C,)) of consecutive rows, shard by shard.

    One shard's layer file is mapped at a time, so resident memory stays one shard however large the index.
    The vectors of every chunk are written into the same buffer: use (or copy) them before taking the next.
    """
    n, d = pair
    out = torch.empty(min(chunk_rows, max(index.shard_rows)), d)  # (C, d), reused
    for shard, (first, rows) in enumerate(zip(index.shard_starts, index.shard_rows)):
        layer = _map(_layer_file(index, shard, n))  # (rows, D_n)
        ranks = torch.from_numpy(np.array(_map(os.path.join(index.folder, DOCID_RANK))[first:first + rows]))
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            yield first + start, _prepare(layer[start:stop, :d], index.normalize, out), ranks[start:stop]
        del layer


def read_rows(index, pair, rows):
    """Vectors (M, d) float32 of global rows (M,), read from the shards' files (Eq. 2: normalised for cosine).

    Each row's first d values are read with one pread, in file order, the preads of a shard looped over in C
    (map): through a freshly mapped file, rows spread over the corpus cost a page fault each (most of the
    funnel's rerank) and leave every file's pages resident.
    """
    n, d = pair
    rows = rows.cpu().numpy()
    order = np.argsort(rows, kind="stable")  # (M,) file order
    in_order = rows[order]
    ends = np.searchsorted(in_order, index.shard_starts[1:] + [index.num_docs])  # (shards,) end of each in in_order
    stored = np.empty((len(rows), d), dtype=DTYPES[index.dtype])  # (M, d) as stored
    row_bytes, prefix_bytes = index.widths[n] * stored.itemsize, d * stored.itemsize
    for shard, (start, end) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist())):
        if start == end:
            continue
        path = _layer_file(index, shard, n)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            positions = f.tell() + (in_order[start:end] - index.shard_starts[shard]) * row_bytes  # after the header
            read = b"".join(map(functools.partial(os.pread, f.fileno(), prefix_bytes), positions.tolist()))
        if len(read) != (end - start) * prefix_bytes:  # a short read would shift every row after it
            raise ValueError(f"{path} is shorter than when the index was opened: re-open it (open_index)")
        stored[order[start:end]] = np.frombuffer(read, dtype=stored.dtype).reshape(end - start, d)
    return _prepare(stored, index.normalize, torch.empty(len(rows), d))


def gather(index, pair, rows):
    """Vectors (M, d) float32 (read_rows) and docid ranks (M,) of global rows (M,)."""
    ranks = _map(os.path.join(index.folder, DOCID_RANK))[rows.cpu().numpy()]
    return read_rows(index, pair, rows), torch.from_numpy(ranks)


def docids(index, rows):
    """The docid (str) of every global row in a (Q, k) or (M,) tensor, as nested lists of the same shape."""
    flat = rows.reshape(-1).cpu()
    names = [None] * len(flat)
    shard_of = torch.searchsorted(torch.tensor(index.shard_starts), flat, right=True) - 1
    for shard in shard_of.unique().tolist():
        mine = (shard_of == shard).nonzero().squeeze(1)
        stored = np.load(os.path.join(index.folder, shard_name(shard), "docids.npy"), mmap_mode="r")
        for position, name in zip(mine.tolist(), stored[(flat[mine] - index.shard_starts[shard]).numpy()]):
            names[position] = name.decode("utf-8")
    if rows.ndim == 1:
        return names
    k = rows.shape[1]
    return [names[i:i + k] for i in range(0, len(names), k)]


def ranked_lists(index, scores, rows, qids):
    """(qid, [(docid, score), ...] best first) for every query of a search's (scores, rows), one at a time. Rows of
    -1 are left out: a FAISS search that found fewer than depth documents pads its lists with them, at the end."""
    for start in range(0, len(qids), 1024):
        block = rows[start:start + 1024]
        names = docids(index, block.clamp(min=0))
        for qid, docs, values, found in zip(qids[start:start + 1024], names, scores[start:start + 1024].tolist(),
                                            (block >= 0).tolist()):
            yield qid, [(docid, value) for docid, value, keep in zip(docs, values, found) if keep]


def run_from_hits(index, scores, rows, qids):
    """A search's result as a run {qid: {docid: score}}, each query's documents in trec_eval's order."""
    return {qid: dict(ranked) for qid, ranked in ranked_lists(index, scores, rows, qids)}


# ----------------------------------------------------------------------------------------------
# Exact search, streamed, with a running top-k in trec_eval's order

def _sortable(scores):
    """float32 -> int32 of the same order (-0.0 counted as +0.0, as float comparison does)."""
    bits = (scores + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _keys(scores, ranks):
    """One int64 per document ordering (score, docid rank): a larger key ranks first, ties on docid included."""
    return _sortable(scores).to(torch.int64) * 2 ** 32 + ranks


def _scores_of(keys):
    """The float32 scores inside keys (exact: the inverse of _sortable); -inf for empty slots."""
    high = (keys >> 32).to(torch.int32)
    scores = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
    return scores.masked_fill(keys == EMPTY, float("-inf"))


def default_tile_rows(block_size, dim):
    """Rows per tile: about 1 MB of (query block x tile) scores and of vectors, in a CPU's L2 cache for one matmul
    and the max over its scores."""
    return max(GROUP, TILE_BYTES // (4 * max(block_size, dim)) // GROUP * GROUP)


def default_chunk_rows(block_size, dim):
    """Rows per chunk, a multiple of the tile: 16 MB of (query block x chunk) scores, at most 32 MB of vectors."""
    tile = default_tile_rows(block_size, dim)
    return max(tile, min(SCORE_BYTES // (4 * block_size), 2 ** 23 // dim) // tile * tile)


def chunk_and_tile_rows(device, block_size, dim, chunk_rows=None, tile_rows=None):
    """(chunk_rows, tile_rows) of a search on `device`, checked: the CPU defaults above, or on a GPU one matmul per
    chunk of up to GPU_SCORE_BYTES of scores (no cache to fit; each tile costs kernel launches and a sync)."""
    if device.type == "cpu":
        chunk_rows = chunk_rows or default_chunk_rows(block_size, dim)
        tile_rows = tile_rows or default_tile_rows(block_size, dim)
    else:
        chunk_rows = chunk_rows or max(GROUP, min(GPU_SCORE_BYTES // (4 * block_size), 2 ** 28 // dim) // GROUP * GROUP)
        tile_rows = tile_rows or max(GROUP, chunk_rows // GROUP * GROUP)
    if chunk_rows < 1 or tile_rows < GROUP or tile_rows % GROUP:
        raise ValueError(f"chunk_rows {chunk_rows} must be positive and tile_rows {tile_rows} a positive multiple "
                         f"of {GROUP} (scores are screened by their maximum per group of {GROUP})")
    return chunk_rows, tile_rows


def _check_scores(values):
    """Refuse NaN and +inf scores: NaN is never >= a threshold, so its document would be skipped without a sound,
    and +inf always is. Group maxima show both. (-inf, which only an infinite vector of a dot-product index gives,
    ranks its document last, as its score says.)"""
    if not (values < float("inf")).all():  # False for NaN and +inf
        raise ValueError("non-finite scores (NaN or +inf): the index holds non-finite vectors (written around "
                         "encode_corpus, or damaged: open_index(folder, check_hashes=True) checks every file)")


def score_tiles(queries, vectors, tile, score_buffer, max_buffer):
    """Eq. 2 scores of a chunk, one matmul per tile of rows -> parts [(first column, scores (tiles, Qb, W), group
    maxima (Qb, tiles, W / GROUP) or None)]: the whole tiles, then the rows left over in one matmul. A chunk
    shorter than a tile is one matmul, so a corpus of one small chunk is scored by the dense path's very matmul.
    NaN and +inf scores are refused (_check_scores)."""
    num_queries, num_rows = len(queries), len(vectors)
    whole = num_rows // tile * tile
    parts = []
    if whole:
        scores = score_buffer[:whole * num_queries].view(whole // tile, num_queries, tile)
        group_max = max_buffer[:whole * num_queries // GROUP].view(num_queries, whole // tile, tile // GROUP)
        for j in range(whole // tile):
            torch.mm(queries, vectors[j * tile:(j + 1) * tile].T, out=scores[j])  # (Qb, T)
            group_max[:, j] = scores[j].view(num_queries, -1, GROUP).amax(2)  # while the tile is in cache
        _check_scores(group_max)
        parts.append((0, scores, group_max))
    if whole < num_rows:
        left = score_buffer[whole * num_queries:num_rows * num_queries].view(1, num_queries, num_rows - whole)
        torch.mm(queries, vectors[whole:].T, out=left[0])  # (Qb, C - whole)
        _check_scores(left)
        parts.append((whole, left, None))
    return parts


def _at_least(values, threshold):
    """Flat positions (M,), ascending, of values >= threshold (broadcast against values). On a CPU through numpy,
    whose comparison and nonzero are several times faster than torch's here (bench/bench_scale.py times both)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(values.numpy() >= threshold.numpy()))
    return (values >= threshold).view(-1).nonzero().squeeze(1)


def _candidates(scores, group_max, threshold):
    """(query, column, score) of every score of a part >= its query's threshold, by query then column: (M,) each.

    Where there are group maxima, only the groups whose maximum reaches the threshold are looked into: after
    the first chunks almost none do, so the top-k costs little more than one pass of max over the scores.
    """
    tiles, num_queries, width = scores.shape
    if group_max is None:  # one tile
        flat = _at_least(scores[0], threshold[:, None])  # query * width + column
        return flat // width, flat % width, scores[0].reshape(-1)[flat]
    groups = width // GROUP  # per tile
    flat = _at_least(group_max, threshold[:, None, None])  # groups to look into: (query * tiles + tile) * groups + group
    query, tile, group = flat // (tiles * groups), flat // groups % tiles, flat % groups
    grouped = scores.view(-1, GROUP).index_select(0, (tile * num_queries + query) * groups + group)  # (G, GROUP)
    hit = _at_least(grouped, threshold[query, None])  # group * GROUP + offset
    within = hit // GROUP
    return query[within], tile[within] * width + group[within] * GROUP + hit % GROUP, grouped.view(-1)[hit]


def _part_bound(scores, group_max, lists, k):
    """A lower bound on the k-th best score of a part for some lists (Qb,) bool: the k-th largest group maximum
    (each the score of a different document) or, with fewer than k groups, the k-th largest score; -inf when
    the part has fewer than k documents."""
    if group_max is not None and group_max.shape[1] * group_max.shape[2] >= k:
        columns = group_max[lists].reshape(int(lists.sum()), -1)  # (lists, tiles * W / GROUP)
    else:
        columns = scores[:, lists].permute(1, 0, 2).reshape(int(lists.sum()), -1)  # (lists, tiles * W)
    if columns.shape[1] < k:
        return torch.full((len(columns),), float("-inf"), device=columns.device)
    return columns.topk(k, dim=1).values[:, -1]


def part_candidates(part, kth, k, ranks, first_row):
    """The documents of one part of a chunk (score_tiles) that may enter top-k lists whose k-th best scores are
    kth (Qb,) (-inf while a list is not full) -> (query, key, global row), (M,) each, by query, and the number of
    candidates of each list (Qb,)."""
    first_column, scores, group_max = part
    threshold = kth.clone()  # a score equal to the k-th may still enter on its docid
    not_full = threshold == float("-inf")
    if not_full.any():  # only the part's own top k can enter such a list
        threshold[not_full] = _part_bound(scores, group_max, not_full, k)
    query, column, score = _candidates(scores, group_max, threshold)  # (M,) each, by query
    column = column + first_column
    return query, _keys(score, ranks[column]), first_row + column, torch.bincount(query, minlength=len(kth))


def merge_top_k(keys, rows, kth, candidates):
    """Merge the candidates of several parts (part_candidates) into the running top-k lists keys, rows (Qb, k),
    best first, and their k-th best scores kth (Qb,), in place."""
    counts = torch.stack([count for *_, count in candidates])  # (P, Qb)
    total = counts.sum(0)  # (Qb,)
    touched = total.nonzero().squeeze(1)  # (T,) lists with candidates
    if not len(touched):
        return
    slot = (total > 0).cumsum(0) - 1  # (Qb,) each touched list's row among the touched
    new_keys = keys.new_full((len(touched), int(total.max())), EMPTY)  # (T, most candidates of a list)
    new_rows = torch.full_like(new_keys, -1)
    for (query, key, row, count), earlier in zip(candidates, counts.cumsum(0) - counts):  # earlier parts' (Qb,)
        position = torch.arange(len(query), device=query.device) - (count.cumsum(0) - count)[query] + earlier[query]
        new_keys[slot[query], position] = key
        new_rows[slot[query], position] = row
    merged = torch.cat([keys[touched], new_keys], 1).topk(keys.shape[1], dim=1)  # (T, k), best first
    keys[touched] = merged.values
    rows[touched] = torch.cat([rows[touched], new_rows], 1).gather(1, merged.indices)
    kth[touched] = _scores_of(merged.values[:, -1])


def seed_sample(num_docs, k):
    """Rows (S,) of an even sample of S = SEED_RANK N / (2k) >= SEED_RANK documents, whose SEED_RANK-th best score
    about 2k documents of the corpus reach; None where S > N / 16 (k < 8 SEED_RANK), too costly for what it saves,
    or where the corpus has fewer than 2k documents."""
    size = -(-SEED_RANK * num_docs // (2 * k))
    return torch.arange(size) * num_docs // size if 16 * size <= num_docs and num_docs >= 2 * k else None


def seed_floors(index, pair, queries, k, query_block, chunk_rows):
    """A floor (Q,) under each query's k-th best score, or None: the SEED_RANK-th best score of seed_sample's rows.

    The first chunks are where most documents enter the lists and cost most; starting each list at its floor
    skips what cannot reach the final top k. Exact wherever k documents reach the floor (every skipped one scores
    below all of them); search() searches again, without floors, the queries whose lists end short.
    """
    sample = seed_sample(index.num_docs, k)
    if sample is None:
        return None
    best = queries.new_full((len(queries), SEED_RANK), float("-inf"))  # (Q, SEED_RANK) best sampled scores
    for start in range(0, len(sample), chunk_rows):
        vectors = read_rows(index, pair, sample[start:start + chunk_rows]).to(queries.device)  # (P, d)
        for block in range(0, len(queries), query_block):
            top = (queries[block:block + query_block] @ vectors.T).topk(min(SEED_RANK, len(vectors)), dim=1).values
            best[block:block + query_block] = torch.cat([best[block:block + query_block], top], 1).topk(
                SEED_RANK, dim=1).values  # one (Qb, P) score matrix at a time, as large as a chunk's
    return best[:, -1]


@torch.no_grad()
def search(index, pair, queries, depth=1000, query_block=1024, chunk_rows=None, tile_rows=None, seed=True,
           progress=None):
    """Exact search at one pair (Eq. 2), streamed over the shards -> (scores, rows), each (Q, min(depth, N)).

    queries (Q, d): e^(n,d) of the queries, L2-normalised when the index is cosine (as encode_2d(normalize=True)
    gives them); the search runs on their device. Every chunk of rows is scored against every block of queries
    and merged into a running top-k; rows are global row numbers (docids(index, rows) names them), best first
    in trec_eval's order. chunk_rows (rows read and merged at a time) and tile_rows (rows per matmul) default to
    sizes that suit a CPU's cache, or on a GPU to larger chunks of one matmul each (chunk_and_tile_rows).
    seed: start the lists at seed_floors (the same result, sooner at depths of 512 and more).
    progress: e.g. functools.partial(tqdm, desc=...), called as progress(chunks, total=number of chunks).
    """
    _check_pair(index, pair)
    queries = _check_queries(index, pair, queries)
    keys = torch.full((len(queries), min(depth, index.num_docs)), EMPTY, dtype=torch.int64, device=queries.device)  # (Q, k)
    rows = torch.full_like(keys, -1)  # (Q, k)
    block_size = min(len(queries), query_block)
    chunk_rows, tile = chunk_and_tile_rows(queries.device, block_size, pair[1], chunk_rows, tile_rows)
    floors = seed_floors(index, pair, queries, keys.shape[1], query_block, chunk_rows) if seed else None  # (Q,)
    kth = floors.clone() if floors is not None else torch.full((len(queries),), float("-inf"), device=queries.device)
    score_buffer = queries.new_empty(block_size * chunk_rows)  # reused for every chunk: no fresh pages to fault in
    max_buffer = queries.new_empty(block_size * chunk_rows // GROUP)
    blocks = [slice(start, start + query_block) for start in range(0, len(queries), query_block)]

    def merge(b):
        merge_top_k(keys[blocks[b]], rows[blocks[b]], kth[blocks[b]], waiting[b])
        if floors is not None:  # a list that is not full yet keeps its floor
            torch.maximum(kth[blocks[b]], floors[blocks[b]], out=kth[blocks[b]])
        waiting[b], waiting_per_list[b] = [], 0

    # Candidates wait until some list has k of them: a merge (a top-k over k + waiting) then serves many chunks,
    # at the cost of thresholds that lag behind; fewer than k wait per list (+ one part), O(Q x k) as the lists.
    waiting, waiting_per_list = [[] for _ in blocks], [0] * len(blocks)
    stream = chunks(index, pair, chunk_rows)
    if progress:
        stream = progress(stream, total=sum(-(-shard_rows // chunk_rows) for shard_rows in index.shard_rows))
    for first_row, vectors, ranks in stream:  # (C, d), (C,)
        vectors, ranks = vectors.to(queries.device), ranks.to(queries.device)
        for b, block in enumerate(blocks):
            for part in score_tiles(queries[block], vectors, tile, score_buffer, max_buffer):
                found = part_candidates(part, kth[block], keys.shape[1], ranks, first_row)
                waiting[b].append(found)
                waiting_per_list[b] = waiting_per_list[b] + found[3]
                if int(waiting_per_list[b].max()) >= keys.shape[1]:
                    merge(b)
    for b in range(len(blocks)):
        if waiting[b]:
            merge(b)
    scores = _scores_of(keys)
    short = keys[:, -1] == EMPTY  # (Q,) only where fewer than k documents reached a floor
    if short.any():
        if floors is None:  # a guard: every document was scored, and _check_scores refused any NaN
            raise RuntimeError(f"{int(short.sum())} queries' lists hold fewer than {keys.shape[1]} documents after "
                               f"every document of {index.folder} was scored")
        scores[short], rows[short] = search(index, pair, queries[short], depth, query_block, chunk_rows, tile_rows,
                                            seed=False)
    return scores, rows


def _check_queries(index, pair, queries):
    if queries.ndim != 2 or queries.shape[1] != pair[1] or not len(queries):
        raise ValueError(f"queries {tuple(queries.shape)} are not (Q, {pair[1]}) for pair {pair[0]}x{pair[1]}")
    queries = queries.float()
    if not torch.isfinite(queries).all():
        raise ValueError("queries hold NaN or infinite values: their scores could not rank documents")
    norms = queries.norm(dim=1)
    if index.normalize and not (((norms - 1).abs() < 1e-3) | (norms == 0)).all():
        raise ValueError("the index is cosine: pass L2-normalised queries (encode_2d(..., normalize=True))")
    return queries


@torch.no_grad()
def adaptive_search(index, pairs, queries, ks, depth=10, query_block=1024, chunk_rows=None, tile_rows=None):
    """Eq. 14 on the index: top-k_1 with pairs[0] streamed over the shards, then rerank with each larger pair.

    queries[j] (Q, d_j) as for search(). Each later stage reads only the shortlisted rows, gathered from the
    memory-mapped shards, in blocks of queries. Ties are broken as trec_eval does, at every stage.
    Returns (scores, rows), each (Q, min(depth, k_last, N)), best first by the last pair.
    """
    if len(pairs) != len(queries) or len(ks) != len(pairs) - 1:
        raise ValueError(f"a funnel of {len(pairs)} pairs needs as many query matrices and {len(pairs) - 1} ks")
    if any(k < 1 for k in ks) or list(ks) != sorted(ks, reverse=True) or depth < 1:
        raise ValueError(f"shortlist sizes {list(ks)} must be positive and non-increasing, depth {depth} positive")
    for pair in pairs:
        _check_pair(index, pair)
    keep = [min(k, index.num_docs) for k in ks] + [min([depth, index.num_docs] + list(ks))]
    scores, rows = search(index, pairs[0], queries[0], keep[0], query_block, chunk_rows, tile_rows)  # (Q, k_1)
    for pair, stage_queries, k in zip(pairs[1:], queries[1:], keep[1:]):
        stage_queries = _check_queries(index, pair, stage_queries)
        block = max(1, 2 ** 24 // (rows.shape[1] * pair[1]))  # queries per gather: about 64 MB of vectors
        next_scores, next_rows = [], []
        for start in range(0, len(rows), block):
            shortlist = rows[start:start + block]  # (Qb, k_prev)
            vectors, ranks = gather(index, pair, shortlist.reshape(-1))  # (Qb * k_prev, d), (Qb * k_prev,)
            vectors = vectors.to(rows.device).view(*shortlist.shape, pair[1])  # (Qb, k_prev, d)
            stage = torch.bmm(vectors, stage_queries[start:start + block].unsqueeze(2)).squeeze(2)  # (Qb, k_prev)
            _check_scores(stage)
            top = _keys(stage, ranks.to(rows.device).view(shortlist.shape)).topk(k, dim=1)
            next_scores.append(_scores_of(top.values))
            next_rows.append(shortlist.gather(1, top.indices))
        scores, rows = torch.cat(next_scores), torch.cat(next_rows)
    return scores, rows


# ----------------------------------------------------------------------------------------------
# Optional: an approximate index with FAISS (pip install faiss-cpu), exact search its reference

def faiss_index(index, pair, kind="flat", nlist=None, nprobe=16, hnsw_m=32, ef_search=128, chunk_rows=65536):
    """A FAISS index of one pair's vectors, added chunk by chunk from the shards (inner product; cosine when the
    index is normalised). kind: 'flat' (exact, in memory), 'ivf' (IndexIVFFlat, nlist lists, nprobe searched,
    trained on an evenly spaced sample) or 'hnsw' (IndexHNSWFlat, hnsw_m links, ef_search). Holds N x d float32."""
    try:
        import faiss
    except ImportError:
        raise ValueError("--index faiss-* needs FAISS: pip install faiss-cpu") from None
    d = pair[1]
    _check_pair(index, pair)
    if kind == "flat":
        built = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        built = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = ef_search
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * index.num_docs ** 0.5))
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        step = max(1, index.num_docs // (64 * nlist))  # about 64 training vectors per list, spread over the corpus
        sample = [vectors[(-first_row) % step::step].clone() for first_row, vectors, _ in chunks(index, pair, chunk_rows)]
        built.train(torch.cat(sample).numpy())
        built.nprobe = nprobe
    else:
        raise ValueError(f"unknown FAISS index {kind!r}: use flat, ivf or hnsw")
    for _, vectors, _ in chunks(index, pair, chunk_rows):
        built.add(vectors.numpy())
    return built


def faiss_search(built, queries, depth):
    """(scores, rows), each (Q, depth), from a faiss_index; rows are the index's global rows (-1: none found)."""
    scores, rows = built.search(np.ascontiguousarray(queries.float().cpu().numpy()), depth)
    return torch.from_numpy(scores), torch.from_numpy(rows)


def overlap_at_k(rows, exact_rows, k):
    """Recall@k of an approximate search against exact search: the share of the exact top k in the approximate top k."""
    found = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / len(e[:k]) for a, e in zip(rows, exact_rows)]
    return float(np.mean(found))
