"""Paper-scale retrieval: a corpus encoded once to a sharded on-disk 2D index, and exact search
streamed over it.

    import metrics, models
    from index import corpus_index as ci
    passages = metrics.stream_msmarco_collection("collection.tsv")  # (docid, text), streamed
    # resumable; torchrun: one slice of shards per rank
    ci.encode_corpus(model, tokenizer, passages, pairs, "index/msmarco",
                     ci.EncodeSettings(pooling="cls", max_length=196))
    index = ci.open_index("index/msmarco")
    q = models.encode_2d(model, tokenizer, query_texts, pairs, "cls", 32, normalize=index.normalize)
    # (Q, 1000) each, exact
    scores, rows = ci.search(index, (12, 768), q[(12, 768)], depth=1000)
    # Eq. 14
    scores, rows = ci.adaptive_search(index, [(2, 32), (12, 768)], [q[(2, 32)], q[(12, 768)]],
                                      [200])
    # {qid: {docid: score}}
    run = ci.run_from_hits(index, scores, rows, qids)

An index folder (every .npy memory-mappable):

    index_config.json               what was encoded: pairs, stored width per layer, dtype, pooling, max_length, ...
    shard-00000/layer-<n>.npy       (rows, D_n): pool(h^(n))[:D_n], D_n the widest d of layer n's pairs (Eq. 1)
    shard-00000/docids.npy          (rows,): the docids as UTF-8 bytes
    shard-00000/shard_complete.json written last: rows, size and sha256 of every file, sha256 of the source text
    docid_rank.npy                  (N,): each row's position in docid string order (trec_eval's tie order)
    index_complete.json             written last of all: shard sizes, number of documents

Narrower pairs of a layer are prefixes of its stored width (Eq. 1), so nothing is stored twice. The
vectors are stored raw, not normalised: for cosine similarity Eq. 2 normalises after truncation, so
the search normalises each pair's first d coordinates when it reads them (a unit vector at width D_n
would do too, normalisation being scale-invariant, but raw vectors also serve dot-product models
unchanged).

Search memory is O(Q x depth) for the running top-k lists, plus one shard's mapped file and
one chunk (64 MB of vectors; on the torch path 8 MB of scores), whatever the corpus size N.
Each chunk is searched by FAISS's exact flat inner-product search (pip install faiss-cpu), or
without it by a matmul and torch.topk, and merged into the lists by a plain top-k on score.
Where documents tie at the k-th score their docids decide, and each list is finally sorted as
trec_eval sorts a run: score descending, then docid descending as strings (docid_rank.npy).
Scores are float32 (float16 storage is converted chunk by chunk); NaN and +inf scores are
refused, -inf ranks last.
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

try:
    import faiss
except ImportError:  # optional: exact search then runs on torch.topk alone
    faiss = None

import training
import models

FORMAT = 1
CONFIG = "index_config.json"
SHARD_MARKER = "shard_complete.json"
INDEX_MARKER = "index_complete.json"
DOCID_RANK = "docid_rank.npy"
DTYPES = {"float16": np.float16, "float32": np.float32}
CHUNK_BYTES = 2 ** 26  # a chunk's float32 vectors: few merges of the top-k lists
SCORE_BYTES = 2 ** 23  # a chunk's scores on the torch path, which holds them whole
TIES = 16  # documents fetched past a chunk's k-th: room for ties with it, else it is searched again
# TREC run files split on whitespace; numpy bytes drop trailing NULs
_BAD_DOCID = re.compile(r"[\s\x00]")


# ----------------------------------------------------------------------------------------------
# Writing: shards, each complete or ignored

def stored_widths(pairs):
    """Eq. 1: {n: D_n}, the widest d that any pair of layer n needs; every (n, d) is a prefix of
    it."""
    widths = {}
    for n, d in pairs:
        widths[n] = max(widths.get(n, 0), d)
    return dict(sorted(widths.items()))


def shard_name(shard):
    return f"shard-{shard:05d}"


def _save_npy(path, array):
    """Atomically: a temporary file, flushed to disk, renamed into place (whole or absent)."""
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    training.fsync(path + ".tmp")
    os.replace(path + ".tmp", path)


def _write_json(path, value):
    """Atomically: a temporary file, flushed to disk, renamed into place."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    training.fsync(os.path.dirname(os.path.abspath(path)))


