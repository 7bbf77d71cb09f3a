"""Fine-tune a 2D Matryoshka encoder: SRL (README Eq. 5) or a baseline (Eq. 6-9), plain PyTorch.

    python finetune.py --output_dir out/srl                     # SRL on the embedded default data
    python finetune.py --method full --output_dir out/full      # the full-model baseline (Eq. 6)
    python finetune.py --train_file train.jsonl --pooling cls --similarity dot --output_dir out

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

import data
import starbucks as sb

METHODS = ("srl", "2dmse", "mrl", "full", "separate")


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
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed data lines instead of stopping")
    args = p.parse_args(argv)
    if args.temperature is None:
        args.temperature = 0.05 if args.similarity == "cos" else 1.0
    for name in ("train_group_size", "per_device_train_batch_size", "query_max_len", "passage_max_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def load_training_records(args):
    """-> (kind, records): 'contrastive' {'query','positives','negatives'} or 'scored' (a, b, score)."""
    if args.train_file is None:
        return "contrastive", data.embedded_training_data(seed=0, num_negatives=max(args.train_group_size - 1, 7))
    kind, records, skipped = data.read_training_file(args.train_file, args.skip_bad_lines)
    if skipped:
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


def linear_schedule(step, total, warmup):
    """Linear warmup to 1, then linear decay to 0 (as transformers' get_linear_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(args, model, tokenizer, kind, records, embed_pairs, loss_fn, output_dir, config):
    """The loop: the same batches for every method; deterministic per step (seeded by step)."""
    device = next(model.parameters()).device
    B = args.per_device_train_batch_size
    steps_per_epoch = len(records) // B
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(records)} training records are fewer than one batch of {B}")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = math.ceil(args.warmup_ratio * total)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # biases and norms, as HF
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    os.makedirs(output_dir, exist_ok=True)
    log = open(os.path.join(output_dir, "train_log.jsonl"), "w")
    model.train()
    order = None
    progress = tqdm(range(total), desc=f"{args.method} {os.path.basename(output_dir)}", dynamic_ncols=True)
    for step in progress:
        epoch, offset = divmod(step, steps_per_epoch)
        if offset == 0 or order is None:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + epoch))
        rng = random.Random(args.seed * 1_000_003 + step)  # negatives and 2DMSE sizes depend on step only
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        queries, passages, gold = batch_texts(records, kind, order[offset * B:(offset + 1) * B].tolist(),
                                              args.train_group_size, rng)
        q_max, p_max = (args.query_max_len, args.passage_max_len) if kind == "contrastive" else (args.passage_max_len,) * 2
        q_tok = tokenizer(queries, padding=True, truncation=True, max_length=q_max, return_tensors="pt").to(device)
        p_tok = tokenizer(passages, padding=True, truncation=True, max_length=p_max, return_tensors="pt").to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            q_2d = sb.embed_2d(model, q_tok["input_ids"], q_tok["attention_mask"], embed_pairs, config.pooling)
            p_2d = sb.embed_2d(model, p_tok["input_ids"], p_tok["attention_mask"], embed_pairs, config.pooling)
            q_2d = {k: v.float() for k, v in q_2d.items()}
            p_2d = {k: v.float() for k, v in p_2d.items()}
            loss = loss_fn(q_2d, p_2d, gold.to(device) if gold is not None else None, generator)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.write(json.dumps({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(),
                              "lr": lr}) + "\n")
        if (step + 1) % args.logging_steps == 0 or step + 1 == total:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    log.close()
    save(model, tokenizer, output_dir, config, args)


def save(model, tokenizer, output_dir, config, args):
    """save_pretrained (loads with AutoModel) plus starbucks_config.json: pairs, pooling, arguments."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "starbucks_config.json"), "w") as f:
        json.dump({**asdict(config), "training_arguments": vars(args)}, f, indent=2)


def load_model(name_or_path, device):
    path = data.resolve_model_path(name_or_path)
    try:
        model = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise data.DataError(f"{path} is not a loadable model folder: {e}") from None
    return model.to(device), tokenizer


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, records = load_training_records(args)
    model, tokenizer = load_model(args.model_name_or_path, device)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    pairs = sb.check_pairs(sb.parse_pairs(args.pairs), L, H) if args.pairs else sb.default_pairs(L, H)
    print(f"{args.method}: {len(records)} {kind} records, pairs {pairs}, {L} layers x {H}, device {device}")
    if args.method != "separate":
        config = sb.StarbucksConfig(pairs, args.pooling, args.similarity, args.temperature)
        embed_pairs, loss_fn = loss_for_method(args, pairs, L, H, kind)
        train(args, model, tokenizer, kind, records, embed_pairs, loss_fn, args.output_dir, config)
        return
    # Eq. 7: one model per layer n, trained at (n, H), truncated to d at evaluation.
    layers = sorted({n for n, _ in pairs})
    for n in layers:
        torch.manual_seed(args.seed)
        model_n, _ = load_model(args.model_name_or_path, device) if n != layers[0] else (model, None)
        config = sb.StarbucksConfig([(n, d) for m, d in pairs if m == n], args.pooling, args.similarity,
                                    args.temperature)
        embed_pairs, loss_fn = loss_for_method(args, [(n, H)], L, H, kind)
        train(args, model_n, tokenizer, kind, records, embed_pairs, loss_fn,
              os.path.join(args.output_dir, f"layer_{n}"), config)
    with open(os.path.join(args.output_dir, "starbucks_config.json"), "w") as f:
        json.dump({**asdict(sb.StarbucksConfig(pairs, args.pooling, args.similarity, args.temperature)),
                   "separate": {f"{n}": f"layer_{n}" for n in layers}, "training_arguments": vars(args)}, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
