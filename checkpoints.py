"""Checkpoints that survive a crash: atomic save, find the last complete one, restore RNG states.

A checkpoint is the folder <output_dir>/checkpoint-<step>. It is written into a hidden temporary
folder, every file is flushed to disk, a completeness marker listing every file's size and SHA-256 is
written last, and only then is the folder renamed into place (one atomic rename). A run killed at any
point leaves either a complete checkpoint or nothing that `latest_checkpoint` will pick up; a
checkpoint damaged later (same size, other bytes) fails its checksums and --resume falls back to the
one before it. Each checkpoint also records the run's identity: every setting that decides the
result; --resume refuses a checkpoint of another run, naming the settings that differ.

Shared by finetune.py and pretrain.py: what goes into the folder is the caller's `write(folder)`;
`rng_state` / `set_rng_state` cover torch (CPU and CUDA), numpy and Python's `random`.
"""
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import safetensors.torch
import torch

import cli
import distributed

MARKER = "checkpoint_complete.json"  # written last: {"step", "files": {path: bytes}, "sha256": {path: hex}}
TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, step, RNG states, counters, run settings
WEIGHTS = "model.safetensors"  # as model.save_pretrained writes it
LOG = "train_log.jsonl"  # one JSON line per step, in the output folder and (up to its step) in each checkpoint


# ----------------------------------------------------------------------------------------------
# RNG states (everything that draws random numbers during a step: dropout, sampling)

def rng_state():
    """The state of every random generator a training step may use (torch CPU and CUDA, numpy, random)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # plain lists and ints, so that torch.load(weights_only=True) reads them back
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------------------------
# Atomic save

def fsync(path):
    """Flush a file's (or folder's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(folder):
    """{relative path: size} of every file under folder."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def sha256_of(path, limit=None):
    """Hex SHA-256 of a file (of its first `limit` bytes), read in 1 MiB blocks."""
    digest, left = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            digest.update(block)
            left = None if left is None else left - len(block)
    return digest.hexdigest()


def save_checkpoint(output_dir, step, write, save_total_limit=None):
    """Write <output_dir>/checkpoint-<step> atomically; write(folder) fills it. Returns the path.

    Temporary folder, fsync every file, marker last, one rename: a crash leaves no half checkpoint
    under the final name. save_total_limit keeps only that many newest complete checkpoints.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    for name in os.listdir(output_dir):  # leftovers of a crash mid-save: never complete, safe to drop
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, name))
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    os.makedirs(tmp)
    write(tmp)
    sizes = _file_sizes(tmp)
    for name in sizes:
        fsync(os.path.join(tmp, name))
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "files": sizes,
                   "sha256": {name: sha256_of(os.path.join(tmp, name)) for name in sizes}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # the same step saved by an earlier, interrupted run: the older ones remain meanwhile
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(output_dir)  # make the rename itself durable
    if save_total_limit:
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


# ----------------------------------------------------------------------------------------------
# Finding and loading

def checkpoint_problem(folder):
    """None if folder is a complete checkpoint, else what is wrong with it (marker missing, file cut short...)."""
    marker = os.path.join(folder, MARKER)
    if not os.path.exists(marker):
        return "no completeness marker (the save did not finish)"
    try:
        with open(marker) as f:
            sizes = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        return "the completeness marker is unreadable"
    return files_problem(folder, sizes)


def files_problem(folder, sizes):
    """None if every file named in sizes {name: bytes written} lies in folder at that size, else the first that
    does not (the check of a checkpoint's marker, and of an index shard's)."""
    for name, size in sizes.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes where {size} were written"
    return None


def checksum_problem(folder):
    """None if every file of a complete checkpoint has the SHA-256 its marker recorded, else the first that
    does not (a marker from before checksums were recorded has sizes only: nothing more to check)."""
    with open(os.path.join(folder, MARKER)) as f:
        recorded = json.load(f).get("sha256", {})
    for name, digest in recorded.items():
        if sha256_of(os.path.join(folder, name)) != digest:
            return f"{name} does not match its checksum (changed or damaged after it was saved)"
    return None


