"""Reproduce the shape of the paper's Tables A1/A2 at small scale and write RESULTS.md.

    # CPU default: packaged MiniLM-L6, embedded data, 3 seeds
    python bench/reproduce.py
    # 12 x 768, for a GPU
    python bench/reproduce.py --scale paper --model_name_or_path all-mpnet-base-v2/

Trains full (Eq. 6), separate (Eq. 7), 2dmse (Eq. 9: sentence-transformers' Matryoshka2dLoss, the
paper's STS row), 2dmse_retrieval (Eq. 9': the authors' retrieval code, the paper's MS MARCO row),
mrl (Eq. 8), srl (Eq. 5), smae+srl (Eq. 13 pre-training, then Eq. 5) and the SMAE ablations
mlm_2d+srl (the sliced MLM without the MAE decoder) and mlm+srl (plain MLM), each then SRL, on
identical data, steps and seeds with the scripts a user runs; evaluates every layer x dim of the
grid; adds MRL's classification rows (classification/classify.py); writes RESULTS.md (mean +- std
over seeds, the paper's numbers beside them, verdicts on the paper's claims) and one heat map per
method and metric. Each finished run is kept under --output_dir, so an interrupted study resumes
where it stopped.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402
import finetune  # noqa: E402 (its main only: each run is its command line)
import models  # noqa: E402
import pretrain  # noqa: E402 (its main only)
import starbucks as sb  # noqa: E402
from classification import classify  # noqa: E402 (its main only)
from classification import datasets  # noqa: E402

METHODS = [
    "full", "separate", "2dmse", "2dmse_retrieval", "mrl", "srl", "smae+srl", "mlm_2d+srl",
    "mlm+srl"]
# method: pretrain.py --objective
PRETRAINED = {"smae+srl": "smae", "mlm_2d+srl": "mlm_2d", "mlm+srl": "mlm"}
METRICS = [("lee2005", "Spearman"), ("wiki-ict", "nDCG@10"), ("wiki-ict", "MRR@10")]
# The paper's Tables A1/A2 (BERT-base): STS avg Spearman / MS MARCO dev MRR@10, per (n, d) and
# method.
PAPER = {
    (2, 32): {
        "separate": (.6948, .2092), "2dmse": (.6841, .1589), "srl": (.7214, .2147),
        "smae+srl": (.7362, .2282)},
    (4, 64): {
        "separate": (.7326, .2692), "2dmse": (.7068, .2266), "srl": (.7466, .2722),
        "smae+srl": (.7764, .2950)},
    (6, 128): {
        "separate": (.7657, .2935), "2dmse": (.7187, .2532), "srl": (.7635, .2983),
        "smae+srl": (.7931, .3274)},
    (8, 256): {
        "separate": (.7894, .3160), "2dmse": (.7401, .2770), "srl": (.7833, .3159),
        "smae+srl": (.7981, .3369)},
    (10, 512): {
        "separate": (.7946, .3279), "2dmse": (.7568, .3022), "srl": (.7935, .3249),
        "smae+srl": (.7994, .3416)},
    (12, 768): {
        "separate": (.8095, .3341), "2dmse": (.7962, .3185), "srl": (.8010, .3266),
        "smae+srl": (.7991, .3403)}, }
SCALES = {  # training budget per run; the paper scale assumes a GPU
    "cpu": {"max_steps": 30, "batch": 16, "group": 2, "pretrain_steps": 300, "pretrain_batch": 8,
            "pretrain_max_length": 128},
    "paper": {"max_steps": 1000, "batch": 128, "group": 4, "pretrain_steps": 2000,
              "pretrain_batch": 64, "pretrain_max_length": 512},
}


@dataclass
class Study:
    """What the study runs: the command line's settings as values (parse_args builds one)."""
    scale: str = "cpu"
    model_name_or_path: str = data.DEFAULT_MODEL
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = None  # default: the scale's budget
    learning_rate: float = 1e-4
    output_dir: str = "output/reproduce"
    # the report; None: <output_dir>/RESULTS.md (the committed one only when named)
    results: str = None
    plot: bool = False
    plot_dir: str = None  # None: <output_dir>/heatmaps
    classification_dataset: str = "tweets"  # classification/classify.py --dataset
    # classification texts drawn per seed (classification/classify.py's flags)
    max_train_samples: int = 2000
    max_eval_samples: int = 1000


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_steps", type=int, default=None, help="default: the scale's budget")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--output_dir", default="output/reproduce")
    p.add_argument(
        "--results", default=None, help="where the report goes; default: <output_dir>/RESULTS.md. "
        "The committed file is regenerated only with --results RESULTS.md")
    p.add_argument("--plot", action="store_true", help="heat maps per method (needs matplotlib)")
    p.add_argument(
        "--plot_dir", default=None, help="where the heat maps go; default: <output_dir>/heatmaps "
        "(the committed ones: docs/heatmaps)")
    p.add_argument(
        "--classification_dataset", choices=sorted(datasets.CLASSIFICATION_SETS), default="tweets",
        help="the classification table's labelled text (classification/classify.py "
        "--dataset)")
    p.add_argument("--max_train_samples", type=int, default=2000,
                   help="classification training texts per seed")
    p.add_argument("--max_eval_samples", type=int, default=1000,
                   help="classification test texts per seed")
    study = Study(**vars(p.parse_args(argv)))
    study.results = study.results or os.path.join(study.output_dir, "RESULTS.md")
    study.plot_dir = study.plot_dir or os.path.join(study.output_dir, "heatmaps")
    return study


