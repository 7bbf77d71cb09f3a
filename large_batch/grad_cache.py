"""GradCache: the loss and gradients of a large contrastive batch, holding one chunk's activations
at a time.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021;
github.com/luyug/GradCache). It lets the paper's 128 x 8 retrieval batch (Eq. 5 over every pair)
train on one GPU: finetune.py --grad_cache_chunk.
"""
import contextlib

import torch


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(
        device) if device.type == "cuda" else None


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_step(embed, inputs, loss_fn, chunk_size, no_sync=None, loss_scale=1.0):
    """Eq. 5 (or any loss) and its gradients on a whole batch, holding one chunk's activations at a
    time.

    embed(input_ids, attention_mask) -> {pair: (b, d)}; inputs: [(input_ids, attention_mask), ...]
    (queries, passages); loss_fn(*embeddings) -> scalar over ALL embeddings, every pair at once.
    Adds to .grad what (loss_scale * loss_fn(*[embed(*x) for x in inputs])).backward() adds, and
    returns the loss. Each chunk's second pass replays its first pass's RNG state: same dropout.
    no_sync: DDP's model.no_sync, so that the ranks all-reduce once, after the last chunk.
    """
    chunks, cached = [], []  # chunks: (input index, rows, RNG state before its first pass)
    for i, (ids, mask) in enumerate(inputs):
        parts = []
        for start in range(0, ids.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunks.append((i, rows, _rng_state(ids.device)))
            with torch.no_grad():  # 1. embed every chunk without a graph
                parts.append(embed(ids[rows], mask[rows]))  # {pair: (chunk, d)}
        # leaf tensors: the loss's backward stops at them and leaves dloss/de in their .grad
        cached.append({k: torch.cat([p[k] for p in parts]).requires_grad_() for k in parts[0]})
    loss = loss_fn(*cached)  # 2. the loss on all embeddings: every candidate of every query
    (loss * loss_scale).backward()
    for c, (i, rows, state) in enumerate(chunks):  # 3. re-embed each chunk with a graph
        ids, mask = inputs[i]
        _set_rng_state(state, ids.device)
        last = c == len(chunks) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            e = embed(ids[rows], mask[rows])
            # chain rule through the cache: dloss/dtheta = sum over embeddings of <dloss/de,
            # de/dtheta>
            surrogate = sum((e[k] * cached[i][k].grad[rows]).sum() for k in e
                            if cached[i][k].grad is not None)
            surrogate.backward()
    return loss.detach()
