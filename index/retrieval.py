"""A model evaluated over the on-disk index (evaluate.py --beir_dirs / --msmarco): the corpus
encoded once into shards (corpus_index.encode_corpus), every pair searched shard by shard, exact or
FAISS.
"""
import functools
import hashlib
import json
import os

from tqdm import tqdm

import models
import training
from index import corpus_index as ci


def hits_graded(index, scores, rows, qids, qrels):
    """{qid: [(grade, rank)]} of the judged documents among each judged query's hits (rows best
    first; -1: none)."""
    graded = {}
    for qid, ranked in ci.ranked_lists(index, scores, rows, qids):
        judgments = qrels.get(qid)
        if judgments:
            graded[qid] = [(judgments[d], rank) for rank, (d, _) in enumerate(ranked, 1)
                           if d in judgments]
    return graded


def index_folder(settings, model_path, name):
    """Where a model's index of a dataset lives: <index_dir>/<model folder name>-<tag>/<dataset>;
    the tag hashes the model's weights by content (training.file_fingerprint), so that another or a
    retrained model never reuses this one's vectors and a moved copy does (the index itself refuses
    other pairs, pooling, lengths or corpus text)."""
    # no weight file: by place
    weights = training.file_fingerprint(model_path) or os.path.abspath(model_path)
    tag = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(settings.index_dir,
                        f"{os.path.basename(os.path.normpath(model_path))}-{tag}", name)


def encoded_index(model, tokenizer, folder, corpus, config, settings):
    """The corpus's sharded index for this model in folder (index_folder; encoded once, resumably;
    under torchrun each rank encodes its slice of the shards): every evaluated pair and every
    --adaptive pair, so that both use one folder."""
    pairs = set(config.pairs)
    if settings.adaptive:
        from deploy import funnel
        pairs |= set(funnel.parse_funnel(settings.adaptive)[0])
    pairs, name = sorted(pairs), os.path.basename(folder)  # the dataset's name
    encoding = ci.EncodeSettings(config.pooling, settings.passage_max_len, settings.batch_size,
                                 config.similarity == "cos", settings.shard_size,
                                 settings.storage_dtype)
    ci.encode_corpus(model, tokenizer, corpus.read(), pairs, folder, encoding,
                     progress=lambda it: tqdm(it, desc=f"{name} shard", leave=False))
    return ci.open_index(folder)


def index_retrieval(model, tokenizer, folder, dataset, pairs, config, settings):
    """{pair: (scores, rows)} of every query at every pair over the corpus's sharded index in
    folder (index_folder), exact or FAISS; the index; and, for FAISS, {pair: recall@10 against
    exact search}."""
    (corpus, queries, _), name = dataset, os.path.basename(folder)
    normalize = config.similarity == "cos"
    index = encoded_index(model, tokenizer, folder, corpus, config, settings)
    q_emb = models.encode_2d(model, tokenizer, list(queries.values()), pairs, config.pooling,
                             settings.query_max_len, settings.batch_size, normalize)
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