def pretrain_once(objective, study, scale):
    """Pre-train once per objective (at the first seed) and share it across the fine-tuning seeds,
    as the paper fine-tunes its one released SMAE checkpoint; the std over seeds is then the
    fine-tuning's."""
    folder = os.path.join(study.output_dir, f"pretrained_{objective}")
    done = os.path.join(folder, "PRETRAINED_DONE")
    if not os.path.exists(done):  # a pre-training left unfinished starts over
        pretrain.main([
            "--model_name_or_path", study.model_name_or_path, "--output_dir", folder, "--objective",
            objective, "--max_steps",
            str(scale["pretrain_steps"]), "--seed",
            str(study.seeds[0]), "--per_device_train_batch_size",
            str(scale["pretrain_batch"]), "--max_length",
            str(scale["pretrain_max_length"]), "--overwrite_output_dir"])
        open(done, "w").close()
    return folder


def train_run(method, seed, study, scale, run_dir):
    """Train one method at one seed with the user-facing scripts; returns the checkpoint folder."""
    steps = study.max_steps or scale["max_steps"]
    common = [
        "--max_steps",
        str(steps), "--per_device_train_batch_size",
        str(scale["batch"]), "--train_group_size",
        str(scale["group"]), "--learning_rate",
        str(study.learning_rate), "--seed",
        str(seed), "--overwrite_output_dir"]  # a run left unfinished starts over
    start_from = study.model_name_or_path
    if method in PRETRAINED:  # SMAE or one of its ablations, then SRL
        start_from = pretrain_once(PRETRAINED[method], study, scale)
    out = os.path.join(run_dir, "model")
    finetune.main(["--model_name_or_path", start_from, "--output_dir", out,
                   "--method", "srl" if method in PRETRAINED else method, *common])
    return out


def run_all(study):
    """{method: {seed: results}} where results = {dataset: {'nxd': {metric: value}}} on the full
    grid."""
    scale = SCALES[study.scale]
    datasets = {
        "lee2005": ("sts", metrics.lee_sts()),
        "wiki-ict": ("retrieval", metrics.embedded_retrieval_set())}
    eval_settings = metrics.EvalSettings(grid=True)
    device = models.default_device()
    results = {}
    for seed in study.seeds:
        for method in study.methods:
            run_dir = os.path.join(study.output_dir, f"{method}_seed{seed}")
            done = os.path.join(run_dir, "results.json")
            if not os.path.exists(done):  # finished runs are kept: an interrupted study resumes
                started, cpu_started = time.time(), time.process_time()
                checkpoint = train_run(method, seed, study, scale, run_dir)
                _, figures = metrics.evaluate_model(checkpoint, datasets, eval_settings, device)
                os.makedirs(run_dir, exist_ok=True)
                json.dump(
                    {
                        "results": figures, "seconds": time.time() - started, "commit": _commit(),
                        "cpu_seconds": time.process_time() - cpu_started}, open(done + ".tmp", "w"))
                os.replace(done + ".tmp", done)
            results.setdefault(method, {})[seed] = json.load(open(done))
            print(f"{method} seed {seed}: {results[method][seed]['seconds']:.0f}s", flush=True)
    return results


