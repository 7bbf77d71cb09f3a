"""Fine-tune a 2D Matryoshka encoder: SRL (README Eq. 5) or a baseline (Eq. 6-9), plain PyTorch.

    python finetune.py --output_dir out/srl                     # SRL on the embedded default data
    python finetune.py --method full --output_dir out/full      # the full-model baseline (Eq. 6)
    python finetune.py --train_file train.jsonl --pooling cls --similarity dot --output_dir out
    python finetune.py --save_steps 100 --resume --output_dir out/srl   # continue after a crash
    python finetune.py --model_name_or_path smollm2-135m --method full --tuning lora \\
        --pooling last --flops_budget 1e15 --output_dir out/lora  # a decoder, LoRA, Eq. 15's steps
    torchrun --nproc-per-node 4 finetune.py --output_dir out/srl    # 4 GPUs, negatives across all

Every method trains on the same batches (same data order, negatives and seed), so rows of a table
differ only by the loss. Reads top to bottom: settings, data, model, optimizer, loop, save.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, replace

import data  # torch-free: the command line is checked before torch loads


# Every hyperparameter of each released run (github.com/ielab/Starbucks at 2a3b24f); an
# explicit flag still wins. Settings not in their commands are their trainers' defaults:
# Tevatron's warmup_ratio 0.1 for the retrieval run (its arguments.py), Hugging Face's
# learning rate 5e-5 and weight decay 0. Departures that remain: our SRL averages over the
# pairs where their retrieval code sums (Eq. 5); their STS runs use fp16, which this project
# does not offer (bf16 on a GPU, fp32 elsewhere).
PRESETS = {
    # retrieval/README.md, lines 27-49, and Tevatron's defaults (temperature 1, no normalising,
    # warmup_ratio 0.1)
    "msmarco-srl": dict(
        method="srl", pairs="2x32,4x64,6x128,8x256,10x512,12x768", pooling="cls", similarity="dot",
        temperature=1.0, kl="scores", kl_weight=1.0, query_max_len=32, passage_max_len=196,
        train_group_size=8, per_device_train_batch_size=128, num_train_epochs=3.0,
        learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.0, bf16=True),
    # sts/train_starbucks.py with training_data=full: MultipleNegativesRankingLoss in StarbucksLoss.
    # The script sets no max_seq_length, so sentence-transformers' Transformer module infers
    # min(max_position_embeddings, tokenizer.model_max_length) = 512 for bert-base-uncased.
    "allnli-srl": dict(
        method="srl", pairs="2x32,4x64,6x128,8x256,10x512,12x768", pooling="mean", similarity="cos",
        temperature=0.05, kl="embeddings", kl_weight=0.3, train_group_size=2,
        per_device_train_batch_size=128, num_train_epochs=1.0, learning_rate=5e-5,
        warmup_ratio=0.1, weight_decay=0.0, seed=42, query_max_len=512, passage_max_len=512),
    # sts/train_starbucks.py with training_data=low: CoSENT in StarbucksLoss, STS-B train; 512
    # tokens as allnli-srl (scored pairs read passage_max_len)
    "stsb-srl": dict(
        method="srl", pairs="2x32,4x64,6x128,8x256,10x512,12x768", pooling="mean", similarity="cos",
        temperature=0.05, kl="embeddings", kl_weight=0.3, per_device_train_batch_size=16,
        num_train_epochs=4.0, learning_rate=5e-5, warmup_ratio=0.1, weight_decay=0.0, seed=42,
        query_max_len=512, passage_max_len=512),
}


# 2dmse: sentence-transformers' 2D loss (the paper's STS row); 2dmse_retrieval: the authors'
# retrieval code's sampler (its MS MARCO row); symmetric: Eq. 17 at the full pair
METHODS = ("srl", "2dmse", "2dmse_retrieval", "mrl", "full", "separate", "symmetric")

def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="every hyperparameter of one of the authors' released runs (README: the "
                        "table of paper rows and commands); flags given explicitly override it")
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL,
                   help="model folder or packaged model name")
    p.add_argument(
        "--train_file", default=None,
        help="Tevatron/sentence-transformers/STS file; default: embedded inverse-cloze data")
    p.add_argument("--output_dir", default="output/finetune")
    p.add_argument("--method", choices=METHODS, default="srl")
    p.add_argument("--pairs", default=None,
                   help="LAYERxDIM list, e.g. 2x32,4x64; default: the paper's shape for the model")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default="mean")
    p.add_argument("--similarity", choices=("dot", "cos"), default="cos")
    p.add_argument("--temperature", type=data.positive_float, default=None,
                   help="default: 0.05 for cos, 1.0 for dot")
    p.add_argument("--kl_weight", type=data.non_negative_float, default=1.0, help="beta of Eq. 5")
    p.add_argument("--kl", choices=("scores", "embeddings"), default="scores",
                   help="scores: Eq. 4 (the paper); embeddings: Eq. 4' (the released STS script, "
                        "use --kl_weight 0.3)")
    p.add_argument("--train_group_size", type=data.positive_int, default=None,
                   help="passages per query: 1 positive + G-1 hard negatives; default: 4, or fewer"
                        " when the data has fewer negatives per query (a triplet file: 2). A "
                        "negative is never repeated")
    p.add_argument("--query_max_len", type=data.positive_int, default=32)
    p.add_argument("--passage_max_len", type=data.positive_int, default=128)
    data.add_training_arguments(p, learning_rate=5e-5, weight_decay=0.01, warmup_ratio=0.1)
    p.add_argument(
        "--grad_cache_chunk", type=data.non_negative_int, default=0,
        help="GradCache: embed N texts at a time (same loss and gradients, less memory); 0: off")
    p.add_argument(
        "--tuning", default="full", help="which parameters train: full, lora, bias or freeze:K "
        "(all but the last K blocks frozen)")
    p.add_argument("--lora_r", type=data.positive_int, default=32,
                   help="LoRA rank r (Eq. 16); Ziarko et al. use 32")
    p.add_argument("--lora_alpha", type=data.positive_float, default=32.0,
                   help="LoRA alpha: the update is scaled by alpha / r")
    p.add_argument(
        "--lora_target_modules", default="all-linear",
        help="comma-separated Linear names inside the blocks (e.g. q_proj,v_proj), or all-linear")
    p.add_argument(
        "--flops_budget", "--flops-budget", type=data.positive_float, default=None,
        help="training FLOPs (Eq. 15); sets --max_steps from the measured tokens per step")
    args, given = data.parse_with_preset(p, argv, PRESETS)
    args.kl_weight = check_2dmse_kl(args.method, args.kl, args.kl_weight, given)
    if args.lora_target_modules != "all-linear":
        args.lora_target_modules = [m for m in args.lora_target_modules.split(",") if m]
    for problem in (data.model_problem(args.model_name_or_path),
                    args.train_file and not os.path.isfile(args.train_file)
                    and f"--train_file {args.train_file}: no such file"):
        if problem:
            p.error(problem)
    if data.bf16_problem(args.bf16):
        p.error(data.bf16_problem(args.bf16))
    if args.resume and args.tuning == "lora":
        p.error("--resume with --tuning lora is not supported: checkpoints hold merged weights")
    if args.temperature is None:
        args.temperature = 0.05 if args.similarity == "cos" else 1.0
    problem = data.output_dir_problem(
        args.output_dir,
        "pass --resume to continue it or --overwrite_output_dir to start over there", args.resume,
        args.overwrite_output_dir, source=args.model_name_or_path)
    if problem:
        p.error(problem)
    return args


def check_2dmse_kl(method, kl, kl_weight, given):
    """--kl and --kl_weight with the 2DMSE baselines: honoured where their loss has that KL, else a
    ValueError. 2dmse is sentence-transformers' Matryoshka2dLoss: a KL over embedding coordinates
    (Eq. 4') weighted by kl_div_weight (default 1, kept by the authors' sts/train_2d_matryoshka.py);
    2dmse_retrieval is their retrieval/modeling.py: a KL over candidate scores (Eq. 4) weighted by
    kl_divergence_weight. given: the flags the command line names (a preset's kl_weight belongs to
    another loss and is not carried over to 2dmse). -> the KL weight the method trains with.
    """
    if method == "2dmse" and "kl" in given and kl != "embeddings":
        raise ValueError("--method 2dmse has only the KL over embeddings (sentence-transformers' "
                         "Matryoshka2dLoss): drop --kl scores or pass --kl embeddings")
    if method == "2dmse_retrieval" and "kl" in given and kl != "scores":
        raise ValueError("--method 2dmse_retrieval has only the KL over candidate scores (the "
                         "authors' retrieval code): drop --kl embeddings or pass --kl scores")
    if method == "2dmse" and "kl_weight" not in given:
        return 1.0  # Matryoshka2dLoss's kl_div_weight
    return kl_weight


if __name__ == "__main__":  # --help, a bad flag or a missing path answer before torch loads
    data.run_command(parse_args)

import torch  # noqa: E402 (here, below parse_args: --help and bad paths answer before torch loads)
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402


@dataclass
class FinetuneArguments(training.TrainingArguments):
    """The shared flags plus fine-tuning's own (Hugging Face's and Tevatron's names)."""
    method: str = "srl"
    train_group_size: int = 4  # passages per query: 1 positive + G-1 hard negatives
    query_max_len: int = 32
    passage_max_len: int = 128
    grad_cache_chunk: int = 0  # GradCache: texts embedded at a time (large_batch/); 0: off
    tuning: str = "full"  # which parameters train (recipe/tuning.py)
    flops_budget: float = None  # sets the steps from Eq. 15 (recipe/flops.py)


