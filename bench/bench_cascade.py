"""The 2D classification cascade (README Eq. 20) against the full pair, side by side in one run.

    python bench/bench_cascade.py                                    # packaged MiniLM, embedded mini_newsgroup
    python bench/bench_cascade.py --model_name_or_path output/demo/srl

MRL heads are fitted on the frozen encoder's training-split features (Eq. 18-19); the cascade's thresholds are
swept on the test split and the cheapest operating point whose accuracy is within 0.5 points of the full pair's
is kept (the selection uses the test split itself, as MRL's own table of operating points does). Its expected
encoder + head FLOPs over the full pair's give the first ratio; its wall time over the full pair's on the same
test texts (median of --repeats rounds, the two alternated) the second.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluation  # noqa: E402
import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402
from timing import median_ratio  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=models.DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    split = data.newsgroups_classification(seed=0)
    (train_texts, train_y), (test_texts, test_y) = split["train"], split["test"]
    model, tokenizer = models.load_model(args.model_name_or_path, torch.device("cpu"))
    model.eval()
    config, _ = models.read_config(models.resolve_model_path(args.model_name_or_path), model)
    pairs, C = config.pairs, len(split["labels"])
    features = sb.encode_2d(model, tokenizer, train_texts, pairs, config.pooling, 256, args.batch_size)
    heads = training.fit_probe(sb.NestedClassifier(pairs, model.config.hidden_size, C), features,
                               torch.tensor(train_y))
    thresholds = [round(0.5 + 0.01 * i, 2) for i in range(50)] + [0.995, 0.999, 1.01]
    points = evaluation.cascade_points(model, tokenizer, test_texts, test_y, heads, pairs, thresholds,
                                       config.pooling, 256, args.batch_size, C)
    full_accuracy = points[-1]["accuracy"]  # threshold > 1: every example at the full pair
    chosen = min((q for q in points if q["accuracy"] >= full_accuracy - 0.005), key=lambda q: q["relative_cost"])

    enc = [tokenizer(test_texts[s:s + args.batch_size], padding=True, truncation=True, max_length=256,
                     return_tensors="pt") for s in range(0, len(test_texts), args.batch_size)]
    runs = {"cascade": lambda: [sb.cascade_classify(model, e["input_ids"], e["attention_mask"], heads, pairs,
                                                    chosen["threshold"], config.pooling) for e in enc],
            "full": lambda: [sb.cascade_classify(model, e["input_ids"], e["attention_mask"], heads, pairs[-1:], 0.0,
                                                 config.pooling) for e in enc]}
    for run in runs.values():  # a warm-up round, untimed
        run()
    ratio, cascade_s, full_s = median_ratio(runs["cascade"], runs["full"], args.repeats)
    print(f"# {args.model_name_or_path} on mini_newsgroup ({len(test_texts)} test texts), pairs {pairs}: full pair "
          f"accuracy {full_accuracy:.4f}; cascade threshold {chosen['threshold']} accuracy {chosen['accuracy']:.4f}, "
          f"stopped per pair {[round(s, 2) for s in chosen['stopped']]}; median of {args.repeats}: cascade "
          f"{cascade_s:.3f}s, full {full_s:.3f}s")
    print(f"RATIO cascade_cost_vs_full_at_full_accuracy {chosen['relative_cost']:.3f} goal <=0.4")
    print(f"RATIO cascade_time_vs_full {ratio:.3f} goal <=0.6")


if __name__ == "__main__":
    main()
