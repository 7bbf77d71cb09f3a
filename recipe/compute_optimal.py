"""Compute-optimal recipe (Ziarko et al., 2024): which tuning method and size for a FLOP budget
(README Eq. 15).

    # the default grid on the embedded data
    python -m recipe.compute_optimal
    python -m recipe.compute_optimal --sizes smollm2-135m:2,smollm2-135m:4,random:2x128 --tunings full,lora,freeze:1 \\
        --budgets 2e12,6e12,2e13 --target_budget 2e13 --plot --output_dir output/recipe

Grid: sizes x tuning methods x FLOP budgets. A size is the packaged SmolLM2-135M cut to its first K
blocks (`smollm2-135m:K`; final norm kept) or a random-init Llama of L blocks x H (`random:LxH`)
with SmolLM2's tokenizer. Every run fine-tunes with finetune.py's loop (contrastive loss of the full
model, Eq. 6, or with --method symmetric Ziarko's Eq. 17; mean pooling, cosine / 0.025 = Ziarko's
scale 40) for the steps its budget buys (Eq. 15), then measures the held-out contrastive loss
(inverse-cloze queries vs their passages, in-batch negatives; real text, NON-STANDARD task) and
Spearman on Lee et al. (2005).

Each run's result is a JSON file under output_dir/runs: a rerun skips finished runs, and an
interrupt loses at most the run in progress. Then, per (method, size), a least-squares line of the
metric in log10(budget); the recommendation for --target_budget is the (method, size) with the best
fitted value, and its number of training tokens is budget / FLOPs per token (Eq. 15).
"""
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
import numpy as np
import torch

import data
import metrics
import finetune
import models
import starbucks as sb
import training
from recipe import flops, tuning

METRICS = {"eval_loss": "lower", "spearman": "higher"}  # which way is better


# ----------------------------------------------------------------------------------------------
# Sizes: SmolLM2 cut to its first K blocks, or a random-init Llama

def parse_size(text):
    """'smollm2-135m:K' -> ('smollm2-135m', K); 'random:LxH' -> ('random', (L, H))."""
    name, _, spec = text.partition(":")
    if name == "random":
        layers, _, hidden = spec.partition("x")
        if layers.isdigit() and hidden.isdigit() and int(layers) >= 1 and int(
                hidden) >= 64 and int(hidden) % 64 == 0:
            return name, (int(layers), int(hidden))
    elif name in data.PACKAGED_MODELS and spec.isdigit() and int(spec) >= 1:
        return name, int(spec)
    raise ValueError(f"cannot read size {text!r}: use smollm2-135m:K (its first K blocks) or "
                     "random:LxH (H a multiple of 64)")


def first_blocks(model, k):
    """A copy of a decoder with only its first k blocks (embeddings and final norm kept)."""
    blocks = sb.transformer_layers(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"cannot keep {k} blocks of a model with {len(blocks)}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = k
    small = type(model)(config)
    prefix = "layers."
    small.load_state_dict({name: t for name, t in model.state_dict().items()
                           if not name.startswith(prefix) or int(name.split(".")[1]) < k})
    return small.eval()


def random_llama(layers, hidden, vocab_size, seed=0):
    """A random-init Llama of SmolLM2's shape ratios: heads of 64, MLP 8/3 H, tied embeddings."""
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                         intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=True, rope_parameters={
                             "rope_theta": 100000.0, "rope_type": "default"})
    return LlamaModel(config).eval()


class Sizes:
    """Builds each size's fresh model; the packaged model is loaded once (dequantising takes ~20
    s)."""

    def __init__(self):
        self.loaded = {}

    def base(self, name):
        if name not in self.loaded:
            self.loaded[name] = models.load_model(name, torch.device("cpu"))
        return self.loaded[name]

    def build(self, size):
        """-> (model, tokenizer) for a size string, newly made (training changes it)."""
        name, spec = parse_size(size)
        if name == "random":
            tokenizer = self.base("smollm2-135m")[1]
            return random_llama(*spec, vocab_size=len(tokenizer)), tokenizer
        model, tokenizer = self.base(name)
        return first_blocks(model, spec), tokenizer


