"""Fine-tune a 2D Matryoshka encoder: SRL (README Eq. 5) or a baseline (Eq. 6-9), plain PyTorch.

    python finetune.py --output_dir out/srl                     # SRL on the embedded default data
    python finetune.py --method full --output_dir out/full      # the full-model baseline (Eq. 6)
    python finetune.py --train_file train.jsonl --pooling cls --similarity dot --output_dir out
    python finetune.py --save_steps 100 --resume --output_dir out/srl   # continue after a crash
    python finetune.py --model_name_or_path smollm2-135m --method full --pooling last --tuning lora \
        --flops_budget 1e15 --output_dir out/lora               # a decoder, LoRA, steps set by FLOPs (Eq. 15)
    torchrun --nproc-per-node 4 finetune.py --output_dir out/srl       # 4 GPUs, negatives across all

Every method trains on the same batches (same data order, negatives and seed), so rows of a table
differ only by the loss. Reads top to bottom: settings, data, model, optimizer, loop, save.
"""
import argparse
import json
import math
import os
import random
import sys
from dataclasses import asdict

import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

import checkpoints
import data
import distributed
import starbucks as sb
import tuning

METHODS = ("srl", "2dmse", "mrl", "full", "separate", "symmetric")  # symmetric: Eq. 17 at the full pair


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL, help="model folder or packaged model name")
    p.add_argument("--train_file", default=None, help="Tevatron/sentence-transformers/STS file; default: embedded inverse-cloze data")
    p.add_argument("--output_dir", default="output/finetune")
    p.add_argument("--method", choices=METHODS, default="srl")
    p.add_argument("--pairs", default=None, help="LAYERxDIM list, e.g. 2x32,4x64; default: the paper's shape for the model")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default="mean")
    p.add_argument("--similarity", choices=("dot", "cos"), default="cos")
    p.add_argument("--temperature", type=float, default=None, help="default: 0.05 for cos, 1.0 for dot")
    p.add_argument("--kl_weight", type=float, default=1.0, help="beta of Eq. 5")
    p.add_argument("--kl", choices=("scores", "embeddings"), default="scores",
                   help="scores: Eq. 4 (the paper); embeddings: Eq. 4' (the released STS script, use --kl_weight 0.3)")
    p.add_argument("--train_group_size", type=int, default=4, help="passages per query: 1 positive + G-1 hard negatives")
    p.add_argument("--query_max_len", type=int, default=32)
    p.add_argument("--passage_max_len", type=int, default=128)
    add_training_arguments(p, learning_rate=5e-5, weight_decay=0.01, warmup_ratio=0.1)
    p.add_argument("--grad_cache_chunk", type=int, default=0,
                   help="GradCache: embed N texts at a time (same loss and gradients, less memory); 0: off")
    p.add_argument("--tuning", default="full", help="which parameters train: full, lora, bias or freeze:K "
                   "(all but the last K blocks frozen)")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA rank r (Eq. 16); Ziarko et al. use 32")
    p.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA alpha: the update is scaled by alpha / r")
    p.add_argument("--lora_target_modules", default=tuning.ALL_LINEAR,
                   help="comma-separated Linear names inside the blocks (e.g. q_proj,v_proj), or all-linear")
    p.add_argument("--flops_budget", "--flops-budget", type=float, default=None,
                   help="training FLOPs (Eq. 15); sets --max_steps from the measured tokens per step")
    args = p.parse_args(argv)
    try:
        tuning.parse_tuning(args.tuning)
    except ValueError as e:
        p.error(str(e))
    if args.lora_target_modules != tuning.ALL_LINEAR:
        args.lora_target_modules = [m for m in args.lora_target_modules.split(",") if m]
    if args.flops_budget is not None and args.flops_budget <= 0:
        p.error("--flops_budget must be positive")
    if args.resume and args.tuning == "lora":
        p.error("--resume with --tuning lora is not supported: checkpoints hold merged weights")
    if args.temperature is None:
        args.temperature = 0.05 if args.similarity == "cos" else 1.0
    for name in ("train_group_size", "query_max_len", "passage_max_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.grad_cache_chunk < 0:
        p.error("--grad_cache_chunk must be 0 (off) or positive")
    check_training_arguments(p, args)
    return args


def add_training_arguments(p, learning_rate, weight_decay, warmup_ratio):
    """The flags finetune.py and pretrain.py share: batch, optimizer, schedule, and those of a run that
    survives bad data, crashes and bad steps. Only the optimizer's defaults differ between the two."""
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--weight_decay", type=float, default=weight_decay)
    p.add_argument("--warmup_ratio", type=float, default=warmup_ratio)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                   help="skip and count malformed data lines instead of stopping")
    p.add_argument("--save_steps", type=int, default=500, help="checkpoint every N steps (0: only the final model)")
    p.add_argument("--save_total_limit", type=int, default=None, help="keep only the N newest checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output_dir")
    p.add_argument("--max_bad_steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")