def write_shard(folder, shard, docids, vectors, source_sha256=""):
    """Write shard number `shard` atomically: files into a hidden folder, each flushed, the marker
    last, one rename.

    docids: list of str; vectors: {n: (rows, D_n) numpy array in the storage dtype}. A crash leaves
    either the complete shard or a hidden folder that no reader opens.
    """
    final, tmp = os.path.join(folder, shard_name(shard)), os.path.join(
        folder, f".{shard_name(shard)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # (rows,) fixed-width bytes
    arrays = {"docids.npy": np.array([docid.encode("utf-8") for docid in docids])}
    arrays.update({f"layer-{n}.npy": v for n, v in vectors.items()})
    marker = {"rows": len(docids), "source_sha256": source_sha256, "files": {}}
    for name, array in arrays.items():
        if len(array) != len(docids):
            raise ValueError(f"{name} has {len(array)} rows for {len(docids)} docids")
        path = os.path.join(tmp, name)
        np.save(path, array)
        training.fsync(path)
        marker["files"][name] = {"bytes": os.path.getsize(path), "sha256": training.sha256_of(path)}
    _write_json(os.path.join(tmp, SHARD_MARKER), marker)
    if os.path.exists(final):  # an earlier attempt whose marker did not match its files
        shutil.rmtree(final)
    os.rename(tmp, final)
    training.fsync(folder)


def shard_problem(folder, shard, check_hashes=False):
    """None if the shard is complete (marker present, every file of the size written), else what is
    wrong."""
    path = os.path.join(folder, shard_name(shard))
    try:
        with open(os.path.join(path, SHARD_MARKER)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return "no completeness marker (its encoding did not finish)"
    except (ValueError, KeyError, TypeError):
        return "the completeness marker is unreadable"
    problem = training.files_problem(path,
                                     {name: written["bytes"] for name, written in files.items()})
    if problem or not check_hashes:
        return problem
    for name, written in files.items():
        if training.sha256_of(os.path.join(path, name)) != written["sha256"]:
            return f"{name} does not have the sha256 it was written with"
    return None


def _read_marker(folder, shard):
    with open(os.path.join(folder, shard_name(shard), SHARD_MARKER)) as f:
        return json.load(f)


def index_config(pairs, dtype="float16", shard_size=100_000, pooling="cls", max_length=128,
                 normalize=False):
    """What an index folder records about its encoding; resuming with anything else is refused."""
    if dtype not in DTYPES:
        raise ValueError(f"storage dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be positive")
    return {
        "format": FORMAT, "pairs": [list(p) for p in pairs], "widths": {
            str(n): d
            for n, d in stored_widths(pairs).items()}, "dtype": dtype, "shard_size": shard_size,
        "pooling": pooling, "max_length": max_length, "normalize": normalize}


def start_index(folder, config):
    """Create the folder and its config, or check that an existing one was started with the same
    config."""
    path = os.path.join(folder, CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config:
            changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise ValueError(f"{folder} holds an index encoded with other settings "
                             f"({', '.join(changed)}); use a new folder, or the settings it was "
                             "started with")
        return
    os.makedirs(folder, exist_ok=True)
    _write_json(path, config)


def finalize_index(folder, num_shards):
    """Check every shard, then write each row's rank in docid string order and, last, the index
    marker.

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
        raise ValueError(f"{folder}: shards of {shard_rows} rows do not make an index of shards of "
                         f"{shard_size}")
    docids = np.concatenate([
        np.load(os.path.join(folder, shard_name(s), "docids.npy")) for s in range(num_shards)])
    # UTF-8 byte order = Python's str order = trec_eval's strcmp
    order = np.argsort(docids, kind="stable")
    in_order = docids[order]
    repeated = np.flatnonzero(in_order[1:] == in_order[:-1])
    if len(repeated):
        raise ValueError(f"docid {in_order[repeated[0]].decode()!r} occurs more than once in the "
                         "corpus")
    docid_rank = np.empty(len(docids), dtype=np.int64)
    docid_rank[order] = np.arange(len(docids))  # (N,)
    path = os.path.join(folder, DOCID_RANK)
    _save_npy(path, docid_rank)
    _write_json(
        os.path.join(folder, INDEX_MARKER), {
            "num_docs": len(docids), "shard_rows": shard_rows, "docid_rank": {
                "bytes": os.path.getsize(path), "sha256": training.sha256_of(path)}})


def stored(vectors, dtype, shard):
    """{n: (rows, D_n)} float vectors cast to the storage dtype, refused where the cast leaves them
    not finite (what encode_corpus and copy_index write)."""
    with np.errstate(over="ignore"):  # an overflow is refused below, in one line
        cast = {n: np.asarray(v).astype(DTYPES[dtype]) for n, v in vectors.items()}
    for n, v in cast.items():
        if not np.isfinite(v).all():
            raise ValueError(f"layer {n}'s vectors of shard {shard} are not finite in {dtype} (too "
                             f"large for float16?): store the index as float32")
    return cast


def copy_index(source, target, dtype):
    """The complete index in source written again into target with another storage dtype (as
    encode_corpus would have written it) -> the opened copy."""
    index = open_index(source)
    with open(os.path.join(source, CONFIG)) as f:
        config = dict(json.load(f), dtype=dtype)
    start_index(target, config)
    for shard in range(len(index.shard_rows)):
        path = os.path.join(source, shard_name(shard))
        vectors = stored({n: np.load(os.path.join(path, f"layer-{n}.npy")) for n in index.widths},
                         dtype, shard)
        write_shard(target, shard, [d.decode() for d in np.load(os.path.join(path, "docids.npy"))],
                    vectors, _read_marker(source, shard)["source_sha256"])
    finalize_index(target, len(index.shard_rows))
    return open_index(target)


# ----------------------------------------------------------------------------------------------
# Encoding a corpus (Eq. 1), once, to disk

@dataclass(frozen=True)
class EncodeSettings:
    """How encode_corpus encodes and stores a corpus (what index_config records of it)."""
    pooling: str = "cls"
    max_length: int = 128
    batch_size: int = 64
    normalize: bool = False  # the pairs are compared by cosine: the search normalises (Eq. 2)
    shard_size: int = 100_000  # documents per shard
    dtype: str = "float16"  # storage dtype, one of DTYPES


@torch.no_grad()
def encode_corpus(model, tokenizer, docs, pairs, folder, settings=EncodeSettings(),
                  progress=None):
    """Eq. 1 for a whole corpus, to disk, one shard of `settings.shard_size` documents at a time;
    resumable.

    docs: an iterable of (docid, text), read once in order (metrics.stream_beir_corpus,
    metrics.stream_msmarco_collection); only one shard's texts are held. Each shard is one encode_2d
    call (one forward pass per batch, up to the largest layer), stored per layer at the widest d of
    its pairs, raw; settings.normalize=True records that the pairs are compared by cosine, which the
    search applies after truncation (Eq. 2). A shard complete on disk and encoded from the same
    text is skipped, so a run killed at any point resumes at its first missing shard. Under
    torchrun, rank r encodes shards r, r + W, ...; rank 0 then checks them all and writes the docid
    ranks and the index marker. Returns the number of documents this process encoded.
    """
    pooling, max_length, batch_size = settings.pooling, settings.max_length, settings.batch_size
    shard_size, dtype = settings.shard_size, settings.dtype
    config = index_config(pairs, dtype, shard_size, pooling, max_length, settings.normalize)
    rank, world_size = training.rank_and_world_size()
    if rank == 0:
        start_index(folder, config)
    if world_size > 1:
        torch.distributed.barrier()
    start_index(folder, config)  # every rank checks the folder it will write into
    # [(n, D_n)]: one embedding per layer, the widest
    layer_pairs = list(stored_widths(pairs).items())
    encoded, shard, docids, texts, digest = 0, 0, [], [], hashlib.sha256()

    def finish_shard():
        """Encode and write the shard just read, unless it is another rank's or already on disk from
        the same text."""
        nonlocal encoded
        if shard % world_size != rank:
            return
        if shard_problem(folder, shard) is None:
            if _read_marker(folder, shard)["source_sha256"] != digest.hexdigest():
                raise ValueError(f"{os.path.join(folder, shard_name(shard))} was encoded from "
                                 "other text than documents "
                                 f"{shard * shard_size}..{shard * shard_size + len(docids) - 1} of "
                                 "this corpus; an index folder belongs to one corpus")
            return
        embeddings = models.encode_2d(model, tokenizer, texts, layer_pairs, pooling, max_length,
                                      batch_size, normalize=False,
                                      progress=progress)  # {(n, D_n): (rows, D_n)}
        vectors = stored({n: embeddings[(n, width)].numpy() for n, width in layer_pairs}, dtype,
                         shard)  # {n: (rows, D_n)}
        write_shard(folder, shard, docids, vectors, digest.hexdigest())
        encoded += len(texts)

    read = 0
    for docid, text in docs:
        if not docid or _BAD_DOCID.search(docid):
            raise ValueError(
                f"document {read}: docid {docid!r} is empty or holds whitespace or NUL")
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
    """The index in `folder`, checked complete (its marker, every shard's files of the size
    written)."""
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
    if not os.path.exists(rank_file) or \
            os.path.getsize(rank_file) != marker["docid_rank"]["bytes"] or \
            (check_hashes and training.sha256_of(rank_file) != marker["docid_rank"]["sha256"]):
        raise ValueError(f"{rank_file} is missing or not as written")
    return CorpusIndex(folder, [tuple(p) for p in config["pairs"]], {
        int(n): d for n, d in config["widths"].items()}, config["normalize"], config["dtype"],
                       marker["shard_rows"])


def _layer_file(index, shard, n):
    return os.path.join(index.folder, shard_name(shard), f"layer-{n}.npy")


def _check_pair(index, pair):
    n, d = pair
    if n not in index.widths or not 1 <= d <= index.widths[n]:
        raise ValueError(f"pair {n}x{d} is not in the index (stored widths per layer: "
                         f"{index.widths})")


def _prepare(stored, normalize, out):
    """Stored rows (C, d) -> float32 vectors of one pair, written into out (at least C rows); for
    cosine normalised after truncation (Eq. 2). The same values as F.normalize (tested), in place: a
    buffer reused for every chunk costs no fresh pages (a page fault per 4 KB of a fresh array, per
    chunk).
    """
    # (C, d); float16 -> float32 is exact
    vectors = out[:len(stored)].copy_(torch.from_numpy(stored))
    return vectors.div_(vectors.norm(dim=1,
                                     keepdim=True).clamp_min(1e-12)) if normalize else vectors


def _map(path):
    """A .npy file memory-mapped copy-on-write: writable for torch.from_numpy, and nothing ever
    reaches the file."""
    return np.load(path, mmap_mode="c")


def chunks(index, pair, chunk_rows):
    """(first global row, vectors (C, d) float32, docid ranks (C,)) of consecutive rows, shard by
    shard.

    One shard's layer file is mapped at a time, so resident memory stays one shard however large the
    index. The vectors of every chunk are written into the same buffer: use (or copy) them before
    taking the next.
    """
    n, d = pair
    out = torch.empty(min(chunk_rows, max(index.shard_rows)), d)  # (C, d), reused
    for shard, (first, rows) in enumerate(zip(index.shard_starts, index.shard_rows)):
        layer = _map(_layer_file(index, shard, n))  # (rows, D_n)
        ranks = torch.from_numpy(
            np.array(_map(os.path.join(index.folder, DOCID_RANK))[first:first + rows]))
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            yield first + start, _prepare(layer[start:stop, :d], index.normalize,
                                          out), ranks[start:stop]
        del layer


def read_rows(index, pair, rows):
    """Vectors (M, d) float32 of global rows (M,), read from the shards' files (Eq. 2: normalised
    for cosine).

    Each row's first d values are read with one pread, in file order, the preads of a shard looped
    over in C (map): through a freshly mapped file, rows spread over the corpus cost a page fault
    each (most of the funnel's rerank) and leave every file's pages resident.
    """
    n, d = pair
    rows = rows.cpu().numpy()
    order = np.argsort(rows, kind="stable")  # (M,) file order
    in_order = rows[order]
    # (shards,) end of each in in_order
    ends = np.searchsorted(in_order, index.shard_starts[1:] + [index.num_docs])
    stored = np.empty((len(rows), d), dtype=DTYPES[index.dtype])  # (M, d) as stored
    row_bytes, prefix_bytes = index.widths[n] * stored.itemsize, d * stored.itemsize
    for shard, (start, end) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist())):
        if start == end:
            continue
        path = _layer_file(index, shard, n)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0
             if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            # after the header
            positions = f.tell() + (in_order[start:end] - index.shard_starts[shard]) * row_bytes
            read = b"".join(
                map(functools.partial(os.pread, f.fileno(), prefix_bytes), positions.tolist()))
        if len(read) != (end - start) * prefix_bytes:  # a short read would shift every row after it
            raise ValueError(f"{path} is shorter than when the index was opened: re-open it "
                             "(open_index)")
        stored[order[start:end]] = np.frombuffer(read, dtype=stored.dtype).reshape(end - start, d)
    return _prepare(stored, index.normalize, torch.empty(len(rows), d))


def gather(index, pair, rows):
    """Vectors (M, d) float32 (read_rows) and docid ranks (M,) of global rows (M,)."""
    ranks = _map(os.path.join(index.folder, DOCID_RANK))[rows.cpu().numpy()]
    return read_rows(index, pair, rows), torch.from_numpy(ranks)


def docids(index, rows):
    """The docid (str) of every global row in a (Q, k) or (M,) tensor, as nested lists of the same
    shape."""
    flat = rows.reshape(-1).cpu()
    names = [None] * len(flat)
    shard_of = torch.searchsorted(torch.tensor(index.shard_starts), flat, right=True) - 1
    for shard in shard_of.unique().tolist():
        mine = (shard_of == shard).nonzero().squeeze(1)
        stored = np.load(os.path.join(index.folder, shard_name(shard), "docids.npy"), mmap_mode="r")
        for position, name in zip(mine.tolist(),
                                  stored[(flat[mine] - index.shard_starts[shard]).numpy()]):
            names[position] = name.decode("utf-8")
    if rows.ndim == 1:
        return names
    k = rows.shape[1]
    return [names[i:i + k] for i in range(0, len(names), k)]


def ranked_lists(index, scores, rows, qids):
    """(qid, [(docid, score), ...] best first) for every query of a search's (scores, rows), one at
    a time. Rows of -1 are left out: a FAISS search that found fewer than depth documents pads its
    lists with them, at the end."""
    for start in range(0, len(qids), 1024):
        block = rows[start:start + 1024]
        names = docids(index, block.clamp(min=0))
        for qid, docs, values, found in zip(qids[start:start + 1024], names,
                                            scores[start:start + 1024].tolist(), (block
                                                                                  >= 0).tolist()):
            yield qid, [(docid, value) for docid, value, keep in zip(docs, values, found) if keep]


def run_from_hits(index, scores, rows, qids):
    """A search's result as a run {qid: {docid: score}}, each query's documents in trec_eval's
    order."""
    return {qid: dict(ranked) for qid, ranked in ranked_lists(index, scores, rows, qids)}


# ----------------------------------------------------------------------------------------------
# Exact search, streamed: each chunk's top k by FAISS (or a matmul and torch.topk), merged by score

def _uses_faiss(device):
    return faiss is not None and device.type == "cpu"  # faiss-cpu: queries on a GPU stay with torch


def default_chunk_rows(block_size, dim, device):
    """Rows per chunk: 64 MB of float32 vectors; on the torch path also at most 8 MB of scores for a
    block of queries (FAISS scores in blocks of its own)."""
    rows = CHUNK_BYTES // (4 * dim)
    return max(1, rows if _uses_faiss(device) else min(rows, SCORE_BYTES // (4 * block_size)))


def _check_scores(values):
    """Refuse NaN and +inf scores: NaN has no place in a ranking and +inf outranks every document.
    (-inf, which only an infinite vector of a dot-product index gives, ranks its document last.)"""
    if not (values < float("inf")).all():  # False for NaN and +inf
        raise ValueError("non-finite scores (NaN or +inf): the index holds non-finite vectors "
                         "(written around encode_corpus, or damaged: open_index(folder, "
                         "check_hashes=True) checks every file)")


def _top(queries, vectors, m):
    """The m best scores (Qb, m) of a chunk, best first, and their columns (Qb, m).

    FAISS's exact flat search where no score can overflow: it would drop NaN and -inf scores
    without a sound. Other chunks (non-finite or huge vectors) are scored by a matmul, checked,
    and torch.topk.
    """
    low, high = vectors.aminmax()  # one pass, no copy; NaN if any value is
    bound = queries.abs().amax() * torch.maximum(-low, high) * vectors.shape[1]
    if _uses_faiss(queries.device) and bound < 1e38:
        faiss.omp_set_num_threads(torch.get_num_threads())  # set_num_threads governs both paths
        scores, columns = faiss.knn(np.ascontiguousarray(queries.numpy()), vectors.numpy(), m,
                                    metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(columns)
    scores = queries @ vectors.T  # (Qb, C)
    _check_scores(scores)
    return scores.topk(m, dim=1)


def _chunk_top(queries, vectors, k, top=_top, ties=TIES):
    """(scores, columns) (Qb, m), best score first, holding every document of the chunk whose score
    reaches the chunk's k-th best: m = k + ties, or more while documents tie with a k-th best.
    top(queries, vectors, m): the m best of the chunk (_top; index/precision.py scores codes)."""
    m = min(k + ties, len(vectors))
    while True:
        scores, columns = top(queries, vectors, m)
        if m == len(vectors) or (scores[:, -1] < scores[:, k - 1]).all():
            return scores, columns
        m = min(2 * m, len(vectors))  # the same call again: the same scores, a longer list


def _trec_order(scores, ranks):
    """Per row, the positions of (scores, docid ranks) (R, M) in trec_eval's order: score
    descending, then docid descending as strings (docid rank descending). -0.0 and +0.0 sort as
    equal."""
    by_rank = ranks.argsort(dim=1, descending=True)
    by_score = scores.gather(1, by_rank).argsort(dim=1, descending=True, stable=True)
    return by_rank.gather(1, by_score)


def _merge(lists, found, k):
    """The top k of running lists and a chunk's candidates, each (scores, ranks, rows) (Qb, width),
    -> (scores, ranks, rows) (Qb, min(k, width)), best score first.

    Plain top-k by score, exact as a set: where more documents than fit tie with the k-th score,
    their docid ranks decide, as trec_eval's order would.
    """
    scores, ranks, rows = (torch.cat(parts, 1) for parts in zip(lists, found))
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    keep = top.indices
    if ((scores >= top.values[:, -1:]).sum(1) > k).any():
        keep = _trec_order(scores, ranks)[:, :k]
    return tuple(t.gather(1, keep) for t in (scores, ranks, rows))


@torch.no_grad()
def search(index, pair, queries, depth=1000, query_block=1024, chunk_rows=None, progress=None):
    """Exact search at one pair (Eq. 2), streamed over the shards -> (scores, rows), each
    (Q, min(depth, N)).

    queries (Q, d): e^(n,d) of the queries, L2-normalised when the index is cosine (as
    encode_2d(normalize=True) gives them); the search runs on their device. Each chunk of rows is
    searched by FAISS's exact flat inner-product search (a matmul and torch.topk without FAISS or
    on a GPU), one block of query_block queries at a time, and merged into running top-k lists.
    rows are global row numbers (docids(index, rows) names them), best first in trec_eval's order.
    chunk_rows: rows read at a time (default_chunk_rows).
    progress: e.g. functools.partial(tqdm, desc=...), called as progress(chunks, total=chunks).
    """
    _check_pair(index, pair)
    queries = _check_queries(index, pair, queries)
    if depth < 1:
        raise ValueError(f"depth {depth} must be positive")
    k = min(depth, index.num_docs)
    chunk_rows = chunk_rows or default_chunk_rows(min(len(queries), query_block), pair[1],
                                                  queries.device)
    stream = chunks(index, pair, chunk_rows)
    if progress:
        stream = progress(stream, total=sum(-(-rows // chunk_rows) for rows in index.shard_rows))
    return search_stream(stream, queries, k, query_block, _chunk_top)


def search_stream(stream, queries, k, query_block, chunk_top):
    """The top k (scores, rows), each (Q, k), of a stream of chunks (first global row, vectors
    (C, ...), docid ranks (C,)), merged into running lists per block of query_block queries, then
    in trec_eval's order. chunk_top(queries, vectors, k) -> (scores, columns) (Qb, m): every
    document of the chunk reaching its k-th best score (_chunk_top), float32 scores, higher
    better."""
    device = queries.device
    blocks = [slice(start, start + query_block) for start in range(0, len(queries), query_block)]
    empty = torch.empty(len(queries), 0, dtype=torch.int64, device=device)
    lists = [(torch.empty(len(empty[b]), 0, device=device), empty[b], empty[b]) for b in blocks]
    for first_row, vectors, ranks in stream:  # (C, ...), (C,)
        vectors, ranks = vectors.to(device), ranks.to(device)
        for b, block in enumerate(blocks):
            scores, columns = chunk_top(queries[block], vectors, k)  # (Qb, m) each
            # a score under a full list's k-th cannot enter it: keep the columns reaching some k-th
            kth = lists[b][0][:, -1:] if lists[b][0].shape[1] == k else float("-inf")
            reach = int((scores >= kth).sum(1).max())
            if reach:
                columns = columns[:, :reach]
                found = scores[:, :reach], ranks[columns], columns + first_row
                lists[b] = _merge(lists[b], found, k)
    scores, ranks, rows = (torch.cat(parts) for parts in zip(*lists))
    order = _trec_order(scores, ranks)
    return scores.gather(1, order), rows.gather(1, order)


def _check_queries(index, pair, queries):
    if queries.ndim != 2 or queries.shape[1] != pair[1] or not len(queries):
        raise ValueError(f"queries {tuple(queries.shape)} are not (Q, {pair[1]}) for pair "
                         f"{pair[0]}x{pair[1]}")
    queries = queries.float()
    if not torch.isfinite(queries).all():
        raise ValueError("queries hold NaN or infinite values: their scores could not rank "
                         "documents")
    norms = queries.norm(dim=1)
    if index.normalize and not (((norms - 1).abs() < 1e-3) | (norms == 0)).all():
        raise ValueError("the index is cosine: pass L2-normalised queries "
                         "(models.encode_2d(..., normalize=True))")
    return queries


@torch.no_grad()
def adaptive_search(index, pairs, queries, ks, depth=10, query_block=1024, chunk_rows=None):
    """Eq. 14 on the index: top-k_1 with pairs[0] (search), then rerank with each larger pair.

    queries[j] (Q, d_j) as for search(). Each later stage reads only the shortlisted rows, gathered
    from the memory-mapped shards, in blocks of queries, and keeps its float scores of them. Ties
    are broken as trec_eval does, at every stage. Returns (scores, rows), each
    (Q, min(depth, k_last, N)), best first by the last pair.
    """
    if len(pairs) != len(queries) or len(ks) != len(pairs) - 1:
        raise ValueError(f"a funnel of {len(pairs)} pairs needs as many query matrices and "
                         f"{len(pairs) - 1} ks")
    for pair in pairs:
        _check_pair(index, pair)
    keep = funnel_keep(index, ks, depth)
    scores, rows = search(index, pairs[0], queries[0], keep[0], query_block, chunk_rows)  # (Q, k_1)
    for pair, stage_queries, k in zip(pairs[1:], queries[1:], keep[1:]):
        scores, rows = rescore(index, pair, stage_queries, rows, k)
    return scores, rows


def funnel_keep(index, ks, depth):
    """How many documents each stage of a funnel keeps: ks capped at N, then the depth."""
    if any(k < 1 for k in ks) or list(ks) != sorted(ks, reverse=True) or depth < 1:
        raise ValueError(f"shortlist sizes {list(ks)} must be positive and non-increasing, "
                         f"depth {depth} positive")
    return [min(k, index.num_docs) for k in ks] + [min([depth, index.num_docs] + list(ks))]


@torch.no_grad()
def rescore(index, pair, queries, rows, k):
    """A later stage of Eq. 14: the shortlisted rows (Q, k_prev) scored in float at pair (their
    vectors gathered from the shards) -> the best k (scores, rows), each (Q, k), in trec_eval's
    order. queries (Q, d) as for search()."""
    _check_pair(index, pair)
    queries = _check_queries(index, pair, queries)
    block = max(1, 2 ** 24 // (max(1, rows.shape[1]) * pair[1]))  # a gather: 64 MB of vectors
    next_scores, next_rows = [], []
    for start in range(0, len(rows), block):
        shortlist = rows[start:start + block]  # (Qb, k_prev)
        vectors, ranks = gather(index, pair, shortlist.reshape(-1))  # (Qb k_prev, d), ranks
        vectors = vectors.to(rows.device).view(*shortlist.shape, pair[1])  # (Qb, k_prev, d)
        stage = torch.bmm(vectors, queries[start:start + block].unsqueeze(2)).squeeze(2)
        _check_scores(stage)  # (Qb, k_prev)
        order = _trec_order(stage, ranks.to(rows.device).view(shortlist.shape))[:, :k]
        next_scores.append(stage.gather(1, order))
        next_rows.append(shortlist.gather(1, order))
    return torch.cat(next_scores), torch.cat(next_rows)


# ----------------------------------------------------------------------------------------------
# Optional: an approximate index with FAISS (pip install faiss-cpu), exact search its reference


@dataclass(frozen=True)
class FaissSettings:
    """faiss_index's knobs for 'ivf' (nlist, nprobe) and 'hnsw' (hnsw_m, ef_search)."""
    nlist: int = None  # lists; None: 4 sqrt(N)
    nprobe: int = 16  # lists searched
    hnsw_m: int = 32  # links per node
    ef_search: int = 128


def faiss_index(index, pair, kind="flat", settings=FaissSettings(), chunk_rows=65536):
    """A FAISS index of one pair's vectors, added chunk by chunk from the shards (inner product;
    cosine when the index is normalised). kind: 'flat' (exact, in memory), 'ivf' (IndexIVFFlat,
    settings.nlist lists, settings.nprobe searched, trained on an evenly spaced sample) or 'hnsw'
    (IndexHNSWFlat, settings.hnsw_m links, settings.ef_search). Holds N x d float32."""
    nlist, nprobe = settings.nlist, settings.nprobe
    hnsw_m, ef_search = settings.hnsw_m, settings.ef_search
    if faiss is None:
        raise ValueError("--index faiss-* needs FAISS: pip install faiss-cpu")
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
        # about 64 training vectors per list, spread over the corpus
        step = max(1, index.num_docs // (64 * nlist))
        sample = [
            vectors[(-first_row) % step::step].clone()
            for first_row, vectors, _ in chunks(index, pair, chunk_rows)]
        built.train(torch.cat(sample).numpy())
        built.nprobe = nprobe
    else:
        raise ValueError(f"unknown FAISS index {kind!r}: use flat, ivf or hnsw")
    for _, vectors, _ in chunks(index, pair, chunk_rows):
        built.add(vectors.numpy())
    return built


def faiss_search(built, queries, depth):
    """(scores, rows), each (Q, depth), from a faiss_index; rows are the index's global rows (-1:
    none found)."""
    scores, rows = built.search(np.ascontiguousarray(queries.float().cpu().numpy()), depth)
    return torch.from_numpy(scores), torch.from_numpy(rows)


def overlap_at_k(rows, exact_rows, k):
    """Recall@k of an approximate search against exact search: the share of the exact top k in the
    approximate top k."""
    found = [
        len(set(a[:k].tolist()) & set(e[:k].tolist())) / len(e[:k])
        for a, e in zip(rows, exact_rows)]
    return float(np.mean(found))
