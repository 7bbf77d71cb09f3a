"""What the two training loops (finetune.py, pretrain.py) share: the step's bookkeeping around the
paper's math. The loops themselves stay in the scripts, top to bottom (forward, loss, backward,
clip, step); every function takes plain values, never the CLI's namespace.

- Checkpoints that survive a crash: <output_dir>/checkpoint-<step> is written into a hidden
  temporary folder, every file flushed, a marker listing every file's size and SHA-256 written
  last, then renamed into place (one atomic rename). A run killed at any point leaves a complete
  checkpoint or nothing `latest_checkpoint` picks up; one damaged later fails its checksums and
  --resume falls back to the one before. Each records the run's identity (every setting that
  decides the result): --resume refuses another run's checkpoint, naming what differs. RNG states
  of torch (CPU, CUDA), numpy and Python's `random` are saved and restored.
- Several processes (torchrun) on PyTorch's own engine: one process per GPU (or per CPU process
  with gloo); every rank builds the same global batch and keeps its slice; embeddings are gathered
  so that every rank's passages are candidates for every query (README Eq. 3: the in-batch
  negatives of the whole global batch). Without torchrun these are no-ops for one process.
- AdamW, the data order, the contrastive batch, the masked batch of pre-training (Eq. 10-13),
  and the step: clip, skip a non-finite one, log.

    torchrun --nproc-per-node 4 finetune.py --output_dir out/srl
"""
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

import data
import models
import starbucks as sb


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun)