def check_training_arguments(p, args):
    if args.per_device_train_batch_size < 1:
        p.error("--per_device_train_batch_size must be at least 1")
    if args.save_steps < 0:
        p.error("--save_steps must be 0 (off) or positive")
    if args.max_bad_steps < 1:
        p.error("--max_bad_steps must be at least 1")


def load_training_records(args, rank=0):
    """-> (kind, records): 'contrastive' {'query','positives','negatives'} or 'scored' (a, b, score)."""
    if args.train_file is None:
        return "contrastive", data.embedded_training_data(seed=0, num_negatives=max(args.train_group_size - 1, 7))
    kind, records, skipped = data.read_training_file(args.train_file, args.skip_bad_lines)
    if args.skip_bad_lines and rank == 0:
        print(f"skipped {skipped} bad lines of {args.train_file}", file=sys.stderr)
    if kind == "contrastive" and args.train_group_size > 1:
        short = sum(1 for r in records if not r["negatives"])
        if short:
            raise data.DataError(f"{args.train_file}: {short} queries have no negative passage; "
                                 f"use --train_group_size 1 (in-batch negatives only)")
    return kind, records


def batch_texts(records, kind, indices, group_size, rng):
    """One batch: (queries [B], passages [B*G] with each query's positive first, gold scores or None)."""
    if kind == "scored":
        a, b, gold = zip(*(records[i] for i in indices))
        return list(a), list(b), torch.tensor(gold, dtype=torch.float)
    queries, passages = [], []
    for i in indices:
        r = records[i]
        queries.append(r["query"])
        passages.append(rng.choice(r["positives"]))
        k = group_size - 1
        negs = r["negatives"]
        passages += rng.sample(negs, k) if len(negs) >= k else rng.choices(negs, k=k)  # Tevatron's rule
    return queries, passages, None


def loss_for_method(args, pairs, num_layers, hidden_size, kind):
    """-> (pairs to embed, loss(q_2d, p_2d, gold, generator)) for the chosen method (Eq. 5-9)."""
    full = pairs[-1]
    t, sim = args.temperature, args.similarity
    if kind == "scored":
        if args.method == "srl":
            return pairs, lambda q, p, gold, g: sb.srl_cosent_loss(q, p, gold, pairs)
        if args.method in ("full", "separate"):
            return [full], lambda q, p, gold, g: sb.cosent_loss(q[full], p[full], gold)
        raise ValueError(f"--method {args.method} needs query/passage data, not scored pairs")
    if args.method == "srl" and args.kl == "scores":
        return pairs, lambda q, p, gold, g: sb.srl_loss(q, p, pairs, t, args.kl_weight, sim)
    if args.method == "srl":
        return pairs, lambda q, p, gold, g: sb.srl_loss_embedding_kl(q, p, pairs, t, args.kl_weight, sim)
    if args.method == "symmetric":  # Ziarko et al.'s loss (Eq. 17) at the full pair
        return [full], lambda q, p, gold, g: sb.symmetric_contrastive_loss(q[full], p[full], t, sim)
    if args.method in ("full", "separate"):  # separate: `full` is (n, H) of the layer being trained
        return [full], lambda q, p, gold, g: sb.full_loss(q, p, [full], t, sim)
    if args.method == "mrl":
        dims = sorted({d for _, d in pairs})
        return [(num_layers, hidden_size)], lambda q, p, gold, g: sb.matryoshka_loss(
            q[(num_layers, hidden_size)], p[(num_layers, hidden_size)], dims, t, sim)
    dims = sorted({d for _, d in pairs})  # 2dmse: every layer at full width, sampled inside the loss
    every_layer = [(n, hidden_size) for n in range(1, num_layers + 1)]
    return every_layer, lambda q, p, gold, g: sb.matryoshka_2d_loss(
        {n: q[(n, hidden_size)] for n, _ in every_layer}, {n: p[(n, hidden_size)] for n, _ in every_layer},
        dims, g, t, sim)