def complete_checkpoints(output_dir):
    """Paths of the complete checkpoints in output_dir, oldest step first; incomplete ones are reported and ignored."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        match = cli.CHECKPOINT_NAME.match(name)
        if not match:
            continue
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem:
            print(f"ignoring {path}: {problem}", file=sys.stderr)
            continue
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
    """A complete checkpoint whose files fail their checksums or do not load; resume tries the one before."""


def restore(folder, model, optimizer, scheduler, run):
    """Load weights, optimizer and scheduler from a complete checkpoint -> the rest of its training state.

    run: the run's identity ({setting: value}, saved as state["run"]); a checkpoint written with other
    values is refused (ValueError naming each), since resuming it would silently continue another run.
    Raises DamagedCheckpoint when a file fails its checksum or does not load.
    """
    problem = checksum_problem(folder)
    if problem:
        raise DamagedCheckpoint(problem)
    try:
        state = load_training_state(folder)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DamagedCheckpoint(f"{TRAINING_STATE} does not load ({e})") from None
    if not isinstance(state, dict) or not {"run", "step", "skipped", "optimizer", "scheduler", "rng"} <= set(state):
        raise DamagedCheckpoint(f"{TRAINING_STATE} lacks parts of a training state")  # e.g. an old, damaged one
    differences = [f"{name}={state['run'].get(name)}, this run has {value}"
                   for name, value in run.items() if state["run"].get(name) != value]
    if differences:
        raise ValueError(f"{folder} was written with " + "; with ".join(differences) + ": it is another run's "
                         "checkpoint; use the same settings, or a new --output_dir (or --overwrite_output_dir)")
    try:
        model.load_state_dict(safetensors.torch.load_file(os.path.join(folder, WEIGHTS)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # safetensors' header errors have their own type: any failure to load is damage
        raise DamagedCheckpoint(f"its weights or optimizer state do not load ({type(e).__name__}: {e})") from None
    return state


_HASHED = {}  # (real path, size, mtime_ns) -> SHA-256: a file read once per process however often it is named


def file_fingerprint(path):
    """A file by content, not by where it lies: its size and the SHA-256 of ALL of it (a tuning that changes
    only late tensors, such as bias-only, leaves a file's first bytes and size as they were); a folder (a
    model): the same for each of its weight files. Part of a run's identity and of an index folder's name."""
    if os.path.isdir(path):
        return {name: file_fingerprint(os.path.join(path, name)) for name in sorted(os.listdir(path))
                if name.endswith((".safetensors", ".bin", ".gguf", ".pt"))}
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_of(path)
    return {"bytes": stat.st_size, "sha256": _HASHED[key]}


# Flags that do not change what a run computes: they may differ between a run and its --resume.
NOT_IDENTITY = ("output_dir", "resume", "overwrite_output_dir", "save_steps", "save_total_limit", "logging_steps",
                "max_bad_steps", "train_file", "model_name_or_path")  # these two: compared by content, so a moved
# copy of the same data or model resumes (data_file_0, model_weights)


def run_identity(flags, world_size, data_files=(), model_folder=None):
    """Everything that decides a run's result: its flags but NOT_IDENTITY, the world size, a fingerprint of
    each data file (None: the embedded data) and of the starting model's weights -> {setting: value}, JSON-able."""
    identity = {k: json.loads(json.dumps(v)) for k, v in sorted(flags.items()) if k not in NOT_IDENTITY}
    identity["world_size"] = world_size
    for i, path in enumerate(data_files):
        identity[f"data_file_{i}"] = file_fingerprint(path) if path else None
    if model_folder:  # a model re-trained in place is another starting point
        identity["model_weights"] = file_fingerprint(model_folder)
    return identity


def clear_run(output_dir):
    """--overwrite_output_dir: remove an earlier run's checkpoints, log and weights, so that two runs never mix."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if cli.CHECKPOINT_NAME.match(name) or (name.startswith(".checkpoint-") and name.endswith(".tmp")):
            shutil.rmtree(path)
        elif name in cli.RUN_FILES:
            os.remove(path)


# ----------------------------------------------------------------------------------------------
# A training run's side of it (finetune.py and pretrain.py)

@dataclass
class TrainLog:
    """The run's train_log.jsonl: its lines (each checkpoint keeps a copy), the file rank 0 writes, the skip counts."""
    lines: list = field(default_factory=list)
    file: object = None  # open on rank 0 only
    skipped: int = 0  # steps skipped in all (non-finite loss or gradient)
    bad_in_row: int = 0  # steps skipped in a row up to now (a checkpoint is only written after a good step)

    def append(self, line):
        self.lines.append(json.dumps(line))
        if self.file:
            self.file.write(self.lines[-1] + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            if self.skipped:
                print(f"skipped {self.skipped} steps with a non-finite loss or gradient (marked in {LOG})")


def resume_or_start(output_dir, resume, model, optimizer, scheduler, run, total):
    """-> (checkpoint folder or None, first step, TrainLog).

    resume: continue from the last complete checkpoint in output_dir whose files pass their checksums
    and load (a damaged one is reported and the one before it is tried): weights, optimizer, scheduler
    and this rank's RNG state are restored here, the caller restores what else it saved (no RNG use).
    run: the run's identity, checked by `restore`. Rank 0 opens output_dir's log.
    """
    rank = distributed.rank_and_world_size()[0]
    folder, state = None, None
    for candidate in reversed(complete_checkpoints(output_dir) if resume else []):
        try:
            state = restore(candidate, model, optimizer, scheduler, run)
            folder = candidate
            break
        except DamagedCheckpoint as e:
            print(f"skipping {candidate}: {e}; trying the checkpoint before it", file=sys.stderr)
    if resume and state is None and complete_checkpoints(output_dir):  # the model may hold a damaged one's weights
        raise ValueError(f"every checkpoint in {output_dir} is damaged (see above): nothing to resume; "
                         f"start over with --overwrite_output_dir")
    start, train_log = 0, TrainLog()
    if folder:
        start, train_log.skipped = state["step"], state["skipped"]
        with open(os.path.join(folder, LOG)) as f:
            train_log.lines = f.read().splitlines()
        set_rng_state(state["rng"][rank])  # dropout continues exactly where the checkpoint left it
        if rank == 0:
            print(f"resuming from {folder}: step {start} of {total}")
    elif resume and rank == 0:
        print(f"--resume: no complete checkpoint in {output_dir}; starting at step 0")
    os.makedirs(output_dir, exist_ok=True)
    if rank == 0:
        train_log.file = open(os.path.join(output_dir, LOG), "w")
        train_log.file.write("".join(line + "\n" for line in train_log.lines))
    return folder, start, train_log


def save_training_checkpoint(output_dir, step, save_model, optimizer, scheduler, run, train_log, save_total_limit):
    """checkpoint-<step>: save_model(folder) (an evaluable model folder) plus what --resume needs.

    Every rank calls it (every rank's RNG state goes in); rank 0 alone writes.
    """
    state = {"step": step, "skipped": train_log.skipped, "rng": distributed.gather_objects(rng_state()),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "run": run}

    def write(folder):
        save_model(folder)
        torch.save(state, os.path.join(folder, TRAINING_STATE))
        with open(os.path.join(folder, LOG), "w") as f:
            f.write("".join(line + "\n" for line in train_log.lines))
    if distributed.rank_and_world_size()[0] == 0:
        save_checkpoint(output_dir, step, write, save_total_limit)