# ----------------------------------------------------------------------------------------------
# One run: fine-tune for a budget, then measure


def eval_loss(model, tokenizer, pairs_of_texts, grid, pooling="mean", similarity="cos",
              batch_size=32):
    """Held-out Eq. 3 loss at the full pair: each query against the batch's passages (in-batch
    negatives), at the grid's temperature and query and passage lengths."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    losses = []
    with torch.no_grad():
        for start in range(0, len(pairs_of_texts) - batch_size + 1, batch_size):
            queries, passages = zip(*pairs_of_texts[start:start + batch_size])
            q_tok, p_tok = training.tokenize_batch(tokenizer, list(queries), list(passages),
                                                   grid.query_max_len, grid.passage_max_len)
            q = sb.embed_2d(model, q_tok["input_ids"], q_tok["attention_mask"], [(L, H)],
                            pooling)[(L, H)]
            p = sb.embed_2d(model, p_tok["input_ids"], p_tok["attention_mask"], [(L, H)],
                            pooling)[(L, H)]
            losses.append(sb.contrastive_loss(q, p, grid.temperature, similarity).item())
    return float(np.mean(losses))


def held_out_pairs(count, seed=0):
    """(query, passage) pairs of the held-out inverse-cloze set (never trained on), a fixed
    sample."""
    corpus, queries, qrels = metrics.embedded_retrieval_set()
    qids = sorted(queries)
    order = np.random.default_rng(seed).permutation(len(qids))[:count]
    return [(queries[qids[i]], corpus[next(iter(qrels[qids[i]]))]) for i in order]


def measure(model, tokenizer, grid, held_out, lee):
    """{'eval_loss', 'spearman'} of a model at its full pair (mean pooling, cosine)."""
    model.eval()
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    spearman = metrics.sts_scores(model, tokenizer, lee, [(L, H)], "mean", max_length=256,
                                  batch_size=16)[(L, H)]
    return {
        "eval_loss": eval_loss(model, tokenizer, held_out, grid, "mean", "cos"),
        "spearman": float(spearman)}


def run_name(size, tuning_spec, budget):
    return f"{size.replace(':', '-')}__{tuning_spec.replace(':', '-')}__{budget:.3g}"


def finetune_argv(grid, tuning_spec, budget, L, H, base, output_dir):
    """finetune.py's command line for one run (its defaults, the recipe's settings)."""
    method = tuning.parse_tuning(tuning_spec)[0]
    # a run left unfinished starts over
    return ["--model_name_or_path", base, "--method", grid.method, "--pairs", f"{L}x{H}",
            "--pooling", "mean", "--similarity", "cos", "--temperature", str(grid.temperature),
            "--tuning", tuning_spec, "--lora_r", str(grid.lora_r), "--lora_alpha",
            str(grid.lora_alpha), "--flops_budget", str(budget),
            "--learning_rate", str(grid.learning_rates[method]),
            "--per_device_train_batch_size", str(grid.per_device_train_batch_size),
            "--train_group_size", str(grid.train_group_size),
            "--query_max_len", str(grid.query_max_len),
            "--passage_max_len", str(grid.passage_max_len), "--save_steps", "0",
            "--seed", str(grid.seed), "--output_dir", output_dir, "--overwrite_output_dir"]


def budget_steps(grid, model, tokenizer, tuning_spec, budget, records):
    """The steps a budget buys this size and method (Eq. 15), as finetune.py will count them."""
    probe = copy.deepcopy(model)
    tuning.apply_tuning(probe, tuning_spec, grid.lora_r, grid.lora_alpha)
    tokens = flops.tokens_per_step(tokenizer, ("contrastive", records),
                                      grid.per_device_train_batch_size, grid)  # its lengths, seed
    return flops.flops_accounting(probe, tuning_spec, tokens, budget)["budget_steps"]


@dataclass
class RunInputs:
    """What every run of the grid shares: the sizes' models, the training and held-out texts."""
    sizes: Sizes = field(default_factory=Sizes)
    records: list = field(default_factory=list)  # training records (budget_steps counts tokens)
    held_out: list = field(default_factory=list)  # (query, passage) pairs for eval_loss
    lee: object = None  # Lee et al.'s STS set (metrics.lee_sts) for the Spearman