def global_batch(args, records, kind, step, indices):
    """The global batch of a step from its items -> (queries, passages, gold, generator), seeded by the step."""
    rng = random.Random(args.seed * 1_000_003 + step)  # negatives and 2DMSE sizes depend on step only
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    queries, passages, gold = batch_texts(records, kind, indices, args.train_group_size, rng)
    return queries, passages, gold, generator


def tokenize_batch(tokenizer, args, kind, queries, passages):
    """(q_tok, p_tok): padded to the longest text of each side, truncated at the side's max length."""
    q_max, p_max = (args.query_max_len, args.passage_max_len) if kind == "contrastive" else (args.passage_max_len,) * 2
    return (tokenizer(queries, padding=True, truncation=True, max_length=q_max, return_tensors="pt"),
            tokenizer(passages, padding=True, truncation=True, max_length=p_max, return_tensors="pt"))


def tokens_per_step(args, tokenizer, records, kind, B, steps=8):
    """Mean padded tokens (queries and passages) that a step's forward computes, over its first steps."""
    counts = []
    for step, indices in global_batches(len(records), B, 0, steps, args.seed):
        queries, passages, _, _ = global_batch(args, records, kind, step, indices)
        q_tok, p_tok = tokenize_batch(tokenizer, args, kind, queries, passages)
        counts.append(q_tok["input_ids"].numel() + p_tok["input_ids"].numel())
    return sum(counts) / len(counts)


def flops_accounting(args, model, tokenizer, records, kind, B):
    """Eq. 15 for this run: N, N_trainable, FLOPs per token, tokens per step and, with a budget, the steps."""
    method, _ = tuning.parse_tuning(args.tuning)
    n, n_trainable = tuning.parameter_counts(model)
    per_token = tuning.flops_per_token(method, n, n_trainable)
    per_step = tokens_per_step(args, tokenizer, records, kind, B)
    accounting = {"tuning": args.tuning, "N": n, "N_trainable": n_trainable, "flops_per_token": per_token,
                  "tokens_per_step": per_step, "flops_budget": args.flops_budget}
    if args.flops_budget:
        accounting["budget_steps"] = tuning.steps_for_budget(args.flops_budget, per_token, per_step)
    return accounting