def setup():
    """-> (rank, world_size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, models.default_device()
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
    """This rank's contiguous slice of a global batch; rank r of W
    holds items[r*b:(r+1)*b], b = len/W."""
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
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. each
    rank's RNG state for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def freeze_unreached(model, max_layer):
    """Freeze what no loss here reaches: the pooler and the layers
    above max_layer; returns their names.

    Neither gets a gradient in one process either (AdamW skips them), so results are
    unchanged; under DDP a trainable parameter without a gradient would stall the
    gradient all-reduce, and find_unused_parameters cannot see it (the pooler does reach
    the forward's output, just not the loss).
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
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------
# Checkpoints that survive a crash

MARKER = "checkpoint_complete.json"  # written last: {"step", "files": {name: bytes}, "sha256": ...}
TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, step, RNG states, skips, the run
WEIGHTS = "model.safetensors"  # as model.save_pretrained writes it
LOG = "train_log.jsonl"  # a JSON line per step: in output_dir, and to its step in each checkpoint
PARTIAL_CHECKPOINT = re.compile(r"^\.checkpoint-.*\.tmp$")  # a save that did not finish


def rng_state():
    """Every generator a step may draw from (dropout, sampling): torch CPU and CUDA, numpy, random;
    numpy's as plain lists and numbers, so that torch.load(weights_only=True) reads them back."""
    n = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"bit_generator": n["bit_generator"], "key": n["state"]["key"].tolist(),
                      "pos": int(n["state"]["pos"]), "has_gauss": int(n["has_gauss"]),
                      "gauss": float(n["gauss"])},
            "python": random.getstate()}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"],
                         "gauss": n["gauss"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def fsync(path):
    """Flush a file's (or folder's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(output_dir, step, write, save_total_limit=None):
    """Write <output_dir>/checkpoint-<step> atomically; write(folder) fills it. Returns the path.

    A hidden temporary folder, every file flushed, the marker (each file's size and SHA-256) last,
    one rename: a crash leaves no half checkpoint under the final name. save_total_limit keeps only
    that many newest complete checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    for name in os.listdir(output_dir):  # a crash mid-save leaves only such folders
        if PARTIAL_CHECKPOINT.match(name):
            shutil.rmtree(os.path.join(output_dir, name))
    os.makedirs(tmp)
    write(tmp)
    names = [os.path.relpath(os.path.join(root, name), tmp)
             for root, _, files in os.walk(tmp) for name in files]
    for name in names:
        fsync(os.path.join(tmp, name))
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "files": {n: os.path.getsize(os.path.join(tmp, n)) for n in names},
                   "sha256": {n: sha256_of(os.path.join(tmp, n)) for n in names}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # the same step, saved by an interrupted run
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(output_dir)  # the rename itself durable
    if save_total_limit:
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


def files_problem(folder, sizes):
    """None if every file named in sizes {name: bytes written} lies in folder at that size, else the
    first that does not (the check of a checkpoint's marker, and of an index shard's)."""
    for name, size in sizes.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes where {size} were written"
    return None


def checkpoint_problem(folder, checksums=False):
    """None if folder is a complete checkpoint (every file of its marker at its size; checksums:
    and its SHA-256), else what is wrong with it."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
        problem = files_problem(folder, marker["files"])
    except FileNotFoundError:
        return "no completeness marker (the save did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "the completeness marker is unreadable"
    if checksums and not problem:
        for name, digest in marker.get("sha256", {}).items():  # a marker from before: sizes only
            if sha256_of(os.path.join(folder, name)) != digest:
                return f"{name} does not match its checksum (changed or damaged after it was saved)"
    return problem


def complete_checkpoints(output_dir):
    """The complete checkpoints in output_dir, oldest step first; others are reported and
    ignored."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match, path = data.CHECKPOINT_NAME.match(name), os.path.join(output_dir, name)
        problem = match and checkpoint_problem(path)
        if problem:
            print(f"ignoring {path}: {problem}", file=sys.stderr)
        elif match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir):
    """The complete checkpoint with the highest step in output_dir, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def load_training_state(folder):
    """The training_state.pt of a complete checkpoint (a clear error for an incomplete one)."""
    problem = checkpoint_problem(folder)
    if problem:
        raise ValueError(f"{folder} is not a complete checkpoint: {problem}")
    return torch.load(os.path.join(folder, TRAINING_STATE), weights_only=True)


class DamagedCheckpoint(Exception):
    """A complete checkpoint that fails its checksums or does not load; resume tries the one
    before."""


def restore(folder, model, optimization, run):
    """Load the weights, optimizer and scheduler (optimization) of a complete checkpoint -> the
    rest of its training state. run: this run's identity; a checkpoint of another run is refused
    (ValueError naming each difference): resuming it would silently continue another run."""
    problem = checkpoint_problem(folder, checksums=True)
    if problem:
        raise DamagedCheckpoint(problem)
    try:  # checked complete just above
        state = torch.load(os.path.join(folder, TRAINING_STATE), weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DamagedCheckpoint(f"{TRAINING_STATE} does not load ({e})") from None
    if not isinstance(state, dict) or not {"run", "step", "skipped", "optimizer", "scheduler",
                                           "rng"} <= set(state):
        raise DamagedCheckpoint(f"{TRAINING_STATE} lacks parts of a training state")
    differences = [f"{name}={state['run'].get(name)}, this run has {value}"
                   for name, value in run.items() if state["run"].get(name) != value]
    if differences:
        raise ValueError(
            f"{folder} was written with " + "; with ".join(differences) + ": it is another run's "
            "checkpoint; use the same settings, or a new --output_dir (or --overwrite_output_dir)")
    try:
        model.load_state_dict(safetensors.torch.load_file(os.path.join(folder, WEIGHTS)))
        for part, name in zip(optimization, ("optimizer", "scheduler")):
            part.load_state_dict(state[name])
    except Exception as e:  # safetensors' header errors have their own type: any failure is damage
        raise DamagedCheckpoint(
            f"its weights or optimizer state do not load ({type(e).__name__}: {e})") from None
    return state


# (real path, size, mtime_ns) -> SHA-256: a file read once per process however often it is named
_HASHED = {}


def file_fingerprint(path):
    """A file by content, not by where it lies: its size and the SHA-256 of ALL of it (a tuning
    that changes only late tensors, such as bias-only, leaves a file's first bytes and size as
    they were); a folder (a model): the same for each of its weight files. Part of a run's
    identity and of an index folder's name."""
    if os.path.isdir(path):
        return {name: file_fingerprint(os.path.join(path, name))
                for name in sorted(os.listdir(path))
                if name.endswith((".safetensors", ".bin", ".gguf", ".pt"))}
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_of(path)
    return {"bytes": stat.st_size, "sha256": _HASHED[key]}


# Flags that do not change what a run computes: they may differ between a run and its --resume.
# The data and the starting model are compared by content (data_file_0, model_weights): a moved
# copy of them resumes.
NOT_IDENTITY = ("output_dir", "resume", "overwrite_output_dir", "save_steps", "save_total_limit",
                "logging_steps", "max_bad_steps", "train_file", "model_name_or_path")


def run_identity(flags, world_size, data_files=(), model_folder=None):
    """Everything that decides a run's result: its flags but NOT_IDENTITY, the world size, a
    fingerprint of each data file (None: the embedded data) and of the starting model's
    weights -> {setting: value}, JSON-able."""
    identity = {k: json.loads(json.dumps(v)) for k, v in sorted(flags.items())
                if k not in NOT_IDENTITY}
    identity["world_size"] = world_size
    for i, path in enumerate(data_files):
        identity[f"data_file_{i}"] = file_fingerprint(path) if path else None
    if model_folder:  # a model re-trained in place is another starting point
        identity["model_weights"] = file_fingerprint(model_folder)
    return identity


# ----------------------------------------------------------------------------------------------
# A training run's side of it (finetune.py and pretrain.py)

@dataclass
class TrainLog:
    """The run's train_log.jsonl: its lines (each checkpoint keeps a copy), the file rank 0 writes,
    the steps skipped in all and in a row up to now (non-finite loss or gradient)."""
    lines: list = field(default_factory=list)
    file: object = None  # open on rank 0 only
    skipped: int = 0
    bad_in_row: int = 0  # a checkpoint is only written after a good step

    def append(self, line):
        self.lines.append(json.dumps(line))
        if self.file:
            self.file.write(self.lines[-1] + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            if self.skipped:
                print(f"skipped {self.skipped} steps with a non-finite loss or gradient "
                      f"(marked in {LOG})")


def resume_or_start(run, model, optimization, identity, total):
    """-> (checkpoint folder or None, first step, TrainLog). run: TrainingArguments.

    With run.resume: the newest complete checkpoint in run.output_dir that passes its checksums
    and loads (a damaged one is reported, the one before it tried) restores the weights, the
    optimizer and scheduler (optimization) and this rank's RNG state; the caller restores what else
    it saved. With run.overwrite_output_dir instead, an earlier run's checkpoints, log and weights
    are removed first, so that two runs never mix. Rank 0 opens the log."""
    rank, output_dir = rank_and_world_size()[0], run.output_dir
    found = complete_checkpoints(output_dir) if run.resume else []
    if run.overwrite_output_dir and not run.resume and rank == 0 and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if data.CHECKPOINT_NAME.match(name) or PARTIAL_CHECKPOINT.match(name):
                shutil.rmtree(path)
            elif name in data.RUN_FILES:
                os.remove(path)
    folder, state, train_log = None, None, TrainLog()
    for candidate in reversed(found):
        try:
            folder, state = candidate, restore(candidate, model, optimization, identity)
            break
        except DamagedCheckpoint as e:
            folder = None
            print(f"skipping {candidate}: {e}; trying the checkpoint before it", file=sys.stderr)
    if found and not folder:  # the model may hold a damaged one's weights
        raise ValueError(f"every checkpoint in {output_dir} is damaged (see above): nothing to "
                         f"resume; start over with --overwrite_output_dir")
    start = state["step"] if folder else 0
    if folder:
        train_log.skipped = state["skipped"]
        with open(os.path.join(folder, LOG)) as f:
            train_log.lines = f.read().splitlines()
        set_rng_state(state["rng"][rank])  # dropout continues exactly where the checkpoint left it
        if rank == 0:
            print(f"resuming from {folder}: step {start} of {total}")
    elif run.resume and rank == 0:
        print(f"--resume: no complete checkpoint in {output_dir}; starting at step 0")
    os.makedirs(output_dir, exist_ok=True)
    if rank == 0:
        train_log.file = open(os.path.join(output_dir, LOG), "w")
        train_log.file.write("".join(line + "\n" for line in train_log.lines))
    return folder, start, train_log


def save_training_checkpoint(run, step, save_model, optimization, identity, train_log):
    """run.output_dir/checkpoint-<step>: save_model(folder) (an evaluable model folder) plus what
    --resume needs; the run.save_total_limit newest are kept.

    optimization: (optimizer, scheduler); identity: the run's settings (run_identity). Every rank
    calls it (every rank's RNG state goes in); rank 0 alone writes.
    """
    optimizer, scheduler = optimization
    state = {"step": step, "skipped": train_log.skipped, "rng": gather_objects(rng_state()),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "run": identity}

    def write(folder):
        save_model(folder)
        torch.save(state, os.path.join(folder, TRAINING_STATE))
        with open(os.path.join(folder, LOG), "w") as f:
            f.write("".join(line + "\n" for line in train_log.lines))
    if rank_and_world_size()[0] == 0:
        save_checkpoint(run.output_dir, step, write, run.save_total_limit)


def read_training_data(read, path, skip_bad_lines):
    """read(path, skip_bad_lines) -> its result; a bad line's error names the flag that skips it."""
    try:
        return read(path, skip_bad_lines)
    except data.BadLine as e:
        raise data.BadLine(f"{e} (pass --skip_bad_lines to skip such lines)") from None


@dataclass
class TrainingArguments:
    """The shared flags as values (Hugging Face's names): what the loops read, without argparse."""
    output_dir: str = "output"
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
        return self.max_steps if self.max_steps > 0 else math.ceil(self.num_train_epochs *
                                                                   steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# Optimizer, schedules, data order

def adamw(model, learning_rate, weight_decay):
    """AdamW over the trainable parameters, with no weight decay on biases and norms (as HF)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{
        "params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay
    }, {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}], lr=learning_rate)


def global_batches(num_items, batch_size, start, total, seed):
    """(step, item indices of its global batch) for steps start..total-1;
    each epoch a new order, seeded by epoch."""
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
    """One batch: (queries [B], passages [B*G] with each query's
    positive first, gold scores or None)."""
    if kind == "scored":
        a, b, gold = zip(*(records[i] for i in indices))
        return list(a), list(b), torch.tensor(gold, dtype=torch.float)
    queries, passages = [], []
    for i in indices:
        r = records[i]
        queries.append(r["query"])
        passages.append(rng.choice(r["positives"]))
        # finetune checks that there are enough
        passages += rng.sample(r["negatives"], group_size - 1)
    return queries, passages, None


def global_batch(records, kind, step, indices, group_size, seed):
    """The global batch of a step from its items -> (queries, passages,
    gold, generator), seeded by the step."""
    rng = random.Random(seed * 1_000_003 + step)  # negatives and 2DMSE sizes depend on step only
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    queries, passages, gold = batch_texts(records, kind, indices, group_size, rng)
    return queries, passages, gold, generator


def tokenize_batch(tokenizer, queries, passages, query_max_len, passage_max_len):
    """(q_tok, p_tok): padded to the longest text of each side,
    truncated at the side's max length."""
    return (tokenizer(queries, padding=True, truncation=True, max_length=query_max_len,
                      return_tensors="pt"),
            tokenizer(passages, padding=True, truncation=True, max_length=passage_max_len,
                      return_tensors="pt"))


# ----------------------------------------------------------------------------------------------
# The masked batch (pre-training, Eq. 10-13)

def subword_flags(tokenizer):
    """(V,) bool: True for WordPiece continuation pieces ('##...'),
    the glue of whole-word masking."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    flags = torch.tensor([t.startswith("##") for t in tokens])
    if not flags.any():
        raise ValueError(
            "whole-word masking needs a WordPiece vocabulary ('##' continuation pieces)")
    return flags


def crop_documents(tokenizer, documents, max_length):
    """Every document cut into consecutive crops of max_length - 2
    tokens, each wrapped in [CLS] ... [SEP]."""
    pieces = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    size = max_length - 2
    return [[tokenizer.cls_token_id] + ids[i:i + size] + [tokenizer.sep_token_id]
            for ids in pieces for i in range(0, len(ids), size)]


def batch_tensors(crops, pad_token_id, special_ids):
    """Right-padded (input_ids, attention_mask, maskable) (B, T);
    maskable = real, non-special tokens."""
    T = max(len(c) for c in crops)
    input_ids = torch.full((len(crops), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(crops), T), dtype=torch.long)
    for i, c in enumerate(crops):
        input_ids[i, :len(c)] = torch.tensor(c)
        attention_mask[i, :len(c)] = 1
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    return input_ids, attention_mask, maskable


def whole_word_masking(input_ids, maskable, is_subword, mask_token_id, seed, encoder_rate=0.2,
                       decoder_rate=0.4):
    """SMAE's inputs: whole-word masks at two rates, the encoder's set
    inside the decoder's, BERT's 80/10/10.

    input_ids, maskable (B, T): maskable marks real, non-special tokens; is_subword (V,): '##'
    pieces. Per text, words (a piece and its '##' continuations) are drawn in a seeded random order
    and kept while they fit into round(rate * maskable tokens) (at least 1), as the authors'
    collator does; a word goes to the encoder's set only if it also goes to the decoder's, so
    encoder ⊆ decoder. Masked tokens become [MASK] 80 %, a random token 10 %, stay 10 % (drawn apart
    for each input). Returns (encoder input_ids, labels, decoder input_ids, decoder_labels), all
    (B, T); the same arguments always give the same result.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = input_ids.cpu()
    maskable = maskable.cpu().bool()
    # previous token maskable
    follows = torch.cat([torch.zeros_like(maskable[:, :1]), maskable[:, :-1]], dim=1)
    starts = maskable & ~(is_subword.cpu()[ids] & follows)  # (B, T) first piece of each word
    encoder_set = torch.zeros_like(maskable)
    decoder_set = torch.zeros_like(maskable)
    for b in range(ids.shape[0]):
        positions = maskable[b].nonzero().flatten().tolist()
        is_start = starts[b].tolist()
        words = []
        # the first maskable token always starts a word (its predecessor is not maskable)
        for i in positions:
            if is_start[i]:
                words.append([i])
            else:
                words[-1].append(i)
        if not words:
            continue
        enc_target = max(1, round(encoder_rate * len(positions)))
        dec_target = max(enc_target, round(decoder_rate * len(positions)))
        enc_count = dec_count = 0
        for w in torch.randperm(len(words), generator=generator).tolist():
            size = len(words[w])
            if dec_count + size > dec_target:
                continue
            decoder_set[b, words[w]] = True
            dec_count += size
            if enc_count + size <= enc_target:
                encoder_set[b, words[w]] = True
                enc_count += size
    out = []
    for masked in (encoder_set, decoder_set):
        u = torch.rand(ids.shape, generator=generator)  # (B, T): which of the 80/10/10 cases
        random_tokens = torch.randint(is_subword.shape[0], ids.shape, generator=generator)
        masked_ids = torch.where(masked & (u < 0.8), mask_token_id, ids)
        masked_ids = torch.where(masked & (u >= 0.8) & (u < 0.9), random_tokens, masked_ids)
        out += [
            masked_ids.to(input_ids.device),
            torch.where(masked, ids, -100).to(input_ids.device)
        ]
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The step's bookkeeping: optimizer and resume before the loop, clip/skip/step/log after backward


def start_training(model, run, schedule, total, identity, optimized=None):
    """AdamW over `optimized` (default: the model), the LR schedule (linear warmup over
    run.warmup_ratio of the total steps), and resume_or_start -> (optimizer, scheduler, checkpoint
    folder or None, first step, train log).

    run: TrainingArguments; identity: the run's settings (run_identity), checked on resume.
    optimized: a module holding the model and more (SMAE's heads), whose extra weights the caller
    restores."""
    optimizer = adamw(optimized or model, run.learning_rate, run.weight_decay)
    warmup = math.ceil(run.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    folder, start, train_log = resume_or_start(run, model, (optimizer, scheduler), identity, total)
    return optimizer, scheduler, folder, start, train_log


def finish_step(step, loss, params, optimization, max_grad_norm, train_log, tokens=None):
    """After backward: clip params, update if the loss and gradient are finite on every rank, log
    -> the step's log line. optimization: (optimizer, scheduler).

    A non-finite step is skipped (the weights stay, the schedule moves on)
    and counted in train_log.skipped and train_log.bad_in_row; the caller
    decides when too many in a row stop the run.
    """
    optimizer, scheduler = optimization
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    finite = all_finite(loss, grad_norm)
    if finite:
        optimizer.step()
        train_log.bad_in_row = 0
    else:
        train_log.skipped, train_log.bad_in_row = train_log.skipped + 1, train_log.bad_in_row + 1
    # skipping step 1 on purpose: the schedule moves on, as torch's warning fears
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    line = {
        "step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
        "skipped_steps": train_log.skipped, **({"tokens": tokens} if tokens is not None else {})
    }
    train_log.append(line if finite else {**line, "skipped": True})
    return line


def bad_steps_message(step, train_log, output_dir):
    """Why a run stopped after too many non-finite steps in a row, and where to resume from."""
    return (
        f"error: stopped at step {step + 1}: {train_log.bad_in_row} steps in a row had a "
        f"non-finite loss or gradient (each was skipped, {train_log.skipped} in all). Last good "
        f"checkpoint: "
        f"{latest_checkpoint(output_dir) or 'none saved'}. Lower --learning_rate or check "
        f"the data, then --resume.")