def method_loss(method, config, shape, kind, kl="scores", kl_weight=1.0):
    """The table from --method to its loss in starbucks.py (README Eq. 5-9; symmetric: Eq. 17, in
    recipe/decoder.py) -> (the pairs to embed, loss(q_2d, p_2d, gold, generator)).

    config: the pairs, similarity and temperature; shape: (L, H) of the model; kind 'scored': pairs
    with a gold score, CoSENT in the place of Eq. 3; kl: 'scores' (Eq. 4) or 'embeddings' (Eq. 4',
    the released STS script), for srl; kl_weight: srl's beta, and 2DMSE's KL weight (both forms)."""
    pairs, t, sim = config.pairs, config.temperature, config.similarity
    (L, H), full = shape, pairs[-1]
    dims, layers = sorted({d for _, d in pairs}), sorted({n for n, _ in pairs})
    if kind == "scored":  # CoSENT takes the place of Eq. 3
        if method == "srl" and kl == "embeddings":  # the released low-resource STS-B run (Eq. 5')
            return pairs, lambda q, p, gold, g: sb.released_starbucks_loss(
                lambda a, b: sb.cosent_loss(a, b, gold), q, p, pairs, kl_weight)
        if method == "srl":
            return pairs, lambda q, p, gold, g: sb.srl_cosent_loss(q, p, gold, pairs)
        if method in ("full", "separate"):
            return [full], lambda q, p, gold, g: sb.cosent_loss(q[full], p[full], gold)
        if method != "2dmse":  # the paper's STS tables have 2DMSE on scored pairs; MRL they do not
            raise ValueError(f"--method {method} needs query/passage data, not scored pairs")
    if method == "srl" and kl == "scores":  # Eq. 5
        return pairs, lambda q, p, gold, g: sb.srl_loss(q, p, pairs, t, kl_weight, sim)
    if method == "srl":  # Eq. 5'
        return pairs, lambda q, p, gold, g: sb.srl_loss_embedding_kl(q, p, pairs, t, kl_weight, sim)
    if method == "symmetric":  # Ziarko et al.'s loss (Eq. 17) at the full pair
        from recipe import decoder
        return [full], lambda q, p, gold, g: decoder.symmetric_contrastive_loss(
            q[full], p[full], t, sim)
    if method in ("full", "separate"):  # Eq. 6, 7; separate: `full` is (n, H) of the layer trained
        return [full], lambda q, p, gold, g: sb.full_loss(q, p, [full], t, sim)
    if method == "mrl":  # Eq. 8 at the last layer
        return [(L, H)], lambda q, p, gold, g: sb.matryoshka_loss(
            q[(L, H)], p[(L, H)], dims, t, sim)
    if method == "2dmse_retrieval":  # Eq. 9': the pairs' layers at full width, one sampled per step
        return [(n, H) for n in layers], lambda q, p, gold, g: sb.matryoshka_2d_retrieval_loss(
            {n: q[(n, H)] for n in layers}, {n: p[(n, H)] for n in layers}, dims, g, t, sim,
            kl_weight)
    every_layer = [(n, H) for n in range(1, L + 1)]  # Eq. 9: every layer at full width, sampled
    return every_layer, lambda q, p, gold, g: sb.matryoshka_2d_loss(
        {n: q[(n, H)] for n in range(1, L + 1)}, {n: p[(n, H)] for n in range(1, L + 1)}, dims,
        g, t, sim, kl_weight=kl_weight,
        base_loss=(lambda a, b: sb.cosent_loss(a, b, gold)) if kind == "scored" else None)