def run_one(grid, inputs, size, tuning_spec, budget):
    """Fine-tune one (size, method) for a budget (or measure the untouched model at budget 0) ->
    result.

    The size's model is saved as a folder and trained by finetune.py's own main, so every run is
    exactly the command its argv reads."""
    model, tokenizer = inputs.sizes.build(size)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    folder = os.path.join(grid.output_dir, "runs", run_name(size, tuning_spec, budget))
    start = time.time()
    result = {"size": size, "tuning": tuning_spec, "budget": budget, "layers": L, "hidden": H}
    if budget > 0:
        if grid.max_steps_per_run:  # small models buy many steps: keep the grid's wall time bounded
            steps = budget_steps(grid, model, tokenizer, tuning_spec, budget, inputs.records)
            if steps > grid.max_steps_per_run:
                raise ValueError(f"the budget buys {steps} steps, over --max_steps_per_run "
                                 f"{grid.max_steps_per_run}")
        base = folder + ".base"
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        finetune.main(finetune_argv(grid, tuning_spec, budget, L, H, base, folder))
        shutil.rmtree(base)
        model = models.load_model(folder, torch.device("cpu"))[0]  # LoRA merged on save
        saved = json.load(open(os.path.join(folder, models.CONFIG_FILE)))["flops"]
        result.update({
            k: saved[k]
            for k in ("N", "N_trainable", "flops_per_token", "steps", "tokens_seen", "flops_used")})
        log = [json.loads(line) for line in open(os.path.join(folder, "train_log.jsonl"))]
        result["train_loss_last10"] = float(np.mean([r["loss"] for r in log[-10:]]))
    else:
        result["N"] = sum(p.numel() for p in model.parameters())
        os.makedirs(folder, exist_ok=True)
    result.update(measure(model, tokenizer, grid, inputs.held_out, inputs.lee))
    result["seconds"] = round(time.time() - start, 1)
    if not grid.keep_models:  # the grid needs the numbers, not tens of copies of the weights
        for name in os.listdir(folder):
            if name.endswith((".safetensors", ".bin")):
                os.remove(os.path.join(folder, name))
    path = os.path.join(folder, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)  # atomic: a result file is always whole
    return result


def run_grid(grid):
    """Every (size, method, budget) run, reusing finished ones -> (results, skipped: [(size, method,
    budget, why)])."""
    records = data.embedded_training_data(seed=0, num_negatives=max(grid.train_group_size - 1, 7))
    held_out, lee = held_out_pairs(grid.eval_pairs), metrics.lee_sts()
    inputs = RunInputs(Sizes(), records, held_out, lee)
    plan = [(s, "full", 0.0) for s in grid.sizes] + \
           [(s, t, b) for s in grid.sizes for t in grid.tunings for b in grid.budgets]
    results, skipped = [], []
    for i, (size, tuning_spec, budget) in enumerate(plan):
        path = os.path.join(grid.output_dir, "runs", run_name(size, tuning_spec, budget),
                            "result.json")
        if os.path.exists(path):
            results.append(json.load(open(path)))
            print(f"[{i + 1}/{len(plan)}] {size} {tuning_spec} {budget:.3g}: cached")
            continue
        try:
            result = run_one(grid, inputs, size, tuning_spec, budget)
        except ValueError as e:  # e.g. a budget below one step, bias-only on a model without biases
            print(f"[{i + 1}/{len(plan)}] {size} {tuning_spec} {budget:.3g}: skipped ({e})")
            skipped.append((size, tuning_spec, budget, str(e)))
            continue
        results.append(result)
        print(f"[{i + 1}/{len(plan)}] {size} {tuning_spec} {budget:.3g}: "
              f"{result['steps'] if budget else 0} steps, eval_loss {result['eval_loss']:.4f}, "
              f"spearman {result['spearman']:.4f} ({result['seconds']} s)")
    return results, skipped


# ----------------------------------------------------------------------------------------------
# Fit and recommendation (pure: tested on synthetic numbers)

