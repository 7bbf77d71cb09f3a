"""What the two training loops (finetune.py, pretrain.py) share: their flags, AdamW, the schedules,
the data order, the contrastive batch and loss of each method, and the step's bookkeeping.

The loops themselves stay in the scripts, top to bottom (forward, loss, backward, clip, step);
only what both repeat lives here. Every function takes plain values, never the CLI's namespace.
"""
import math
import random
import warnings
from dataclasses import dataclass, fields

import torch

import checkpoints
import cli
import data
import distributed
import starbucks as sb


def read_training_data(read, path, skip_bad_lines):
    """read(path, skip_bad_lines) -> its result; a bad line's error names the flag that skips it."""
    try:
        return read(path, skip_bad_lines)
    except data.BadLine as e:
        raise data.BadLine(f"{e} (pass --skip_bad_lines to skip such lines)") from None


@dataclass
class TrainingArguments:
    """The shared flags as values (Hugging Face's names): what the loops read, without argparse."""
    per_device_train_batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # overrides num_train_epochs when > 0
    logging_steps: int = 10
    seed: int = 42
    bf16: bool = False
    save_steps: int = 500  # 0: only the final model
    save_total_limit: int = None
    resume: bool = False
    overwrite_output_dir: bool = False
    max_bad_steps: int = 10

    @classmethod
    def from_flags(cls, parsed):
        """The shared fields of a parsed command line."""
        return cls(**{f.name: getattr(parsed, f.name) for f in fields(cls)})

    def total_steps(self, steps_per_epoch):
        return self.max_steps if self.max_steps > 0 else math.ceil(self.num_train_epochs * steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# Optimizer, schedules, data order

def adamw(model, learning_rate, weight_decay):
    """AdamW over the trainable parameters, with no weight decay on biases and norms (as HF)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}],
                             lr=learning_rate)


def linear_schedule(step, total, warmup):
    """Linear warmup to 1, then linear decay to 0 (as transformers' get_linear_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine_schedule(step, total, warmup):
    """Linear warmup to 1, then cosine decay to 0 (as transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def global_batches(num_items, batch_size, start, total, seed):
    """(step, item indices of its global batch) for steps start..total-1; each epoch a new order, seeded by epoch."""
    steps_per_epoch = num_items // batch_size
    order = None
    for step in range(start, total):
        epoch, offset = divmod(step, steps_per_epoch)
        if offset == 0 or order is None:
            order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        yield step, order[offset * batch_size:(offset + 1) * batch_size].tolist()


# ----------------------------------------------------------------------------------------------
# The contrastive batch (fine-tuning)

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
        passages += rng.sample(r["negatives"], group_size - 1)  # finetune checks that there are enough
    return queries, passages, None


def global_batch(records, kind, step, indices, group_size, seed):
    """The global batch of a step from its items -> (queries, passages, gold, generator), seeded by the step."""
    rng = random.Random(seed * 1_000_003 + step)  # negatives and 2DMSE sizes depend on step only
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    queries, passages, gold = batch_texts(records, kind, indices, group_size, rng)
    return queries, passages, gold, generator


def tokenize_batch(tokenizer, queries, passages, query_max_len, passage_max_len):
    """(q_tok, p_tok): padded to the longest text of each side, truncated at the side's max length."""
    return (tokenizer(queries, padding=True, truncation=True, max_length=query_max_len, return_tensors="pt"),
            tokenizer(passages, padding=True, truncation=True, max_length=passage_max_len, return_tensors="pt"))


def tokens_per_step(tokenizer, records, kind, batch_size, group_size, query_max_len, passage_max_len, seed,
                    steps=8):
    """Mean padded tokens (queries and passages) that a step's forward computes, over its first steps."""
    counts = []
    for step, indices in global_batches(len(records), batch_size, 0, steps, seed):
        queries, passages, _, _ = global_batch(records, kind, step, indices, group_size, seed)
        q_tok, p_tok = tokenize_batch(tokenizer, queries, passages, query_max_len, passage_max_len)
        counts.append(q_tok["input_ids"].numel() + p_tok["input_ids"].numel())
    return sum(counts) / len(counts)


# ----------------------------------------------------------------------------------------------
# The masked batch (pre-training, Eq. 10-13)

def subword_flags(tokenizer):
    """(V,) bool: True for WordPiece continuation pieces ('##...'), the glue of whole-word masking."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    flags = torch.tensor([t.startswith("##") for t in tokens])
    if not flags.any():
        raise ValueError("whole-word masking needs a WordPiece vocabulary ('##' continuation pieces)")
    return flags


def crop_documents(tokenizer, documents, max_length):
    """Every document cut into consecutive crops of max_length - 2 tokens, each wrapped in [CLS] ... [SEP]."""
    pieces = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    size = max_length - 2
    return [[tokenizer.cls_token_id] + ids[i:i + size] + [tokenizer.sep_token_id]
            for ids in pieces for i in range(0, len(ids), size)]


def batch_tensors(crops, pad_token_id, special_ids):
    """Right-padded (input_ids, attention_mask, maskable) (B, T); maskable = real, non-special tokens."""
    T = max(len(c) for c in crops)
    input_ids = torch.full((len(crops), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(crops), T), dtype=torch.long)
    for i, c in enumerate(crops):
        input_ids[i, :len(c)] = torch.tensor(c)
        attention_mask[i, :len(c)] = 1
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    return input_ids, attention_mask, maskable


# ----------------------------------------------------------------------------------------------
# Each method's loss (Eq. 5-9, 17) and one contrastive step

def method_loss(method, pairs, num_layers, hidden_size, kind, temperature, similarity, kl="scores", kl_weight=1.0):
    """-> (pairs to embed, loss(q_2d, p_2d, gold, generator)) for a method (Eq. 5-9, 17).

    kind: 'contrastive' (query/passage groups) or 'scored' (pairs with a gold score: CoSENT);
    kl: 'scores' (Eq. 4, the paper) or 'embeddings' (Eq. 4', the released STS script), srl only;
    kl_weight: srl's beta, 2dmse's (Matryoshka2dLoss's kl_div_weight) and 2dmse_retrieval's."""
    full = pairs[-1]
    t, sim = temperature, similarity
    if kind == "scored":  # CoSENT takes the place of Eq. 3
        if method == "srl" and kl == "embeddings":  # the released low-resource STS-B run
            return pairs, lambda q, p, gold, g: sb.released_starbucks_loss(
                lambda a, b: sb.cosent_loss(a, b, gold), q, p, pairs, kl_weight)
        if method == "srl":
            return pairs, lambda q, p, gold, g: sb.srl_cosent_loss(q, p, gold, pairs)
        if method in ("full", "separate"):
            return [full], lambda q, p, gold, g: sb.cosent_loss(q[full], p[full], gold)
        if method != "2dmse":  # the paper's STS tables have 2DMSE on scored pairs; MRL they do not
            raise ValueError(f"--method {method} needs query/passage data, not scored pairs")
    if method == "srl" and kl == "scores":
        return pairs, lambda q, p, gold, g: sb.srl_loss(q, p, pairs, t, kl_weight, sim)
    if method == "srl":
        return pairs, lambda q, p, gold, g: sb.srl_loss_embedding_kl(q, p, pairs, t, kl_weight, sim)
    if method == "symmetric":  # Ziarko et al.'s loss (Eq. 17) at the full pair
        from recipe import decoder
        return [full], lambda q, p, gold, g: decoder.symmetric_contrastive_loss(q[full], p[full], t, sim)
    if method in ("full", "separate"):  # separate: `full` is (n, H) of the layer being trained
        return [full], lambda q, p, gold, g: sb.full_loss(q, p, [full], t, sim)
    if method == "mrl":
        dims = sorted({d for _, d in pairs})
        return [(num_layers, hidden_size)], lambda q, p, gold, g: sb.matryoshka_loss(
            q[(num_layers, hidden_size)], p[(num_layers, hidden_size)], dims, t, sim)
    if method == "2dmse_retrieval":  # the pairs' layers at full width; one is sampled inside the loss
        layers = sorted({n for n, _ in pairs})
        dims = sorted({d for _, d in pairs})
        return [(n, hidden_size) for n in layers], lambda q, p, gold, g: sb.matryoshka_2d_retrieval_loss(
            {n: q[(n, hidden_size)] for n in layers}, {n: p[(n, hidden_size)] for n in layers}, dims, g, t, sim,
            kl_weight)
    dims = sorted({d for _, d in pairs})  # 2dmse: every layer at full width, sampled inside the loss
    every_layer = [(n, hidden_size) for n in range(1, num_layers + 1)]
    return every_layer, lambda q, p, gold, g: sb.matryoshka_2d_loss(
        {n: q[(n, hidden_size)] for n, _ in every_layer}, {n: p[(n, hidden_size)] for n, _ in every_layer},
        dims, g, t, sim, kl_weight=kl_weight,
        base_loss=(lambda a, b: sb.cosent_loss(a, b, gold)) if kind == "scored" else None)


def contrastive_step(net, embed_pairs, pooling, loss_fn, q_tok, p_tok, gold, generator, grad_cache_chunk=0):
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
        from large_batch.grad_cache import grad_cache_step
        return grad_cache_step(embed, inputs, global_loss, grad_cache_chunk, getattr(net, "no_sync", None),
                               loss_scale=world_size)
    loss = global_loss(*(embed(*x) for x in inputs))
    (loss * world_size).backward()  # DDP averages over ranks; see distributed.gather_with_grad
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# The step's bookkeeping: optimizer and resume before the loop, clip/skip/step/log after backward

def start_training(model, output_dir, resume, learning_rate, weight_decay, schedule, total, warmup, identity,
                   overwrite=False, optimized=None):
    """AdamW over `optimized` (default: the model), the LR schedule and, with resume, the last complete
    checkpoint restored into the model -> (optimizer, scheduler, checkpoint folder or None, first step, train log).

    identity: the run's settings (checkpoints.run_identity), checked on resume; overwrite (without resume):
    an earlier run's checkpoints and log in output_dir are removed first. optimized: a module holding the
    model and more (SMAE's heads), whose extra weights the caller restores."""
    if overwrite and not resume and distributed.rank_and_world_size()[0] == 0:
        checkpoints.clear_run(output_dir)
    optimizer = adamw(optimized or model, learning_rate, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    folder, start, train_log = checkpoints.resume_or_start(output_dir, resume, model, optimizer, scheduler,
                                                           identity, total)
    return optimizer, scheduler, folder, start, train_log


def finish_step(step, loss, params, optimizer, scheduler, max_grad_norm, train_log, tokens=None):
    """After backward: clip, update if the loss and gradient are finite on every rank, log -> the step's log line.

    A non-finite step is skipped (the weights stay, the schedule moves on) and counted in
    train_log.skipped and train_log.bad_in_row; the caller decides when too many in a row stop the run.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    finite = distributed.all_finite(loss, grad_norm)
    if finite:
        optimizer.step()
        train_log.bad_in_row = 0
    else:
        train_log.skipped, train_log.bad_in_row = train_log.skipped + 1, train_log.bad_in_row + 1
    with warnings.catch_warnings():  # skipping step 1 on purpose: the schedule moves on, as torch's warning fears
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    line = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
            "skipped_steps": train_log.skipped, **({"tokens": tokens} if tokens is not None else {})}
    train_log.append(line if finite else {**line, "skipped": True})
    return line


def bad_steps_message(step, train_log, output_dir):
    """Why a run stopped after too many non-finite steps in a row, and where to resume from."""
    return (f"error: stopped at step {step + 1}: {train_log.bad_in_row} steps in a row had a non-finite loss "
            f"or gradient (each was skipped, {train_log.skipped} in all). Last good checkpoint: "
            f"{checkpoints.latest_checkpoint(output_dir) or 'none saved'}. Lower --learning_rate or check "
            f"the data, then --resume.")