def classification_rows(study, seed, pairs):
    """{'rows': {row: {'nxd': accuracy}}, 'commit'} on classification/classify.py's embedded
    --classification_dataset, split and subsampled by the seed: MRL / MRL-E heads, the SVD and Rand.
    LP baselines and 1-NN on the starting encoder (frozen, probes), FF as the study's separately
    trained encoders (Eq. 7) with a probe at their own pair, and the study's SRL encoder with a
    probe. Kept in <output_dir>/classification_<dataset>_<train>_<test>_seed<S>.json with the commit
    that computed it (the report names it), so a finished seed is not recomputed."""
    stem = (f"classification_{study.classification_dataset}_{study.max_train_samples}_"
            f"{study.max_eval_samples}_seed{seed}")
    done = os.path.join(study.output_dir, stem + ".json")
    if not os.path.exists(done):
        folder = os.path.join(study.output_dir, stem)

        def accuracy(model, name, *extra):
            rows, _ = classify.main([
                "--model_name_or_path", model, "--output_dir",
                os.path.join(folder, name), "--seed",
                str(seed), "--dataset", study.classification_dataset, "--max_train_samples",
                str(study.max_train_samples), "--max_eval_samples",
                str(study.max_eval_samples), *extra])
            return {
                row: {f"{n}x{d}": v for (n, d), v in by_pair.items()}
                for row, by_pair in rows.items()}
        base = accuracy(study.model_name_or_path, "base")
        rows = {name: base[name] for name in ("MRL", "MRL-E", "SVD", "Rand. LP", "1-NN")}
        if "separate" in study.methods:
            rows["FF (separate)"] = {}
            for n, d in pairs:
                layer = os.path.join(study.output_dir, f"separate_seed{seed}", "model",
                                     f"layer_{n}")
                # one pair: no cascade
                rows["FF (separate)"].update(accuracy(layer, f"separate_{n}x{d}", "--pairs",
                                                      f"{n}x{d}", "--thresholds", "1.01")["MRL"])
        if "srl" in study.methods:
            rows["SRL + probe"] = accuracy(
                os.path.join(study.output_dir, f"srl_seed{seed}", "model"), "srl")["MRL"]
        json.dump({"rows": rows, "commit": _commit()}, open(done + ".tmp", "w"))
        os.replace(done + ".tmp", done)
    saved = json.load(open(done))
    # kept before records named their commit
    return saved if "rows" in saved else {"rows": saved, "commit": None}