def linear_schedule(step, total, warmup):
    """Linear warmup to 1, then linear decay to 0 (as transformers' get_linear_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def training_step(net, embed_pairs, pooling, loss_fn, q_tok, p_tok, gold, generator, grad_cache_chunk=0):
    """Loss of the global batch (this rank's slice in q_tok/p_tok) -> detached loss; gradients in .grad.

    Under torchrun every rank's passages are candidates for every query, so the loss and the
    gradients equal one process's on the concatenated batch. grad_cache_chunk > 0: GradCache.
    """
    world_size = distributed.rank_and_world_size()[1]

    def embed(input_ids, attention_mask):
        return {k: v.float() for k, v in sb.embed_2d(net, input_ids, attention_mask, embed_pairs, pooling).items()}

    def global_loss(q_2d, p_2d):
        return loss_fn({k: distributed.gather_with_grad(v) for k, v in q_2d.items()},
                       {k: distributed.gather_with_grad(v) for k, v in p_2d.items()}, gold, generator)

    inputs = [(q_tok["input_ids"], q_tok["attention_mask"]), (p_tok["input_ids"], p_tok["attention_mask"])]
    if grad_cache_chunk:
        return sb.grad_cache_step(embed, inputs, global_loss, grad_cache_chunk, getattr(net, "no_sync", None),
                                  loss_scale=world_size)
    loss = global_loss(*(embed(*x) for x in inputs))
    (loss * world_size).backward()  # DDP averages over ranks; see distributed.gather_with_grad
    return loss.detach()


# Changing these between a run and its --resume would change the batches (data order, negatives, split).
RESUME_MUST_MATCH = ("seed", "per_device_train_batch_size", "train_group_size")


def train(args, model, tokenizer, kind, records, embed_pairs, loss_fn, output_dir, config):
    """The loop: the same batches for every method; deterministic per step (seeded by step)."""
    device = next(model.parameters()).device
    rank, world_size = distributed.rank_and_world_size()
    B = args.per_device_train_batch_size * world_size  # the global batch: every rank's queries together
    steps_per_epoch = len(records) // B
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(records)} training records are fewer than one batch of {B} "
                             f"({world_size} processes x {args.per_device_train_batch_size})")
    distributed.freeze_unreached(model, max(n for n, _ in embed_pairs))
    flops = flops_accounting(args, model, tokenizer, records, kind, B)
    total = flops.get("budget_steps") or (args.max_steps if args.max_steps > 0 else
                                          math.ceil(args.num_train_epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total)
    flops["planned_flops"] = flops["flops_per_token"] * flops["tokens_per_step"] * total
    if rank == 0:
        print(f"FLOPs (README Eq. 15, tuning {args.tuning}): N = {flops['N']:,} parameters, N_trainable = "
              f"{flops['N_trainable']:,}; {flops['flops_per_token']:.4g} per token x {flops['tokens_per_step']:.0f} "
              f"tokens per step x {total} steps = {flops['planned_flops']:.4g}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    run_settings = {**{k: getattr(args, k) for k in RESUME_MUST_MATCH}, "world_size": world_size}  # decide the batches
    _, start, train_log = checkpoints.resume_or_start(output_dir, args.resume, model, optimizer, scheduler,
                                                      run_settings, total)
    net = distributed.wrap(model, device)  # DDP under torchrun: the forward goes through it, saving does not
    model.train()

    def flops_seen(step):
        """The accounting with what was trained so far: this rank's padded tokens per step x the ranks."""
        tokens = sum(json.loads(line).get("tokens", 0) for line in train_log.lines) * world_size
        return {**flops, "steps": step, "tokens_seen": tokens, "flops_used": flops["flops_per_token"] * tokens}

    progress = tqdm(global_batches(len(records), B, start, total, args.seed), initial=start, total=total,
                    disable=rank != 0, dynamic_ncols=True, desc=f"{args.method} {os.path.basename(output_dir)}")
    for step, indices in progress:
        # every rank draws the whole global batch (the same negatives as one process) and keeps its slice
        queries, passages, gold, generator = global_batch(args, records, kind, step, indices)
        queries, passages = distributed.shard(queries, rank, world_size), distributed.shard(passages, rank, world_size)
        gold = gold.to(device) if gold is not None else None
        q_tok, p_tok = (t.to(device) for t in tokenize_batch(tokenizer, args, kind, queries, passages))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            loss = training_step(net, embed_pairs, config.pooling, loss_fn, q_tok, p_tok, gold, generator,
                                 args.grad_cache_chunk)
        line = finish_step(step, loss, trainable, optimizer, scheduler, args, train_log, output_dir,
                           tokens=q_tok["input_ids"].numel() + p_tok["input_ids"].numel())
        if (step + 1) % args.logging_steps == 0 or step + 1 == total:
            progress.set_postfix(loss=f"{line['loss']:.4f}")
        if args.save_steps and (step + 1) % args.save_steps == 0 and train_log.bad_in_row == 0:  # after a good step
            checkpoints.save_training_checkpoint(output_dir, step + 1,
                                                 lambda folder: save(model, tokenizer, folder, config, args,
                                                                     flops_seen(step + 1)),
                                                 optimizer, scheduler, run_settings, train_log, args.save_total_limit)
    train_log.close()
    if rank == 0:
        save(model, tokenizer, output_dir, config, args, flops_seen(total))


def global_batches(num_items, batch_size, start, total, seed):
    """(step, item indices of its global batch) for steps start..total-1; each epoch a new order, seeded by epoch."""
    steps_per_epoch = num_items // batch_size
    order = None
    for step in range(start, total):
        epoch, offset = divmod(step, steps_per_epoch)
        if offset == 0 or order is None:
            order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        yield step, order[offset * batch_size:(offset + 1) * batch_size].tolist()


def adamw(model, learning_rate, weight_decay):
    """AdamW over the trainable parameters, with no weight decay on biases and norms (as HF)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}],
                             lr=learning_rate)


def finish_step(step, loss, params, optimizer, scheduler, args, train_log, output_dir, tokens=None):
    """After backward: clip, update if the loss and gradient are finite on every rank, log -> the step's log line.

    A non-finite step is skipped (the weights stay, the schedule moves on) and counted; after
    --max_bad_steps in a row the run stops, naming the last good checkpoint.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    finite = distributed.all_finite(loss, grad_norm)
    if finite:
        optimizer.step()
        train_log.bad_in_row = 0
    else:
        train_log.skipped, train_log.bad_in_row = train_log.skipped + 1, train_log.bad_in_row + 1
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    line = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
            "skipped_steps": train_log.skipped, **({"tokens": tokens} if tokens is not None else {})}
    train_log.append(line if finite else {**line, "skipped": True})
    if train_log.bad_in_row >= args.max_bad_steps:
        train_log.close()
        sys.exit(f"error: stopped at step {step + 1}: {train_log.bad_in_row} steps in a row had a non-finite loss "
                 f"or gradient (each was skipped, {train_log.skipped} in all). Last good checkpoint: "
                 f"{checkpoints.latest_checkpoint(output_dir) or 'none saved'}. Lower --learning_rate or check "
                 f"the data, then --resume.")
    return line


