"""One SMAE step (Eq. 13, vocabulary logits at masked positions only) against the same step with
logits at every position for every pair (as the authors' code computes them) and one plain MLM step,
side by side.

    python bench/bench_pretrain.py [--repeats 3] [--per_device_train_batch_size 4]

The packaged MiniLM-L6 in train mode on one batch of 128-token crops of the embedded real text, the
same masks for all three; a step is forward + backward. Steps alternate so that all variants see the
same machine state; each ratio is the median of the per-round ratios (the first round warms up and
is dropped). Peak memory: CUDA's peak allocation; on CPU (no allocator statistics) the bytes of the
tensors (weights excluded) autograd saves for backward, i.e. the activation memory at the end of the
forward. FLOPs are counted by torch's FlopCounterMode (matmuls, attention included via eager
attention).
"""
import copy
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402


def saved_bytes(step, parameters):
    """Bytes of the distinct non-parameter storages autograd saves during step() (its activation
    memory)."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def main():
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    device = models.default_device()
    encoder, tokenizer = models.load_model(data.DEFAULT_MODEL, device)
    heads = sb.SMAEHeads(encoder).to(device)
    encoder.train(), heads.train()
    L, H = encoder.config.num_hidden_layers, encoder.config.hidden_size
    pairs = sb.default_pairs(L, H)
    crops = training.crop_documents(tokenizer, data.training_documents()[:40], args.max_length)
    crops = [c for c in crops if len(c) == args.max_length][:args.per_device_train_batch_size]
    ids, mask, maskable = training.batch_tensors(crops, tokenizer.pad_token_id,
                                                 tokenizer.all_special_ids)
    enc, labels, dec, dec_labels = (x.to(device) for x in training.whole_word_masking(
        ids, maskable, training.subword_flags(tokenizer), tokenizer.mask_token_id, seed=0))
    mask = mask.to(device)

    # BERT's MLM: the full model, logits at every position
    def plain_mlm(model, all_positions=True):
        h = sb.layer_hidden_states(model, enc, mask, [L])[L]
        return sb.mlm_loss(heads, model.get_input_embeddings().weight, h, labels, all_positions)

    variants = {
        "smae": lambda model: sb.smae_loss(model, heads, enc, mask, labels, dec, dec_labels, pairs),
        "all_position_logits": lambda model: sb.smae_loss(model, heads, enc, mask, labels, dec,
                                                          dec_labels, pairs, all_positions=True),
        "plain_mlm": plain_mlm, }
    tokens = int(mask.sum())
    eager = copy.deepcopy(encoder)
    # CPU SDPA is invisible to the FLOP counter; eager is plain matmuls
    eager.set_attn_implementation("eager")
    flops = {}
    for name, step in variants.items():
        with FlopCounterMode(display=False) as counter:
            step(eager).backward()
        flops[name] = counter.get_total_flops() / tokens
    del eager
    memory = {}
    for name, step in variants.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(encoder).backward()
            memory[name] = torch.cuda.max_memory_allocated()
        else:
            memory[name] = saved_bytes(lambda: step(encoder),
                                       [*encoder.parameters(), *heads.parameters()])
        encoder.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    times = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(encoder).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - start)
            encoder.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    a = torch.randn(2048, 2048, device=device)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    matmul = 5 * 2 * 2048 ** 3 / (time.perf_counter() - start)
    ratio = lambda x, y: statistics.median(s / t for s, t in zip(times[x], times[y]))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"# MiniLM-L6 SMAE step (forward + backward), B={len(crops)} x {args.max_length} tokens, "
          f"{len(pairs)} pairs {pairs}, device {device}, threads {torch.get_num_threads()}, median "
          f"of {args.repeats}: "
          + ", ".join(f"{n} {t:.3f}s" for n, t in median.items()))
    print(
        f"RATIO smae_vs_all_position_logits {ratio('smae', 'all_position_logits'):.3f} goal <=0.5")
    print(f"RATIO smae_vs_plain_mlm {ratio('smae', 'plain_mlm'):.3f} goal <=3.0")
    what = "peak allocated" if device.type == "cuda" else "saved for backward (activations)"
    print(f"MEMORY_MB ({what}) " + " ".join(f"{n}={m / 2**20:.0f}" for n, m in memory.items()))
    print("FLOPS_PER_TOKEN (counted, forward + backward) " +
          " ".join(f"{n}={f / 1e6:.0f}M" for n, f in flops.items()) + "; FLOP ratios "
          f"smae/all_position_logits={flops['smae'] / flops['all_position_logits']:.3f} "
          f"smae/plain_mlm={flops['smae'] / flops['plain_mlm']:.3f}")
    print("ACHIEVED_GFLOPS " + " ".join(f"{n}={flops[n] * tokens / median[n] / 1e9:.1f}"
                                        for n in variants) +
          f"; this machine's 2048^3 fp32 matmul: {matmul / 1e9:.1f}")


if __name__ == "__main__":
    main()