def fit_line(budgets, values):
    """Least squares value = a + b log10(budget) -> {'a', 'b', 'r2', 'points'}."""
    if len(budgets) < 2 or len(set(budgets)) < 2:
        raise ValueError(f"a fit needs at least two distinct budgets, got {sorted(budgets)}")
    x, y = np.log10(np.asarray(budgets, dtype=float)), np.asarray(values, dtype=float)
    b, a = np.polyfit(x, y, 1)
    residual, total = float(np.sum((y - (a + b * x)) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return {
        "a": float(a), "b": float(b), "r2": 1.0 - residual / total if total > 0 else 1.0,
        "points": len(x)}


def fit_all(results, metric):
    """{(tuning, size): fit and its budget range} over the trained runs (budget > 0) of each pair
    with two or more budgets."""
    groups = {}
    for r in results:
        if r["budget"] > 0:
            groups.setdefault((r["tuning"], r["size"]), []).append(r)
    return {key: {**fit_line([r["budget"] for r in runs], [r[metric] for r in runs]),
                  "low": min(r["budget"] for r in runs), "high": max(r["budget"] for r in runs)}
            for key, runs in groups.items() if len({r["budget"] for r in runs}) >= 2}


def recommend(results, fits, budget, metric):
    """The (method, size) whose fit is best at `budget` -> its prediction, FLOPs per token and
    tokens.

    Only fits whose own budgets span `budget` compete (a line in log budget is a local trend: two
    points extrapolated far can predict a negative loss); when none spans it, all do and the answer
    says so.
    """
    if not fits:
        raise ValueError("no (method, size) has runs at two budgets: nothing to fit")
    sign = 1 if METRICS[metric] == "higher" else -1
    spanning = {key: f for key, f in fits.items() if f["low"] <= budget <= f["high"]}
    predicted = {key: f["a"] + f["b"] * math.log10(budget) for key, f in (spanning or fits).items()}
    (method, size) = max(predicted, key=lambda key: sign * predicted[key])
    per_token = next(r["flops_per_token"] for r in results
                     if (r["tuning"], r["size"]) == (method, size) and r["budget"] > 0)
    return {
        "tuning": method, "size": size, "budget": budget, "predicted": predicted[(method, size)],
        "flops_per_token": per_token, "tokens": budget / per_token, "extrapolated": not spanning,
        "ranking": sorted(((k[0], k[1], v)
                           for k, v in predicted.items()), key=lambda t: -sign * t[2])}


def best_per_budget(results, metric):
    """{budget: {method: (size, value)}}: each method's best size at each budget (the observed
    frontier)."""
    sign = 1 if METRICS[metric] == "higher" else -1
    table = {}
    for r in results:
        if r["budget"] <= 0:
            continue
        best = table.setdefault(r["budget"], {}).get(r["tuning"])
        if best is None or sign * r[metric] > sign * best[1]:
            table[r["budget"]][r["tuning"]] = (r["size"], r[metric])
    return dict(sorted(table.items()))


def winners(frontier, metric):
    """{budget: method} with the best value at each budget."""
    sign = 1 if METRICS[metric] == "higher" else -1
    return {b: max(methods, key=lambda m: sign * methods[m][1]) for b, methods in frontier.items()}


# ----------------------------------------------------------------------------------------------
# Report and plot

def report(results, fits, rec, metric, command, seconds, skipped=()):
    """The grid, fits, frontier and recommendation as markdown."""
    frontier = best_per_budget(results, metric)
    lines = [
        f"Command: `{command}`",
        f"Grid wall time (this invocation): {seconds:.0f} s; sum of the runs' own "
        f"times: {sum(r['seconds'] for r in results):.0f} s",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads", "",
        "| size | N | tuning | budget (FLOPs) | N_trainable | FLOPs/token | steps | tokens | "
        "eval_loss | Spearman (Lee) | train loss (last 10) | s |", "|" + "---|" * 12]
    for r in sorted(results, key=lambda r: (r["size"], r["tuning"]
                                            if r["budget"] else "", r["budget"])):
        trained = r["budget"] > 0
        cells = [
            r["size"], f"{r['N']:,}", r["tuning"] if trained else "(untrained)",
            f"{r['budget']:.3g}", f"{r['N_trainable']:,}" if trained else "",
            f"{r['flops_per_token']:.4g}" if trained else "",
            str(r["steps"]) if trained else "0", f"{r['tokens_seen']:,}" if trained else "0",
            f"{r['eval_loss']:.4f}", f"{r['spearman']:.4f}", f"{r['train_loss_last10']:.4f}"
            if trained else "", f"{r['seconds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        f"| {size} | | {method} | {budget:.3g} | skipped: {why} |" + " |" * 7
        for size, method, budget, why in skipped]
    lines += [
        "", f"Fits ({metric} = a + b log10(budget), least squares over each pair's budgets):", "",
        "| tuning | size | a | b | R^2 | points | budgets |", "|---|---|---|---|---|---|---|"]
    for (method, size), f in sorted(fits.items()):
        lines.append(f"| {method} | {size} | {f['a']:.4f} | {f['b']:.4f} | {f['r2']:.3f} | "
                     f"{f['points']} | {f['low']:.3g}..{f['high']:.3g} |")
    lines += [
        "", f"Best size per method at each budget ({metric}, observed):", "",
        "| budget | " + " | ".join(sorted({m for v in frontier.values() for m in v})) + " | best |",
        "|---|" + "---|" * (len({m for v in frontier.values() for m in v}) + 1)]
    methods = sorted({m for v in frontier.values() for m in v})
    win = winners(frontier, metric)
    for b, row in frontier.items():
        cells = [f"{row[m][1]:.4f} ({row[m][0]})" if m in row else "" for m in methods]
        lines.append(f"| {b:.3g} | " + " | ".join(cells) + f" | {win[b]} |")
    lines += [
        "", f"Recommendation for a budget of {rec['budget']:.3g} FLOPs"
        f"{' (extrapolated beyond the grid)' if rec['extrapolated'] else ''}: "
        f"**{rec['tuning']}** on **{rec['size']}**, {rec['tokens']:,.0f} training tokens "
        f"({rec['flops_per_token']:.4g} FLOPs per token, Eq. 15), predicted {metric} "
        f"{rec['predicted']:.4f}.", "",
        "Predicted at that budget (fits whose budgets span it), best first: " +
        "; ".join(f"{m} {s} {v:.4f}" for m, s, v in rec["ranking"])]
    return "\n".join(lines) + "\n"


def plot(results, fits, metric, path):
    """Metric vs budget (log x; log y for the loss): one colour per method, one marker per size,
    fitted lines dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = sorted({r["tuning"] for r in results if r["budget"] > 0})
    sizes = sorted({r["size"] for r in results})
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    markers = {s: "osD^v<>p*h"[i % 10] for i, s in enumerate(sizes)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, size), f in sorted(fits.items()):
        runs = sorted((r for r in results
                       if (r["tuning"], r["size"]) == (method, size) and r["budget"] > 0),
                      key=lambda r: r["budget"])
        x = [r["budget"] for r in runs]
        ax.plot(x, [r[metric]
                    for r in runs], markers[size], color=colours[method], label=f"{method} {size}")
        grid = np.logspace(math.log10(min(x)), math.log10(max(x)), 20)
        ax.plot(grid, f["a"] + f["b"] * np.log10(grid), "--", color=colours[method], linewidth=0.8)
    ax.set_xscale("log")
    if metric == "eval_loss":  # random-init models start far above the pre-trained ones
        ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (README Eq. 15)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """The grid and each run's settings as values (parse_args builds one from the command line)."""
    output_dir: str = "output/recipe"
    sizes: list = field(
        default_factory=lambda: ["smollm2-135m:1", "smollm2-135m:2", "random:2x128"])
    tunings: list = field(default_factory=lambda: ["full", "lora", "freeze:1"])
    budgets: list = field(default_factory=lambda: [1e12, 3e12, 1e13])  # FLOPs (Eq. 15), ascending
    target_budget: float = None  # recommend for this budget; None: the largest
    method: str = "full"  # full (Eq. 6) or symmetric (Eq. 17)
    metric: str = "eval_loss"
    learning_rates: dict = field(
        default_factory=lambda: {"full": 1e-3, "lora": 1e-3, "bias": 1e-3, "freeze": 1e-3})
    lora_r: int = 32
    lora_alpha: float = 32.0
    temperature: float = 0.025  # cosine / 0.025: Ziarko et al.'s scale of 40
    per_device_train_batch_size: int = 8
    train_group_size: int = 2
    query_max_len: int = 32
    passage_max_len: int = 64
    eval_pairs: int = 128
    seed: int = 42
    max_steps_per_run: int = 0  # 0: no cap
    keep_models: bool = False
    plot: bool = False


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", default="output/recipe")
    p.add_argument("--sizes", default="smollm2-135m:1,smollm2-135m:2,random:2x128",
                   help="comma-separated: smollm2-135m:K (first K blocks) or random:LxH")
    p.add_argument("--tunings", default="full,lora,freeze:1",
                   help="comma-separated --tuning values")
    p.add_argument("--budgets", default="1e12,3e12,1e13",
                   help="comma-separated FLOP budgets (Eq. 15)")
    p.add_argument("--target_budget", type=float, default=None,
                   help="recommend for this budget; default: the largest")
    p.add_argument("--method", choices=("full", "symmetric"), default="full",
                   help="loss at the full pair: full (Eq. 6, one direction) or symmetric (Eq. 17, "
                        "Ziarko et al.'s)")
    p.add_argument("--metric", choices=sorted(METRICS), default="eval_loss",
                   help="what the fit and recommendation use")
    p.add_argument("--learning_rates", default="full=1e-3,lora=1e-3,bias=1e-3,freeze=1e-3",
                   help="per method; one rate for all by default, so that the grid compares "
                        "methods, not rates")
    p.add_argument("--lora_r", type=int, default=32)
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--temperature", type=float, default=0.025,
                   help="cosine / 0.025: Ziarko et al.'s scale of 40")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--train_group_size", type=int, default=2)
    p.add_argument("--query_max_len", type=int, default=32)
    p.add_argument("--passage_max_len", type=int, default=64)
    p.add_argument("--eval_pairs", type=int, default=128,
                   help="held-out (query, passage) pairs for eval_loss")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_steps_per_run", type=int, default=0,
                   help="skip (and list) runs whose budget buys more steps than this; 0: no cap")
    p.add_argument("--keep_models", action="store_true",
                   help="keep every run's weights (off: only the numbers)")
    p.add_argument("--plot", action="store_true", help="write recipe.png (needs matplotlib)")
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.tunings = [t for t in args.tunings.split(",") if t]
    try:
        for s in args.sizes:
            parse_size(s)
        for t in args.tunings:
            tuning.parse_tuning(t)
        args.budgets = sorted(float(b) for b in args.budgets.split(",") if b)
        rates = dict(item.split("=") for item in args.learning_rates.split(","))
        args.learning_rates = {m: float(v) for m, v in rates.items()}
    except ValueError as e:
        p.error(str(e))
    missing = {tuning.parse_tuning(t)[0] for t in args.tunings} - set(args.learning_rates)
    if missing:
        p.error(f"--learning_rates has no rate for {sorted(missing)}")
    if not args.budgets or min(args.budgets) <= 0:
        p.error("--budgets must be positive numbers")
    if args.target_budget is None:
        args.target_budget = args.budgets[-1]
    return Grid(**vars(args))


def main(argv=None):
    grid = parse_args(argv)
    command = "python -m recipe.compute_optimal " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.time()
    results, skipped = run_grid(grid)
    fits = fit_all(results, grid.metric)
    rec = recommend(results, fits, grid.target_budget, grid.metric)
    text = report(results, fits, rec, grid.metric, command, time.time() - start, skipped)
    print(text)
    with open(os.path.join(grid.output_dir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(grid.output_dir, "recipe.json"), "w") as f:
        json.dump({"command": command, "results": results, "recommendation": rec,
                   "fits": {f"{m} {s}": v for (m, s), v in fits.items()}}, f, indent=2)
    if grid.plot:
        print(plot(results, fits, grid.metric, os.path.join(grid.output_dir, "recipe.png")))
    return rec


if __name__ == "__main__":
    data.run_command(main)