def save(model, tokenizer, output_dir, config, args, flops=None):
    """save_pretrained (loads with AutoModel; LoRA merged, Eq. 16) plus starbucks_config.json: pairs,
    pooling, arguments and the FLOP accounting (Eq. 15)."""
    tuning.merged_copy(model).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "starbucks_config.json"), "w") as f:
        json.dump({**asdict(config), "training_arguments": vars(args), **({"flops": flops} if flops else {})},
                  f, indent=2)


def load_gguf(path):
    """A GGUF file as a base model (AutoModel: no LM head) in fp32 and its tokenizer.

    transformers' own gguf_file loading requires accelerate only to place weights; building the model
    from the GGUF's config and loading its dequantised tensors needs just the gguf package.
    """
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(path)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()})
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_model(name_or_path, device):
    """(model, tokenizer) of a model folder, a .gguf file or a packaged name; decoders get a pad token."""
    path = data.resolve_model_path(name_or_path)
    try:
        if path.endswith(".gguf"):
            model, tokenizer = load_gguf(path)
        else:
            model = AutoModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise data.DataError(f"{path} is not a loadable model folder: {e}") from None
    if tokenizer.pad_token is None:  # decoder-only LMs: pad with EOS; pooling reads the attention mask
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # causal attention: real tokens never see right-hand padding
    return model.to(device), tokenizer


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world_size, device = distributed.setup()  # torchrun: one process per GPU; else one process
    kind, records = load_training_records(args, rank)
    model, tokenizer = load_model(args.model_name_or_path, device)
    tuning.apply_tuning(model, args.tuning, args.lora_r, args.lora_alpha, args.lora_target_modules)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    pairs = sb.check_pairs(sb.parse_pairs(args.pairs), L, H) if args.pairs else sb.default_pairs(L, H)
    if rank == 0:
        print(f"{args.method}: {len(records)} {kind} records, pairs {pairs}, {L} layers x {H}, device {device}"
              f" x {world_size} processes")
    if args.method != "separate":
        config = sb.StarbucksConfig(pairs, args.pooling, args.similarity, args.temperature)
        embed_pairs, loss_fn = loss_for_method(args, pairs, L, H, kind)
        train(args, model, tokenizer, kind, records, embed_pairs, loss_fn, args.output_dir, config)
        distributed.cleanup()
        return
    # Eq. 7: one model per layer n, trained at (n, H), truncated to d at evaluation.
    layers = sorted({n for n, _ in pairs})
    for n in layers:
        torch.manual_seed(args.seed)
        if n != layers[0]:
            model_n = tuning.apply_tuning(load_model(args.model_name_or_path, device)[0], args.tuning, args.lora_r,
                                          args.lora_alpha, args.lora_target_modules)
        else:
            model_n = model
        config = sb.StarbucksConfig([(n, d) for m, d in pairs if m == n], args.pooling, args.similarity,
                                    args.temperature)
        embed_pairs, loss_fn = loss_for_method(args, [(n, H)], L, H, kind)
        train(args, model_n, tokenizer, kind, records, embed_pairs, loss_fn,
              os.path.join(args.output_dir, f"layer_{n}"), config)
    if rank == 0:
        with open(os.path.join(args.output_dir, "starbucks_config.json"), "w") as f:
            json.dump({**asdict(sb.StarbucksConfig(pairs, args.pooling, args.similarity, args.temperature)),
                       "separate": {f"{n}": f"layer_{n}" for n in layers}, "training_arguments": vars(args)},
                      f, indent=2)
    distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