DEFAULT_GROUP_SIZE = 4


def linear_schedule(step, total, warmup):
    """Linear warmup to 1, then linear decay to 0 (as transformers'
    get_linear_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def load_training_records(train_file, train_group_size, skip_bad_lines, rank=0):
    """-> (kind, records, G): 'contrastive' {'query','positives','negatives'} or
    'scored' (a, b, score), and the group size: train_group_size, or by default 4 capped
    at 1 + the fewest negatives of any query."""
    if train_file is None:
        negatives = max((train_group_size or DEFAULT_GROUP_SIZE) - 1, 7)
        return ("contrastive", data.embedded_training_data(seed=0, num_negatives=negatives),
                train_group_size or DEFAULT_GROUP_SIZE)
    kind, records, skipped = training.read_training_data(data.read_training_file, train_file,
                                                         skip_bad_lines)
    if skip_bad_lines and rank == 0:
        print(f"skipped {skipped} bad lines of {train_file}", file=sys.stderr)
    if kind == "scored":
        # pairs with a score: no groups
        return kind, records, train_group_size or DEFAULT_GROUP_SIZE
    fewest = min(len(r["negatives"]) for r in records)
    if train_group_size is None:
        group_size = min(DEFAULT_GROUP_SIZE, fewest + 1)
        if group_size < DEFAULT_GROUP_SIZE and rank == 0:
            print(
                f"train_group_size {group_size}: some queries of {train_file} have only {fewest} "
                "hard negatives",
                file=sys.stderr)
        return kind, records, group_size
    short = sum(1 for r in records if len(r["negatives"]) < train_group_size - 1)
    if short and fewest == 0:
        raise data.DataError(f"{train_file}: {short} queries have no negative passage; "
                             f"use --train_group_size 1 (in-batch negatives only)")
    # Tevatron would sample with replacement: a repeated negative weighs double in the loss
    if short:
        raise data.DataError(
            f"--train_group_size {train_group_size} needs {train_group_size - 1} hard negatives "
            "per "
            f"query, but {short} queries of {train_file} have fewer (the fewest: {fewest}); pass "
            f"--train_group_size {fewest + 1} or leave it out (a negative is never repeated)")
    return kind, records, train_group_size


def train(model, tokenizer, dataset, loss, config, run, flags):
    """The loop: the same batches for every method; deterministic per step (seeded by step).

    dataset: (kind, records) of load_training_records; loss: (the pairs to embed, loss_fn) of
    method_loss; config: what is saved beside the model; run: FinetuneArguments; flags: the
    command line's, the run's identity in its checkpoints and written into starbucks_config.json."""
    (kind, records), (embed_pairs, loss_fn), output_dir = dataset, loss, run.output_dir
    if kind == "scored":  # both sides are texts of one kind: the passage length for both
        run = replace(run, query_max_len=run.passage_max_len)  # also what the FLOPs count
    group_size, query_max_len, passage_max_len = (run.train_group_size, run.query_max_len,
                                                  run.passage_max_len)
    device = next(model.parameters()).device
    rank, world_size = training.rank_and_world_size()
    # the global batch: every rank's queries together
    B = run.per_device_train_batch_size * world_size
    steps_per_epoch = len(records) // B
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(records)} training records are fewer than one batch of {B} "
                             f"({world_size} processes x {run.per_device_train_batch_size})")
    training.freeze_unreached(model, max(n for n, _ in embed_pairs))
    total, accounting = run.total_steps(steps_per_epoch), None
    if run.flops_budget or run.tuning != "full":  # the recipe's compute (Eq. 15): recipe/flops.py
        from recipe import flops
        accounting = flops.planned_flops(model, tokenizer, dataset, B, run,
                                         max(n for n, _ in embed_pairs), total)
        total = accounting["planned_steps"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # everything that decides the result: --resume refuses a checkpoint of another run
    identity = training.run_identity(flags, world_size, [flags.get("train_file")],
                                     models.resolve_model_path(flags["model_name_or_path"]))
    optimizer, scheduler, _, start, train_log = training.start_training(
        model, run, linear_schedule, total, identity)
    net = training.wrap(model, device)  # DDP under torchrun: the forward goes through it
    model.train()

    def embed(input_ids, attention_mask):  # Eq. 1: every pair from one forward pass, in float32
        embeddings_2d = sb.embed_2d(net, input_ids, attention_mask, embed_pairs, config.pooling)
        return {pair: e.float() for pair, e in embeddings_2d.items()}  # {(n, d): (b, d)}

    def save(folder, step):
        used = accounting and flops.flops_used(accounting, train_log.lines, world_size, step)
        models.save_model(model, tokenizer, folder, config, flags, used)

    batches = training.global_batches(len(records), B, start, total, run.seed)
    progress = tqdm(batches, initial=start, total=total, disable=rank != 0, dynamic_ncols=True,
                    desc=f"{run.method} {os.path.basename(output_dir)}")
    for step, indices in progress:
        # every rank draws the whole global batch (one process's negatives) and keeps its slice
        queries, passages, gold, generator = training.global_batch(records, kind, step, indices,
                                                                   group_size, run.seed)
        queries = training.shard(queries, rank, world_size)
        passages = training.shard(passages, rank, world_size)
        gold = gold.to(device) if gold is not None else None
        q_tok, p_tok = (t.to(device) for t in training.tokenize_batch(
            tokenizer, queries, passages, query_max_len, passage_max_len))
        q_in = (q_tok["input_ids"], q_tok["attention_mask"])  # (b, Tq) each
        p_in = (p_tok["input_ids"], p_tok["attention_mask"])  # (b*G, Tp) each

        def global_loss(q_2d, p_2d):  # every rank's rows: the whole batch's negatives (Eq. 3)
            q_2d = {pair: training.gather_with_grad(e) for pair, e in q_2d.items()}  # (B, d)
            p_2d = {pair: training.gather_with_grad(e) for pair, e in p_2d.items()}  # (B*G, d)
            return loss_fn(q_2d, p_2d, gold, generator)  # the method's loss, e.g. sb.srl_loss

        bf16 = run.bf16 and device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            if run.grad_cache_chunk:  # the same loss and gradients, embedding a chunk at a time
                from large_batch.grad_cache import grad_cache_step
                loss = grad_cache_step(embed, [q_in, p_in], global_loss, run.grad_cache_chunk,
                                       getattr(net, "no_sync", None), loss_scale=world_size)
            else:
                loss = global_loss(embed(*q_in), embed(*p_in))  # forward, loss
                (loss * world_size).backward()  # DDP averages over ranks: see gather_with_grad
                loss = loss.detach()
        tokens = q_tok["input_ids"].numel() + p_tok["input_ids"].numel()
        line = training.finish_step(step, loss, trainable, (optimizer, scheduler),  # clip, step
                                    run.max_grad_norm, train_log, tokens=tokens)
        if train_log.bad_in_row >= run.max_bad_steps or train_log.bad_in_row == total:
            train_log.close()  # too many non-finite steps in a row, or not one step applied
            sys.exit(training.bad_steps_message(step, train_log, output_dir))
        if (step + 1) % run.logging_steps == 0 or step + 1 == total:
            progress.set_postfix(loss=f"{line['loss']:.4f}")
        if run.save_steps and (step + 1) % run.save_steps == 0 and train_log.bad_in_row == 0:
            training.save_training_checkpoint(run, step + 1,  # after a good step
                                              lambda folder: save(folder, step + 1),
                                              (optimizer, scheduler), identity, train_log)
    train_log.close()
    if rank == 0:
        save(output_dir, total)
        print(f"saved the model to {output_dir}")


def train_separately(load_tuned_model, tokenizer, model, dataset, config, run, flags):
    """Eq. 7: one model per layer n of config.pairs, each trained at (n, H) and truncated to d at
    evaluation.

    load_tuned_model() -> a fresh copy of the base model with its tuning applied (every layer but
    the first starts from one; the first uses `model`). Writes run.output_dir/layer_<n> and the
    top starbucks_config.json that maps each layer to its folder."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    layers = sorted({n for n, _ in config.pairs})
    for n in layers:
        torch.manual_seed(run.seed)
        model_n = model if n == layers[0] else load_tuned_model()
        layer = replace(config, pairs=[(n, H)])  # the loss of (n, H); saved: its own pairs
        loss = method_loss("separate", layer, (L, H), dataset[0])
        saved = replace(config, pairs=[(m, d) for m, d in config.pairs if m == n])
        train(model_n, tokenizer, dataset, loss, saved,
              replace(run, output_dir=os.path.join(run.output_dir, f"layer_{n}")), flags)
    if training.rank_and_world_size()[0] == 0:
        with open(os.path.join(run.output_dir, models.CONFIG_FILE), "w") as f:
            json.dump({**asdict(config), "separate": {f"{n}": f"layer_{n}" for n in layers},
                       "training_arguments": flags}, f, indent=2)


