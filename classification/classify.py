"""Classify with every size of a 2D encoder: MRL's nested classifiers, MRL-E, its baselines and the
2D cascade (README Eq. 18-20; Kusupati et al., 2022).

    # packaged MiniLM, embedded mini_newsgroup
    python -m classification.classify
    python -m classification.classify --dataset polarity --model_name_or_path out/srl
    # 3-class sentiment
    python -m classification.classify --dataset tweets --max_train_samples 4000 --max_eval_samples 2000
    # text<TAB>label, or JSONL {"text", "label"}
    python -m classification.classify --train_file train.tsv --test_file test.tsv
    # encoder and heads end to end (Eq. 19)
    python -m classification.classify --tuning full --max_steps 50

At every layer-dim pair: linear-probe accuracy of one head per pair (MRL) and of one shared, sliced
head (MRL-E), 1-nearest-neighbour accuracy and class-based mAP@10 (training-free), and two baselines
built from the full pair's embedding at the same width d: its top-d SVD directions (fitted on the
training split) and d random coordinates of it (Rand. LP), each with its own probe. Then the cascade
(Eq. 20) at every --thresholds value: accuracy against expected cost (encoder layers run + heads
consulted), relative to classifying at the full pair. Saves results.json and table.md in
--output_dir; --plot adds the curve.
"""
import json
import os
import sys

import torch

import data
import models
from classification import accuracy, cascade, datasets


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL,
                   help="model folder or packaged model name")
    p.add_argument(
        "--dataset", choices=sorted(datasets.CLASSIFICATION_SETS), default="newsgroups",
        help="embedded labelled text, split half/half by --seed: " +
        "; ".join(f"{name}: {about}" for name, about in datasets.CLASSIFICATION_ABOUT.items()))
    p.add_argument("--train_file", default=None,
                   help="text<TAB>label TSV or JSONL {text, label}; with --test_file")
    p.add_argument("--test_file", default=None)
    p.add_argument(
        "--max_train_samples", type=data.positive_int, default=None,
        help="at most this many training texts, drawn at random by --seed (default: all)")
    p.add_argument("--max_eval_samples", type=data.positive_int, default=None,
                   help="likewise for the test texts")
    p.add_argument("--output_dir", default="output/classify",
                   help="results.json and table.md go here")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace an earlier run's results.json and table.md in --output_dir")
    p.add_argument("--pairs", default=None, help="LAYERxDIM list; default: the checkpoint's pairs")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default=None,
                   help="default: the checkpoint's, else mean")
    p.add_argument("--tuning", choices=("probe", "full"), default="probe",
                   help="probe: heads on the frozen encoder's features; full: encoder and heads "
                        "end to end")
    p.add_argument("--num_train_epochs", type=data.positive_int, default=300,
                   help="probe epochs (full batch)")
    p.add_argument("--max_steps", type=data.positive_int, default=50,
                   help="--tuning full: optimizer steps")
    p.add_argument("--per_device_train_batch_size", type=data.positive_int, default=16,
                   help="--tuning full")
    p.add_argument("--learning_rate", type=data.positive_float, default=None,
                   help="default: 1e-2 for probes, 2e-5 end to end")
    p.add_argument("--weight_decay", type=data.non_negative_float, default=1e-4)
    p.add_argument("--max_seq_length", type=data.positive_int, default=256)
    p.add_argument("--per_device_eval_batch_size", type=data.positive_int, default=32)
    p.add_argument("--thresholds", default="0,0.5,0.6,0.7,0.8,0.9,0.95,0.99,1.01",
                   help="cascade confidence thresholds (max softmax probability); 0: the smallest "
                        "pair, >1: the full one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true",
                   help="accuracy vs relative cost as cascade.png (needs matplotlib)")
    args = p.parse_args(argv)
    if (args.train_file is None) != (args.test_file is None):
        p.error("--train_file and --test_file go together")
    try:
        args.thresholds = sorted(float(t) for t in args.thresholds.split(","))
    except ValueError:
        p.error(f"--thresholds {args.thresholds!r}: comma-separated numbers")
    problem = data.output_dir_problem(
        args.output_dir, "pass --overwrite_output_dir to replace them",
        overwrite=args.overwrite_output_dir, held=("results.json", "table.md"))
    if problem:
        p.error(problem)
    return args