def classification_table(by_seed, pairs):
    """Markdown lines: one row per pair, one column per classification row, mean +- std over
    seeds."""
    names = list(next(iter(by_seed.values())))
    lines = ["| (n,d) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, d in pairs:
        cells = []
        for name in names:
            values = [rows[name][f"{n}x{d}"] for rows in by_seed.values()]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {std:.4f}")
        lines.append(f"| {n},{d} | " + " | ".join(cells) + " |")
    return lines


def summarise(results, pairs):
    """{(dataset, metric): {pair: {method: (mean, std)}}} over seeds."""
    table = {}
    for dataset, metric in METRICS:
        for pair in pairs:
            key = f"{pair[0]}x{pair[1]}"
            for method, by_seed in results.items():
                values = [r["results"][dataset][key][metric] for r in by_seed.values()]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table.setdefault((dataset, metric),
                                 {}).setdefault(pair, {})[method] = (statistics.mean(values), std)
    return table


def verdicts(table, pairs, methods):
    """Plain-words verdicts on the paper's three claims, computed from the table, with the seeds'
    spread beside each difference: a difference smaller than the methods' std over seeds is not
    evidence."""
    lines = []
    for (dataset, metric), rows in table.items():
        name = f"{dataset} {metric}"

        def noise(a, b, at=pairs):
            # sum of the two stds, mean over pairs
            return statistics.mean(rows[p][a][1] + rows[p][b][1] for p in at)
        for baseline in [m for m in ("2dmse", "2dmse_retrieval") if {"srl", m} <= set(methods)]:
            losses = [p for p in pairs if rows[p]["srl"][0] < rows[p][baseline][0]]
            holds = "does not hold" if losses else "holds"
            within = [
                p for p in losses
                if rows[p][baseline][0] - rows[p]["srl"][0] <= noise("srl", baseline, [p])]
            detail = (f"; where SRL is behind ({', '.join(f'{n}x{d}' for n, d in losses)}), the "
                      f"gap is {'within' if len(within) == len(losses) else 'beyond'} the two "
                      "methods' std over seeds"
                      if losses else "")
            lines.append(f"- Claim 1 (SRL >= 2DMSE at every pair; {baseline}), {name}: {holds} "
                         f"here; SRL is at least as good at {len(pairs) - len(losses)} of "
                         f"{len(pairs)} pairs{detail}.")
        if {"srl", "separate"} <= set(methods):
            gaps = [rows[p]["srl"][0] - rows[p]["separate"][0] for p in pairs]
            spread = noise("srl", "separate")
            close = "holds" if abs(statistics.mean(gaps)) <= max(0.01, spread) else "does not hold"
            lines.append(f"- Claim 2 (SRL close to separately trained), {name}: {close} here; mean "
                         f"gap SRL - separate {statistics.mean(gaps):+.4f} (range {min(gaps):+.4f} "
                         f".. {max(gaps):+.4f}); 'close' means within max(0.01, mean std of the "
                         f"two) = {max(0.01, spread):.4f}.")
        if {"srl", "smae+srl"} <= set(methods):
            lifts = [rows[p]["smae+srl"][0] - rows[p]["srl"][0] for p in pairs]
            small, large = statistics.mean(lifts[:len(pairs) // 2]), statistics.mean(
                lifts[len(pairs) // 2:])
            spread = noise("srl", "smae+srl", pairs[:len(pairs) // 2])
            holds = "holds" if small > large and small > 0 else "does not hold"
            if holds == "holds" and small <= spread:
                holds = "is not shown beyond seed noise"
            lines.append(f"- Claim 3 (SMAE lifts the small pairs most), {name}: {holds} here; lift "
                         f"of SMAE+SRL over SRL on the smaller half of the pairs {small:+.4f}, on "
                         f"the larger half {large:+.4f} (per pair: "
                         f"{', '.join(f'{x:+.4f}' for x in lifts)}); the two methods' std over "
                         f"seeds on the smaller half sums to {spread:.4f}.")
        small_half = pairs[:len(pairs) // 2]
        for ablation in [m for m in ("mlm_2d+srl", "mlm+srl") if {"smae+srl", m} <= set(methods)]:
            lead = statistics.mean(rows[p]["smae+srl"][0] - rows[p][ablation][0]
                                   for p in small_half)
            spread = noise("smae+srl", ablation, small_half)
            lines.append(f"- SMAE ablation (SMAE against {PRETRAINED[ablation]} pre-training, both "
                         f"then SRL), {name}: SMAE+SRL leads {ablation} by {lead:+.4f} on the "
                         "smaller half of the pairs "
                         f"({'beyond' if abs(lead) > spread else 'within'} the two methods' summed "
                         f"std, {spread:.4f}).")
    return lines


def write_report(study, results, pairs, seconds, cpu_seconds, command, classification=None):
    table = summarise(results, pairs)
    scale = SCALES[study.scale]
    methods = [m for m in METHODS if m in results]
    out = [
        "# Small-scale reproduction of Starbucks (Tables A1/A2 shape)", "",
        f"Produced by `{command}` (bench/reproduce.py) at commit {_commit()}; nothing in this "
        "file is typed by hand. Its runs were trained at commit(s) " + ", ".join(
            sorted({
                run.get("commit", "not recorded (before runs recorded theirs)")
                for by_seed in results.values()
                for run in by_seed.values()})) + "; a study that resumes reads the runs it kept.",
        "", f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, device "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}; training + "
        f"evaluation wall time {seconds / 60:.1f} min (sum over runs), CPU time "
        f"{cpu_seconds / 60:.1f} min (all threads: the work itself, which does not grow when "
        "other jobs share the machine; the wall time does).",
        f"- Model: {study.model_name_or_path}; scale `{study.scale}`: {SCALES[study.scale]}, "
        f"learning rate {study.learning_rate}, seeds {study.seeds}.",
        "- Pre-training budget (smae+srl and its ablations): one run per objective, "
        f"{scale['pretrain_steps']} steps x {scale['pretrain_batch']} crops of at most "
        f"{scale['pretrain_max_length']} tokens (at most "
        f"{scale['pretrain_steps'] * scale['pretrain_batch'] * scale['pretrain_max_length']:,} "
        f"tokens) at seed {study.seeds[0]}, shared by the fine-tuning seeds. The authors' SMAE "
        "run reads FineWeb's sample-100BT for one epoch in 512-token crops at a global batch of "
        "512, of the order of 10^11 tokens: the claim about SMAE is tested here at about a "
        "millionth of the paper's pre-training.",
        "- Data: real text, NON-STANDARD tasks. Training: inverse-cloze pairs over Lee's "
        "background news and Wikipedia articles (data.py). STS: Lee et al. (2005), 50 "
        "documents, 1225 human-scored pairs (Spearman). Retrieval: inverse-cloze over held-out "
        "Wikipedia articles (nDCG@10, MRR@10).",
        "- The paper's numbers (BERT-base, STS average Spearman and MS MARCO dev MRR@10) are "
        "shown for the shape of the comparison only: different model, data and budget, so only "
        "the orderings are comparable.", ""]
    for (dataset, metric), rows in table.items():
        out += [f"## {dataset} {metric} (mean +- std over {len(study.seeds)} seeds)", "",
                "| (n,d) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for pair in pairs:
            out.append(f"| {pair[0]},{pair[1]} | " + " | ".join(
                f"{rows[pair][m][0]:.4f} +- {rows[pair][m][1]:.4f}" for m in methods) + " |")
        out.append("| mean | " + " | ".join(f"{statistics.mean(rows[p][m][0] for p in pairs):.4f}"
                                            for m in methods) + " |")
        out.append("")
    out += ["## The paper's numbers for reference (STS Spearman / MS MARCO MRR@10)", "",
            "Their 2DMSE column: STS from sentence-transformers' Matryoshka2dLoss (our `2dmse`), "
            "MS MARCO from the authors' retrieval code (our `2dmse_retrieval`).", "",
            "| (n,d) | separate | 2dmse | srl | smae+srl |", "|---|---|---|---|---|"]
    for pair, row in PAPER.items():
        out.append(f"| {pair[0]},{pair[1]} | " + " | ".join(f"{a:.4f} / {b:.4f}"
                                                            for a, b in row.values()) + " |")
    out += ["", "## Verdicts on the paper's claims", ""] + verdicts(table, pairs, methods)
    if classification:
        out += [
            "", f"## Classification: MRL's side (README Eq. 18-20), accuracy, mean +- std over "
            f"{len(classification)} seeds", "", f"Labelled text: "
            f"{datasets.CLASSIFICATION_ABOUT[study.classification_dataset]}; each seed splits "
            f"the set half/half and draws at most {study.max_train_samples} training and "
            f"{study.max_eval_samples} test texts from it (the std covers the split, the draw "
            "and the heads' initialisation). MRL, MRL-E, SVD, Rand. LP and 1-NN: the starting "
            "encoder, frozen, with probes (`classification/classify.py`); SVD and Rand. LP "
            "take d coordinates of the full pair's embedding. FF (separate): the study's "
            "separately trained encoders (Eq. 7), a probe at each one's own pair. SRL + probe: "
            "the study's SRL encoder, frozen, MRL heads. Both were fine-tuned on the retrieval "
            "data above, not on these labels. Computed at commit(s) " +
            ", ".join(sorted({r["commit"] or "not recorded"
                              for r in classification.values()})) + ".", ""]
        out += classification_table({seed: r["rows"] for seed, r in classification.items()}, pairs)
    if study.plot:
        means = {
            m: {
                d: {
                    f"{n}x{k}": {
                        metric: statistics.mean(r["results"][d][f"{n}x{k}"][metric]
                                                for r in results[m].values())
                        for metric in results[m][study.seeds[0]]["results"][d][f"{n}x{k}"]}
                    for n, k in _grid(results)} for d in ("lee2005", "wiki-ict")} for m in methods}
        os.makedirs(study.plot_dir, exist_ok=True)
        paths = metrics.plot_heatmaps(means, study.plot_dir)
        out += ["", "## Heat maps (layer x dim, mean over seeds)", ""]
        out += [
            f"![{os.path.basename(p)}]"
            f"({os.path.relpath(p, os.path.dirname(os.path.abspath(study.results)))})"
            for p in paths if "MRR" not in p and "R100" not in p and "R1000" not in p]
    open(study.results, "w").write("\n".join(out) + "\n")


def _commit():
    """The code's git commit, so that a reader can check out exactly what produced the numbers."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, cwd=os.path.dirname(
                                  os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _grid(results):
    any_run = next(iter(next(iter(results.values())).values()))
    return [tuple(map(int, k.split("x"))) for k in any_run["results"]["lee2005"]]


def main(argv=None):
    study = parse_args(argv)
    command = "python bench/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_all(study)
    model, _ = models.load_model(study.model_name_or_path, torch.device("cpu"))
    pairs = sb.default_pairs(model.config.num_hidden_layers, model.config.hidden_size)
    runs = [run for by_seed in results.values() for run in by_seed.values()]
    seconds, cpu_seconds = sum(r["seconds"] for r in runs), sum(
        r.get("cpu_seconds", float("nan")) for r in runs)
    classification = {seed: classification_rows(study, seed, pairs) for seed in study.seeds}
    write_report(study, results, pairs, seconds, cpu_seconds, command.strip(), classification)
    print(open(study.results).read())


if __name__ == "__main__":
    main()
