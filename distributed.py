"""Several processes (torchrun) on PyTorch's own engine: process group, DDP, cross-rank negatives.

    torchrun --nproc-per-node 4 finetune.py --output_dir out/srl

One process per GPU (or per CPU process with the gloo backend). Every rank builds the same global
batch and keeps its own slice; embeddings are gathered so that every rank's passages are candidates
for every query (README Eq. 3: the in-batch negatives of the whole global batch). Shared by
finetune.py and pretrain.py. Without torchrun every function here is a no-op for one process.
"""
import os

import torch
import torch.distributed as dist

import starbucks as sb


def setup():
    """-> (rank, world_size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, device


def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def cleanup():
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving; nobody leaves before it is done
        dist.destroy_process_group()


def shard(items, rank, world_size):
    """This rank's contiguous slice of a global batch; rank r of W holds items[r*b:(r+1)*b], b = len/W."""
    if len(items) % world_size:
        raise ValueError(f"a global batch of {len(items)} does not split over {world_size} ranks")
    b = len(items) // world_size
    return items[rank * b:(rank + 1) * b]


def gather_with_grad(x):
    """(b, d) on each rank -> (W*b, d), rank order; gradient flows only into this rank's own rows.

    Every rank then computes the loss of the whole global batch; the caller multiplies the loss by
    W before backward, because DDP averages gradients over ranks and each rank's backward carries
    only its own rows' share (sum over ranks of the shares = the single-process gradient).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x  # the local rows keep their graph
    return torch.cat(parts)


def all_finite(*values):
    """True on every rank when every value is finite on every rank (ranks skip a step together)."""
    ok = torch.tensor(float(all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)))
    if dist.is_initialized():
        ok = ok.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def sum_over_ranks(x):
    """The sum of a tensor over every rank (e.g. each rank's share of a loss), on every rank."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. each rank's RNG state for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def freeze_unreached(model, max_layer):
    """Freeze what no loss here reaches: the pooler and the layers above max_layer; returns their names.

    Neither gets a gradient in one process either (AdamW skips them), so results are unchanged; under
    DDP a trainable parameter without a gradient would stall the gradient all-reduce, and
    find_unused_parameters cannot see it (the pooler does reach the forward's output, just not the loss).
    """
    blocks = sb.transformer_layers(model)
    unreached = {id(p) for block in blocks[max_layer:] for p in block.parameters()}
    frozen = []
    for name, p in model.named_parameters():
        if id(p) in unreached or name.startswith("pooler."):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def wrap(model, device):
    """DistributedDataParallel under torchrun, the model itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