def probe_accuracy(classifier, train_x, train_y, test_x, test_y, settings=cascade.ProbeSettings()):
    """{pair: accuracy} of a classifier fitted on train_x and scored on test_x (dicts of (N, d)
    features)."""
    cascade.fit_probe(classifier, train_x, train_y, settings.epochs, settings.learning_rate,
                      settings.weight_decay, settings.seed)
    with torch.no_grad():
        return {
            pair: accuracy.accuracy(logits.argmax(-1), test_y)
            for pair, logits in classifier(test_x).items()}


def table(rows, pairs, costs):
    """Markdown: one row per pair, one column per method (accuracy), and the pair's cost."""
    names = list(rows)
    lines = [
        "| pair | " + " | ".join(names) + " | FLOPs rel. to full |",
        "|---" * (len(names) + 2) + "|"]
    for pair in pairs:
        lines.append(f"| {pair[0]}x{pair[1]} | " + " | ".join(f"{rows[m][pair]:.4f}"
                                                              for m in names) +
                     f" | {costs[pair] / costs[pairs[-1]]:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the heads' initial weights
    device = models.default_device()
    if args.train_file:
        train_texts, train_y, names = datasets.read_labelled_file(args.train_file)
        test_texts, test_y, _ = datasets.read_labelled_file(args.test_file, names)
        source = f"{args.train_file} / {args.test_file}"
    else:
        split = datasets.CLASSIFICATION_SETS[args.dataset](args.seed)
        (train_texts, train_y), (test_texts,
                                 test_y), names = split["train"], split["test"], split["labels"]
        source = (f"embedded {args.dataset}, split {len(train_texts)}/{len(test_texts)} by seed "
                  f"{args.seed}")
    if args.max_train_samples or args.max_eval_samples:
        train_texts, train_y = datasets.subsample(train_texts, train_y, args.max_train_samples,
                                                  args.seed, "train")
        test_texts, test_y = datasets.subsample(test_texts, test_y, args.max_eval_samples,
                                                args.seed, "test")
        source += f", {len(train_texts)}/{len(test_texts)} of them drawn by the seed"
    if len(set(train_y)) < 2:
        raise data.DataError("the training split has fewer than two classes")
    train_y, test_y, C = torch.tensor(train_y), torch.tensor(test_y), len(names)
    path, folder = models.checkpoint_folders(args.model_name_or_path)
    model, tokenizer = models.load_model(folder, device)
    model.eval()
    config, separate = models.read_config(path, model, args.pairs, pooling=args.pooling)
    if separate:
        raise ValueError(f"{path} holds one model per layer (Eq. 7): classify one of its layer_<n> "
                         "folders")
    pairs, H = config.pairs, model.config.hidden_size
    # the baselines start from the full-width embedding of the deepest layer
    full = (pairs[-1][0], H)
    print(f"classify: {source}, {C} classes {names}; pairs {pairs}; {args.tuning}")
    lr = args.learning_rate or (1e-2 if args.tuning == "probe" else 2e-5)

    heads = {
        "MRL": cascade.NestedClassifier(pairs, H, C), "MRL-E": cascade.NestedClassifier(
            pairs, H, C, efficient=True)}
    # one encoder per head kind would double the cost: end to end trains MRL's heads
    if args.tuning == "full":
        model, heads["MRL"] = cascade.train_classifier_end_to_end(
            model, tokenizer, heads["MRL"], train_texts, train_y, config.pooling,
            cascade.EndToEndSettings(args.max_steps, args.per_device_train_batch_size, lr,
                                     args.weight_decay, args.max_seq_length, args.seed))
    encode = lambda texts: models.encode_2d(model, tokenizer, texts, sorted(set(pairs) | {
        full}), config.pooling, args.max_seq_length, args.per_device_eval_batch_size)
    train_x, test_x = encode(train_texts), encode(test_texts)
    probe_settings = cascade.ProbeSettings(args.num_train_epochs, lr, args.weight_decay, args.seed)
    rows = {}
    for name, classifier in heads.items():
        if args.tuning == "full" and name == "MRL":
            with torch.no_grad():
                rows[name] = {
                    p: accuracy.accuracy(v.argmax(-1), test_y)
                    for p, v in classifier(test_x).items()}
            continue
        rows[name] = probe_accuracy(classifier, train_x, train_y, test_x, test_y, probe_settings)
    rows["1-NN"] = {
        p: accuracy.nearest_neighbour_accuracy(train_x[p], train_y, test_x[p], test_y)
        for p in pairs}
    rows["mAP@10"] = {
        p: accuracy.map_at_k(train_x[p], train_y, test_x[p], test_y, 10) for p in pairs}
    directions = cascade.svd_directions(train_x[full], H)  # (H, H), fitted on the training split
    generator = torch.Generator().manual_seed(args.seed)
    for name, project in (("SVD", lambda x, d: x @ directions[:, :d]), (
            "Rand. LP", lambda x, d, cols=torch.randperm(H, generator=generator): x[:, cols[:d]])):
        baseline = {}
        for n, d in pairs:
            probe = cascade.NestedClassifier([(n, d)], d, C)
            baseline.update(
                probe_accuracy(probe, {(n, d): project(train_x[full], d)}, train_y, {
                                           (n, d): project(test_x[full], d)}, test_y,
                               probe_settings))
        rows[name] = baseline
    costs = cascade.classification_costs(model, tokenizer, test_texts, pairs, C,
                                         args.max_seq_length)
    outcomes = cascade.cascade_outcomes(
        model, tokenizer, test_texts, test_y.tolist(), heads["MRL"], cascade.CascadeSettings(
            config.pooling, args.max_seq_length, args.per_device_eval_batch_size, C),
        features=test_x)
    points = cascade.cascade_points(outcomes, args.thresholds)

    text = [
        f"# {source}; model {path}; {args.tuning}", "",
        "Accuracy (mAP@10 for the class-based retrieval column); "
        "SVD and Rand. LP: d dimensions of the full pair's embedding.", "",
        table(rows, pairs, costs), "",
        "Cascade (Eq. 20, MRL heads): threshold, accuracy, expected FLOPs relative to the full "
        "pair, share stopped at each pair", "", "| threshold | accuracy | FLOPs rel. | stopped |",
        "|---|---|---|---|"]
    text += [f"| {p['threshold']:g} | {p['accuracy']:.4f} | {p['relative_cost']:.3f} | "
             f"{' '.join(f'{s:.2f}' for s in p['stopped'])} |" for p in points]
    os.makedirs(args.output_dir, exist_ok=True)
    open(os.path.join(args.output_dir, "table.md"), "w").write("\n".join(text) + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "command": "python -m classification.classify " +
                " ".join(sys.argv[1:] if argv is None else argv), "data": source, "model": path,
                "labels": names, "pairs": [list(p) for p in pairs], "accuracy": {
                    m: {f"{n}x{d}": v for (n, d), v in r.items()}
                    for m, r in rows.items()}, "relative_cost": {
                        f"{n}x{d}": costs[(n, d)] / costs[pairs[-1]]
                        for n, d in pairs}, "cascade": points}, f, indent=2)
    print("\n".join(text))
    if args.plot:
        print(
            cascade.plot_cascade(points, rows["MRL"], costs, pairs,
                                 os.path.join(args.output_dir, "cascade.png")))
    return rows, points


if __name__ == "__main__":
    data.run_command(main)
