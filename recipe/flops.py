"""Counting FLOPs: the encoder's forward at a sub-layer (the cost of a size, Eq. 14) and training
FLOPs per token by tuning method (Ziarko et al., 2024; README Eq. 15), from which a FLOP budget
sets the number of steps (finetune.py --flops_budget, recipe/compute_optimal.py); and the
accounting finetune.py prints and saves (starbucks_config.json, "flops") for --flops_budget or a
--tuning other than full.
"""
import json

import torch

import starbucks as sb
import training
from recipe import tuning


def encoder_flops(model, n, tokens):
    """Forward FLOPs of the first n layers for one text of T tokens: 2 T P_(1..n) + 4 n T^2 H.

    P_(1..n) counts the weight matrices of layers 1..n (their multiply-adds); 4 n T^2 H is
    attention's QK^T and AV. Embeddings, norms, softmax and activations are left out (a few per
    cent).
    """
    blocks = sb.transformer_layers(model)
    if not 1 <= n <= len(blocks) or tokens < 1:
        raise ValueError(f"layer {n} is outside 1..{len(blocks)} or tokens {tokens} < 1")
    weights = sum(p.numel() for block in blocks[:n] for p in block.parameters() if p.ndim >= 2)
    return 2 * tokens * weights + 4 * n * tokens ** 2 * model.config.hidden_size


def flops_per_token(method, n, n_trainable):
    """Eq. 15: training FLOPs per token: full 6N; LoRA and bias 4N + 2N_t; freeze:K 2N + 4N_t.

    Forward 2N; backward 2N for the gradients of the activations (wherever a trained parameter lies
    below them) and 2N_t for the gradients of the trained weights. Freezing stops the backward pass
    at the first trained block, so both backward terms cover N_t only.
    """
    if method == "full":
        return 6 * n
    if method in ("lora", "bias"):
        return 4 * n + 2 * n_trainable
    if method == "freeze":
        return 2 * n + 4 * n_trainable
    raise ValueError(f"unknown tuning method {method!r}")


def steps_for_budget(budget, per_token, tokens_per_step):
    """Optimizer steps that fit a budget of training FLOPs (Eq. 15 x tokens per step), at least
    one."""
    steps = int(budget // (per_token * tokens_per_step))
    if steps < 1:
        raise ValueError(f"a budget of {budget:.3g} FLOPs is less than one step "
                         f"({per_token * tokens_per_step:.3g} FLOPs: {per_token:.3g} per token x "
                         f"{tokens_per_step:.0f} tokens)")
    return steps


def run_parameters(model, max_layer=None):
    """The parameters a forward that stops after block max_layer runs: all but those of the blocks
    above it and of BERT's pooler (pooling reads the hidden states; the pooler never runs)."""
    blocks = sb.transformer_layers(model)
    skipped = [
        blocks[max_layer:] if max_layer else [],
        [getattr(model, "pooler", None) or torch.nn.Identity()]]
    never = {id(p) for modules in skipped for module in modules for p in module.parameters()}
    return [p for p in model.parameters() if id(p) not in never]


def parameters_run(model, max_layer=None):
    """N of Eq. 15 for a forward to block max_layer (LoRA adapters not counted): what runs, not what
    exists."""
    return tuning.parameter_counts(model, run_parameters(model, max_layer))[0]


def tokens_per_step(tokenizer, dataset, batch_size, run, steps=8):
    """Mean padded tokens (queries and passages) that a step's forward computes, over its first
    steps. dataset: (kind, records); run: the group size, lengths and seed (finetune.py's
    FinetuneArguments)."""
    (kind, records), counts = dataset, []
    for step, indices in training.global_batches(len(records), batch_size, 0, steps, run.seed):
        queries, passages, _, _ = training.global_batch(records, kind, step, indices,
                                                        run.train_group_size, run.seed)
        q_tok, p_tok = training.tokenize_batch(tokenizer, queries, passages, run.query_max_len,
                                               run.passage_max_len)
        counts.append(q_tok["input_ids"].numel() + p_tok["input_ids"].numel())
    return sum(counts) / len(counts)


def flops_accounting(model, tuning_spec, tokens_per_step, flops_budget=None, max_layer=None):
    """Eq. 15 for a run: N, N_trainable, FLOPs per token, tokens per step and, with a budget, the
    steps.

    N and N_trainable count only what runs: a model trained at layer n (--method separate, Eq. 7)
    runs its embeddings and blocks 1..n, so the blocks above n (2.9x the FLOPs at n = 2 of
    BERT-base) are left out."""
    method, _ = tuning.parse_tuning(tuning_spec)
    n, n_trainable = tuning.parameter_counts(model, run_parameters(model, max_layer))
    per_token = flops_per_token(method, n, n_trainable)
    accounting = {
        "tuning": tuning_spec, "N": n, "N_trainable": n_trainable, "flops_per_token": per_token,
        "tokens_per_step": tokens_per_step, "flops_budget": flops_budget}
    if flops_budget:
        accounting["budget_steps"] = steps_for_budget(flops_budget, per_token, tokens_per_step)
    return accounting


def planned_flops(model, tokenizer, dataset, batch_size, run, max_layer, steps):
    """finetune.py's accounting (Eq. 15) for --flops_budget or a --tuning other than full: the
    tokens of its first steps, the steps the budget buys (else `steps`) and the planned FLOPs; rank
    0 prints them. run: finetune.py's FinetuneArguments."""
    tokens = tokens_per_step(tokenizer, dataset, batch_size, run)
    accounting = flops_accounting(model, run.tuning, tokens, run.flops_budget, max_layer)
    steps = accounting.get("budget_steps") or steps
    accounting.update(planned_steps=steps,
                      planned_flops=accounting["flops_per_token"] * tokens * steps)
    if training.rank_and_world_size()[0] == 0:
        print(f"FLOPs (README Eq. 15, tuning {run.tuning}): N = {accounting['N']:,} parameters, "
              f"N_trainable = {accounting['N_trainable']:,}; {accounting['flops_per_token']:.4g} "
              f"per token x {tokens:.0f} tokens per step x {steps} steps "
              f"= {accounting['planned_flops']:.4g}")
    return accounting


def flops_used(accounting, log_lines, world_size, step):
    """The accounting with what was trained up to step: this rank's padded tokens (its train log's
    lines) x the ranks."""
    seen = sum(json.loads(line).get("tokens", 0) for line in log_lines) * world_size
    return {**accounting, "steps": step, "tokens_seen": seen,
            "flops_used": accounting["flops_per_token"] * seen}