def main(argv=None):
    args = parse_args(argv)
    if args.preset:
        print(data.preset_summary(args.preset, PRESETS[args.preset], vars(args)))
    torch.manual_seed(args.seed)
    rank, world_size, device = training.setup()  # torchrun: one process per GPU; else one process
    kind, records, args.train_group_size = load_training_records(
        args.train_file, args.train_group_size, args.skip_bad_lines, rank)

    def load_tuned_model():
        return tuned(models.load_model(args.model_name_or_path, device)[0])

    def tuned(model):
        if args.tuning == "full":  # every parameter trains, as loaded
            return model
        from recipe import tuning
        return tuning.apply_tuning(model, args.tuning, args.lora_r, args.lora_alpha,
                                   args.lora_target_modules)

    model, tokenizer = models.load_model(args.model_name_or_path, device)
    tuned(model)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    preset_pairs = args.preset and args.pairs == PRESETS[args.preset]["pairs"]
    if preset_pairs and not all(n <= L and d <= H for n, d in sb.parse_pairs(args.pairs)):
        shape = ",".join(f"{n}x{d}" for n, d in sb.default_pairs(L, H))
        raise ValueError(
            f"--preset {args.preset} trains BERT-base's pairs ({args.pairs}, 12 layers x "
            f"768), but {args.model_name_or_path} has {L} layers x {H}: pass --pairs (the "
            f"paper's shape for this model is --pairs {shape}) or a 12 x 768 "
            f"--model_name_or_path")
    pairs = (sb.check_pairs(sb.parse_pairs(args.pairs), L, H) if args.pairs
             else sb.default_pairs(L, H))
    run, dataset = FinetuneArguments.from_flags(args), (kind, records)
    config = sb.StarbucksConfig(pairs, args.pooling, args.similarity, args.temperature)
    loss = method_loss(args.method, config, (L, H), kind, args.kl, args.kl_weight)
    if rank == 0:  # the pairs saved and evaluated, and those the method's loss reads
        trained = "(n, H), one model per layer n" if args.method == "separate" else loss[0]
        print(f"{args.method}: {len(records)} {kind} records, pairs {pairs} (its loss embeds "
              f"{trained}), {L} layers x {H}, device {device} x {world_size} processes")
    if args.method == "separate":
        train_separately(load_tuned_model, tokenizer, model, dataset, config, run, vars(args))
    else:
        train(model, tokenizer, dataset, loss, config, run, vars(args))
    training.cleanup()


if __name__ == "__main__":
    data.run_command(main)
