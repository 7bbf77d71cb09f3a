"""The trade-off of depth x width x precision on the embedded retrieval set (wiki-ict, inverse-cloze
over held-out Wikipedia: a NON-STANDARD task): for every pair of the model and every precision
(float32, float16, int8, binary), bytes per vector, nDCG@10 and R@100 of exhaustive search, what
each keeps against float32 at the full (largest) pair and at its own pair, and search time.

    python -m index.precision_table --model_name_or_path output/demo/srl

Prints one markdown table (docs/precision.md), the same compact (int8 and binary rows, the README's)
and the worst pair's int8 nDCG@10 kept.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from index import corpus_index as ci, precision  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL)
    p.add_argument("--threads", type=data.positive_int, default=1, help="torch and FAISS threads")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(args.model_name_or_path, torch.device("cpu"))
    model.eval()
    config, _ = models.read_config(models.resolve_model_path(args.model_name_or_path), model)
    corpus, queries, qrels = metrics.embedded_retrieval_set()
    qids, normalize = list(queries), config.similarity == "cos"
    q = models.encode_2d(model, tokenizer, [queries[x] for x in qids], config.pairs,
                         config.pooling, 32, 64, normalize)
    with tempfile.TemporaryDirectory(prefix="precision_table_") as folder:
        indexes = precision.coded_indexes(
            model, tokenizer, corpus, config.pairs, folder,
            ci.EncodeSettings(config.pooling, 128, 64, normalize, shard_size=len(corpus)))
        results = precision.precision_results(indexes, config.pairs, q, qids, qrels,
                                              precision.PRECISIONS)
    full = max(config.pairs)
    print(f"wiki-ict (NON-STANDARD inverse-cloze): {len(corpus)} passages, {len(qids)} queries, "
          f"model {args.model_name_or_path}, similarity {config.similarity}; exhaustive search "
          f"(depth 100), {args.threads} thread(s); kept: over float32 at the full pair "
          f"{full[0]}x{full[1]}, and at the same pair; binary: ceil(d/8) bytes")
    print(precision.format_table(results, full))
    print("\nThe same, compact (README):")
    print(precision.format_compact(results))
    worst = min(config.pairs,
                key=lambda pair: precision.kept(results, pair, "int8", (pair, "float32")))
    print(f"int8 nDCG@10 kept at the worst pair ({worst[0]}x{worst[1]}): "
          f"{precision.kept(results, worst, 'int8', (worst, 'float32')):.4f}")
    return results


if __name__ == "__main__":
    data.run_command(main)
