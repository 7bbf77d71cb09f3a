"""Runs that survive: checkpoints and --resume, torchrun (DDP, gloo on CPU), GradCache, bad steps,
bad data.

Everything runs on a tiny random BERT (4 layers x 32) saved to a temporary folder; the real-size
behaviour is the same code. finetune.py and pretrain.py (SMAE) share the run machinery, so the
whole-run tests take the script as a parameter.
"""
import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import finetune  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402
from large_batch import grad_cache  # noqa: E402

WORDS = ("the cat sat on a mat while dogs ran over green hills and birds sang near old stone "
         "walls").split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))


def _tiny_model(folder, dropout):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    vocab = os.path.join(models.resolve_model_path("all-MiniLM-L6-v2"), "vocab.txt")
    # vocab_file= is silently ignored in transformers 5
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster on a shared machine, and the subprocesses use one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'dropout': model folder (dropout 0.1), 'plain': model folder (no dropout), 'train': Tevatron
    JSONL, 'text': plain text for pretrain.py, one document of 4-12 words a line}."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    train = root / "train.jsonl"
    with open(train, "w") as f:
        for _ in range(64):
            f.write(
                json.dumps({
                    "query": _sentence(rng), "positive_passages": [{"text": _sentence(rng)}],
                    "negative_passages": [{"text": _sentence(rng)} for _ in range(3)]}) + "\n")
    text = root / "text.txt"
    text.write_text("".join(_sentence(rng) + "\n" for _ in range(64)))
    folders = {
        "dropout": _tiny_model(root / "dropout", 0.1), "plain": _tiny_model(root / "plain", 0.0)}
    assert "[UNK]" not in models.load_model(folders["plain"],
                                            torch.device("cpu"))[1].tokenize(" ".join(WORDS))
    return {**folders, "train": str(train), "text": str(text)}


# per script: its main, its data, and what its output folder holds besides the log
SCRIPTS = {"finetune.py": (finetune.main, "train", ["model.safetensors"]),
           "pretrain.py": (pretrain.main, "text", ["model.safetensors", pretrain.HEADS_FILE])}
# short crops, two pairs: a fast SMAE step
SMAE_TINY = ("--max_length", "16", "--pairs", "2x16,4x32")


def _script_args(script, tiny, model, output_dir, *extra):
    """The command-line arguments of finetune.py or pretrain.py on the tiny model and its data."""
    return ["--model_name_or_path", tiny[model], "--train_file", tiny[SCRIPTS[script][1]],
            "--output_dir", str(output_dir), *(SMAE_TINY if script == "pretrain.py" else ()),
            *extra]


def _script_cmd(script, tiny, model, output_dir, *extra):
    return [sys.executable, os.path.join(ROOT, script),
            *_script_args(script, tiny, model, output_dir, *extra)]


def _finetune_cmd(tiny, model, output_dir, *extra):
    return _script_cmd("finetune.py", tiny, model, output_dir, *extra)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# Checkpoints

def _write_files(content):
    def write(folder):
        for name, text in content.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    return write


def test_checkpoint_cut_in_half_or_unfinished_is_never_picked(tmp_path):
    for step in (2, 4):
        training.save_checkpoint(str(tmp_path), step,
                                 _write_files({"weights.bin": "x" * 1000, "log": "ok"}))
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    # a crash mid-save leaves only the hidden temporary folder, even with every file in it
    os.makedirs(tmp_path / ".checkpoint-6.tmp")
    (tmp_path / ".checkpoint-6.tmp" / "weights.bin").write_text("x" * 1000)
    # a checkpoint-named folder without the marker (e.g. copied by hand, interrupted)
    os.makedirs(tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / "weights.bin").write_text("x" * 1000)
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    # the newest complete one cut in half (a lost write): its marker's sizes no longer match
    with open(tmp_path / "checkpoint-4" / "weights.bin", "r+") as f:
        f.truncate(500)
    assert "500 bytes where 1000" in training.checkpoint_problem(str(tmp_path / "checkpoint-4"))
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    os.remove(tmp_path / "checkpoint-2" / "log")
    assert training.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        training.load_training_state(str(tmp_path / "checkpoint-4"))
    # the next save clears the crash's leftovers and replaces a broken folder of the same step
    training.save_checkpoint(str(tmp_path), 4, _write_files({"weights.bin": "y" * 10}))
    assert not os.path.exists(tmp_path / ".checkpoint-6.tmp")
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "weights.bin").read_text() == "y" * 10


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 10):
        training.save_checkpoint(str(tmp_path), step, _write_files({"a": str(step)}),
                                 save_total_limit=2)
    # numeric, not string, order
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-3"]


def test_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng": training.rng_state()}, tmp_path / "state.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    training.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


@pytest.mark.parametrize("script", ["finetune.py", "pretrain.py"])
def test_kill_9_during_a_run_then_resume_gives_the_same_weights_and_log_bit_for_bit(
        tiny, tmp_path, script):
    """Dropout on: the resumed run must also restore the RNG state to reproduce the masks.
    pretrain.py: the encoder and the SMAE heads (smae_heads.pt) both come out bit for bit."""
    main, _, outputs = SCRIPTS[script]
    args = ("--max_steps", "12", "--save_steps", "3", "--per_device_train_batch_size", "4")
    killed = subprocess.Popen(_script_cmd(script, tiny, "dropout", tmp_path / "killed", *args),
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (not os.path.isdir(tmp_path / "killed" / "checkpoint-3") and killed.poll() is None
           and time.time() < deadline):
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "model.safetensors")  # it died before the end
    resumed = subprocess.run(
        _script_cmd(script, tiny, "dropout", tmp_path / "killed", *args, "--resume"), env=ENV,
        capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    # uninterrupted, in this process
    main(_script_args(script, tiny, "dropout", tmp_path / "whole", *args))
    log_whole, log_resumed = (_read(tmp_path / "whole" / "train_log.jsonl"),
                              _read(tmp_path / "killed" / "train_log.jsonl"))
    assert len(log_whole.splitlines()) == 12
    assert log_resumed == log_whole
    for name in outputs:
        assert _read(tmp_path / "killed" / name) == _read(tmp_path / "whole" / name), name


def test_pretrain_checkpoints_load_in_finetune_and_a_truncated_one_is_never_resumed(
        tiny, tmp_path, capsys):
    args = _script_args("pretrain.py", tiny, "plain", tmp_path, "--max_steps", "4", "--save_steps",
                        "2", "--per_device_train_batch_size", "4")
    pretrain.main(args)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        # an evaluable model folder
        encoder, _ = models.load_model(str(folder), torch.device("cpu"))
        sb.SMAEHeads(encoder).load_state_dict(
            torch.load(folder / pretrain.HEADS_FILE, weights_only=True))
        assert len(open(folder / "train_log.jsonl").readlines()) == step
    # a crash cut the heads short
    with open(tmp_path / "checkpoint-4" / pretrain.HEADS_FILE, "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "checkpoint-4" / pretrain.HEADS_FILE) // 2)
    capsys.readouterr()
    pretrain.main(args + ["--resume"])
    out = capsys.readouterr()
    assert f"resuming from {tmp_path / 'checkpoint-2'}: step 2 of 4" in out.out
    assert "ignoring" in out.err and "smae_heads.pt has" in out.err


def test_resume_refuses_settings_that_change_the_batches(tiny, tmp_path):
    common = [
        "--model_name_or_path", tiny["plain"], "--train_file", tiny["train"], "--output_dir",
        str(tmp_path), "--max_steps", "2", "--save_steps", "1"]
    finetune.main(common + ["--per_device_train_batch_size", "4"])
    with pytest.raises(ValueError, match="per_device_train_batch_size=4, this run has 8"):
        finetune.main(common + ["--per_device_train_batch_size", "8", "--resume"])


# ----------------------------------------------------------------------------------------------
# One training step: GradCache and several processes

def _batch(num_queries=4, group=4, seed=0):
    rng = random.Random(seed)
    return [_sentence(rng)
            for _ in range(num_queries)], [_sentence(rng) for _ in range(num_queries * group)]


def _step_setup(model_dir, method="srl"):
    """(model, tokenizer, embed_pairs, loss_fn) as finetune.py builds them (cosine, mean
    pooling)."""
    model, tokenizer = models.load_model(model_dir, torch.device("cpu"))
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    config = sb.StarbucksConfig(sb.default_pairs(L, H), "mean", "cos", 0.05)
    embed_pairs, loss_fn = finetune.method_loss(method, config, (L, H), "contrastive")
    training.freeze_unreached(model, max(n for n, _ in embed_pairs))
    return model, tokenizer, embed_pairs, loss_fn


def _step(net, setup, batch, chunk):
    """finetune.train's step, as its loop writes it, of net (the model of setup = _step_setup(...),
    or it wrapped) on batch = (queries, passages): forward, the loss over every rank's rows, backward
    x world size; GradCache when chunk > 0 -> (loss, {name: grad}); zeroes the gradients after."""
    model, tokenizer, embed_pairs, loss_fn = setup
    world_size = training.rank_and_world_size()[1]
    queries, passages = batch
    inputs = [(t["input_ids"], t["attention_mask"])
              for t in (tokenizer(texts, padding=True, return_tensors="pt")
                        for texts in (queries, passages))]
    generator = torch.Generator().manual_seed(5)  # 2DMSE's sampled sizes

    def embed(ids, mask):
        return sb.embed_2d(net, ids, mask, embed_pairs, "mean")

    def global_loss(q_2d, p_2d):
        return loss_fn({k: training.gather_with_grad(v) for k, v in q_2d.items()},
                       {k: training.gather_with_grad(v) for k, v in p_2d.items()}, None, generator)

    if chunk:
        loss = grad_cache.grad_cache_step(embed, inputs, global_loss, chunk,
                                          getattr(net, "no_sync", None), loss_scale=world_size)
    else:
        loss = global_loss(*(embed(*x) for x in inputs))
        (loss * world_size).backward()
        loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss, grads


def _assert_same_step(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["srl", "2dmse"])
def test_grad_cache_step_equals_the_uncached_step(tiny, method):
    """Every pair at once (srl: 6 pairs; 2dmse: every layer), chunks of 3 that do not divide 4 or
    16."""
    setup, batch = _step_setup(tiny["plain"], method), _batch()
    uncached = _step(setup[0], setup, batch, 0)
    cached = _step(setup[0], setup, batch, 3)
    _assert_same_step(cached, uncached)
    # the grads are not trivial
    assert all(g.abs().sum() > 0 for n, g in uncached[1].items() if "layer.3" in n)


def test_grad_cache_replays_each_chunks_dropout_mask(tiny):
    """Dropout on: the second pass of each chunk must see its first pass's mask. The reference
    embeds the same chunks in the same order with a graph (same RNG draws) and backpropagates
    directly."""
    model, tokenizer, embed_pairs, loss_fn = _step_setup(tiny["dropout"])
    model.train()
    queries, passages = _batch()
    q_tok, p_tok = tokenizer(queries, padding=True, return_tensors="pt"), tokenizer(
        passages, padding=True, return_tensors="pt")
    inputs = [(q_tok["input_ids"], q_tok["attention_mask"]),
              (p_tok["input_ids"], p_tok["attention_mask"])]

    def embed(ids, mask):
        return sb.embed_2d(model, ids, mask, embed_pairs, "mean")

    def loss_of(q_2d, p_2d):
        return loss_fn(q_2d, p_2d, None, None)

    torch.manual_seed(7)
    parts = [[embed(ids[s:s + 3], mask[s:s + 3]) for s in range(0, len(ids), 3)]
             for ids, mask in inputs]
    reference = loss_of(*({k: torch.cat([p[k] for p in chunks]) for k in chunks[0]}
                          for chunks in parts))
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = grad_cache.grad_cache_step(embed, inputs, loss_of, 3)
    _assert_same_step((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}),
                      (reference.detach(), ref_grads))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, model_dir, out_dir):
    """One of two gloo ranks: DDP, this rank's half of the batch, plain and grad-cached steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    rank, world_size, device = training.setup()
    setup = _step_setup(model_dir)
    net = training.wrap(setup[0], device)
    queries, passages = _batch()
    queries, passages = training.shard(queries, rank, world_size), training.shard(
        passages, rank, world_size)
    results = {chunk: _step(net, setup, (queries, passages), chunk) for chunk in (0, 3)}
    results["objects"] = training.gather_objects(f"rank {rank}")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    training.cleanup()


def test_two_ranks_give_the_loss_and_gradients_of_one_process_on_the_concatenated_batch(
        tiny, tmp_path):
    """gloo on CPU; each rank holds 2 queries and 8 passages, all 16 passages are candidates for all
    4 queries."""
    mp.spawn(_two_rank_worker, args=(_free_port(), tiny["plain"], str(tmp_path)), nprocs=2)
    setup = _step_setup(tiny["plain"])
    single = _step(setup[0], setup, _batch(), 0)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_same_step(results[0], single)
        _assert_same_step(results[3], single)  # GradCache under DDP (no_sync until the last chunk)
        assert results["objects"] == ["rank 0", "rank 1"]


def _pretrain_step_setup(model_dir):
    """pretrain.py's SMAE module (encoder and fresh heads, seeded) and a global batch of 8 masked
    crops."""
    encoder, tokenizer = models.load_model(model_dir, torch.device("cpu"))
    torch.manual_seed(3)
    heads = sb.SMAEHeads(encoder)
    pairs = [(2, 16), (4, 32)]
    training.freeze_unreached(encoder, 4)
    crops = training.crop_documents(tokenizer, [_sentence(random.Random(i)) for i in range(8)], 16)
    batch = pretrain.masked_batch(crops, tokenizer, training.subword_flags(tokenizer), 11)
    return pretrain.SMAE(encoder, heads, pairs), batch


def _pretrain_step(net, smae, batch):
    loss = pretrain.training_step(net, batch, torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in smae.named_parameters() if p.requires_grad}
    smae.zero_grad(set_to_none=True)
    return loss, grads


def _two_rank_pretrain_worker(rank, port, model_dir, out_dir):
    """One of two gloo ranks: DDP over encoder and heads, this rank's 4 of the 8 crops."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    rank, world_size, device = training.setup()
    smae, batch = _pretrain_step_setup(model_dir)
    net = training.wrap(smae, device)
    tied = (smae.encoder.get_input_embeddings().weight
            is net.module.encoder.embeddings.word_embeddings.weight)
    result = _pretrain_step(net, smae, batch)
    torch.save({"step": result, "tied": tied}, os.path.join(out_dir, f"rank{rank}.pt"))
    training.cleanup()


def test_two_ranks_give_the_smae_loss_and_gradients_of_one_process_on_the_concatenated_batch(
        tiny, tmp_path):
    """The ranks' slices hold different numbers of masked tokens (each term is a mean over them):
    only dividing by the global counts gives the global mean. Gradients of the encoder, the tied
    word embeddings (encoder input and vocabulary decoder) and the heads all match."""
    smae, batch = _pretrain_step_setup(tiny["plain"])
    labels, decoder_labels = batch[2], batch[4]
    per_rank = [int((x[:4] != -100).sum()) for x in (labels, decoder_labels)]
    # unequal slices
    assert per_rank != [int((x[4:] != -100).sum()) for x in (labels, decoder_labels)]
    mp.spawn(_two_rank_pretrain_worker, args=(_free_port(), tiny["plain"], str(tmp_path)), nprocs=2)
    single = _pretrain_step(smae, smae, batch)
    assert any(n.startswith("heads.")
               for n in single[1]) and "encoder.embeddings.word_embeddings.weight" in single[1]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert results["tied"]
        _assert_same_step(results["step"], single)


@pytest.mark.parametrize("script", ["finetune.py", "pretrain.py"])
def test_torchrun_logs_the_losses_of_one_process_with_the_doubled_batch(tiny, tmp_path, script):
    args = ("--max_steps", "3", "--save_steps", "2")
    two = subprocess.Popen([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        *_script_cmd(script, tiny, "plain", tmp_path / "two", *args,
                     "--per_device_train_batch_size", "2")[1:]], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    one = subprocess.run(
        _script_cmd(script, tiny, "plain", tmp_path / "one", *args, "--per_device_train_batch_size",
                    "4"), env=ENV, capture_output=True, text=True)
    out, _ = two.communicate()
    assert two.returncode == 0, out
    assert one.returncode == 0, one.stderr
    assert out.count("x 2 processes") == 1  # rank 0 alone prints
    read = lambda d: [json.loads(line) for line in open(tmp_path / d / "train_log.jsonl")]
    for a, b in zip(read("two"), read("one"), strict=True):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    state = training.load_training_state(str(tmp_path / "two" / "checkpoint-2"))
    # every rank's RNG, saved by rank 0
    assert len(state["rng"]) == 2 and state["run"]["world_size"] == 2
    for name in SCRIPTS[script][2]:
        assert os.path.exists(tmp_path / "two" / name)


def test_freeze_unreached_leaves_exactly_the_parameters_the_loss_reaches(tiny):
    """DDP needs every trainable parameter to get a gradient; here layers 3-4 and the pooler get
    none."""
    model, tokenizer = models.load_model(tiny["plain"], torch.device("cpu"))
    frozen = training.freeze_unreached(model, 2)
    assert frozen and all(
        n.startswith(("pooler.", "encoder.layer.2.", "encoder.layer.3.")) for n in frozen)
    queries, passages = _batch()
    q = tokenizer(queries, padding=True, return_tensors="pt")
    p = tokenizer(passages, padding=True, return_tensors="pt")
    pairs = [(1, 16), (2, 32)]
    sb.srl_loss(sb.embed_2d(model, q["input_ids"], q["attention_mask"], pairs, "mean"),
                sb.embed_2d(model, p["input_ids"], p["attention_mask"], pairs, "mean"),
                pairs).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad == (name not in frozen), name


def test_one_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert training.gather_with_grad(x) is x
    assert training.sum_over_ranks(x) is x
    assert training.gather_objects("a") == ["a"]
    assert training.rank_and_world_size() == (0, 1)
    assert training.shard(list(range(6)), 1, 3) == [2, 3]
    with pytest.raises(ValueError, match="does not split"):
        training.shard(list(range(5)), 0, 2)
    assert training.all_finite(torch.tensor(1.0), 2.0)
    assert not training.all_finite(torch.tensor(1.0), torch.tensor([0.0, float("nan")]))
    assert not training.all_finite(float("inf"))


def test_global_batches_are_a_seeded_permutation_per_epoch_and_resume_mid_epoch(tiny):
    # 3 steps per epoch, the last item left out
    whole = list(training.global_batches(10, 3, 0, 7, seed=4))
    assert [s for s, _ in whole] == list(range(7))
    for epoch in (0, 1):
        items = [i for _, b in whole[3 * epoch:3 * epoch + 3] for i in b]
        assert len(set(items)) == 9 and set(items) <= set(range(10))
    assert whole[0][1] != whole[3][1]  # a new order each epoch
    # a resumed run: the same batches
    assert list(training.global_batches(10, 3, 4, 7, seed=4)) == whole[4:]


def test_adamw_decays_matrices_only_and_leaves_frozen_parameters_out(tiny):
    model, _ = models.load_model(tiny["plain"], torch.device("cpu"))
    frozen = set(training.freeze_unreached(model, 2))
    optimizer = training.adamw(model, 1e-3, 0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n not in frozen}


# ----------------------------------------------------------------------------------------------
# A run's identity, checksums, output folders (nothing silently wrong)

def _finetune_args(tiny, output_dir, *extra):
    return _script_args("finetune.py", tiny, "plain", output_dir, "--max_steps", "3",
                        "--save_steps", "1", "--per_device_train_batch_size", "4", *extra)


@pytest.mark.parametrize("flag, other", [("--method", "full"), ("--learning_rate", "3e-4"),
                                         ("--train_file", None)])
def test_resume_refuses_another_runs_checkpoint_naming_the_setting(tiny, tmp_path, flag, other):
    """Another --method, --learning_rate or data file must not 'resume' the first run's
    checkpoint."""
    lines = open(tiny["train"]).read().splitlines()
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    finetune.main(_finetune_args(tiny, tmp_path / "run", "--train_file", str(data_file)))
    # the same file name, other contents: the fingerprint of its first MiB differs
    if other is None:
        data_file.write_text("\n".join(reversed(lines)) + "\n")
        other = str(data_file)
    name = flag.lstrip("-") if flag != "--train_file" else "data_file_0"
    with pytest.raises(ValueError,
                       match=f"was written with {name}=[^;]*: it is another run's checkpoint"):
        finetune.main(
            _finetune_args(tiny, tmp_path / "run", "--train_file", str(data_file), flag, other,
                           "--resume"))


def test_a_fresh_run_in_another_runs_folder_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    finetune.main(_finetune_args(tiny, tmp_path))
    with pytest.raises(SystemExit):
        finetune.main(_finetune_args(tiny, tmp_path, "--learning_rate", "3e-4"))
    assert "holds another run" in capsys.readouterr().err
    finetune.main(_finetune_args(tiny, tmp_path, "--learning_rate", "3e-4", "--max_steps", "2",
                                 "--overwrite_output_dir"))
    # no mixed log
    assert [json.loads(line)["step"] for line in open(tmp_path / "train_log.jsonl")] == [1, 2]
    assert sorted(n for n in os.listdir(tmp_path)
                  if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("damage", ["training_state", "safetensors_header"])
def test_a_damaged_checkpoint_of_the_same_size_falls_back_to_the_one_before(
        tiny, tmp_path, capsys, damage):
    finetune.main(_finetune_args(tiny, tmp_path))
    name = training.TRAINING_STATE if damage == "training_state" else training.WEIGHTS
    path = tmp_path / "checkpoint-3" / name
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size, other bytes: a size check alone would accept it
        f.seek(size // 2 if damage == "training_state" else 0)
        f.write(b"\xff" * 16)
    assert os.path.getsize(path) == size and training.checkpoint_problem(
        str(tmp_path / "checkpoint-3")) is None
    capsys.readouterr()
    finetune.main(_finetune_args(tiny, tmp_path, "--resume"))
    out = capsys.readouterr()
    assert f"skipping {tmp_path / 'checkpoint-3'}: {name} does not match its checksum" in out.err
    assert f"resuming from {tmp_path / 'checkpoint-2'}: step 2 of 3" in out.out


def test_when_every_checkpoint_is_damaged_resume_stops_instead_of_starting_over(tiny, tmp_path):
    finetune.main(_finetune_args(tiny, tmp_path, "--max_steps", "1"))
    with open(tmp_path / "checkpoint-1" / training.WEIGHTS, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        finetune.main(_finetune_args(tiny, tmp_path, "--max_steps", "1", "--resume"))


def test_export_refuses_its_source_and_a_non_empty_folder_and_output_dir_files_are_refused(
        tiny, tmp_path, capsys):
    import evaluate
    from deploy import export
    before = sorted(os.listdir(tiny["plain"]))
    with pytest.raises(ValueError, match="is the source model's folder"):
        export.main([
            "--model_name_or_path", tiny["plain"], "--pair", "2x16", "--output_dir", tiny["plain"]])
    assert sorted(os.listdir(tiny["plain"])) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite_output_dir"):
        export.main([
            "--model_name_or_path", tiny["plain"], "--pair", "2x16", "--output_dir",
            str(busy)])
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    for main in (evaluate.main, finetune.main, pretrain.main):
        with pytest.raises(SystemExit):
            main(["--output_dir", str(a_file)])
        assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------
# Non-finite steps

def test_a_skipped_first_step_moves_the_schedule_on_without_torchs_warning():
    """torch warns when the scheduler steps before the optimizer ever has: here that is the design
    (a skipped step uses up its learning rate), so finish_step keeps the warning from the user; any
    other warning still shows."""
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    log = training.TrainLog()
    loss = (param * float("nan")).sum()
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = training.finish_step(0, loss, [param], (optimizer, scheduler), 1.0, log)
    assert line["lr"] == 1.0 and scheduler.get_last_lr() == [0.5] and torch.equal(
        param.detach(), torch.ones(2))
    assert log.skipped == 1 and log.lines and json.loads(log.lines[0])["skipped"]


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tiny, tmp_path, monkeypatch,
                                                                  capsys):
    real_finish, calls = training.finish_step, []

    def poisoned(step, loss, params, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3: one gradient entry becomes NaN after backward
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("nan")
        return real_finish(step, loss, params, *args, **kwargs)
    monkeypatch.setattr(training, "finish_step", poisoned)
    finetune.main([
        "--model_name_or_path", tiny["plain"], "--train_file", tiny["train"], "--output_dir",
        str(tmp_path), "--max_steps", "5", "--save_steps", "1", "--max_bad_steps", "2"])
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r.get("skipped", False) for r in log] == [False, False, True, False, False]
    assert "skipped 1 steps with a non-finite" in capsys.readouterr().out
    assert os.path.isdir(
        tmp_path / "checkpoint-4") and not os.path.exists(tmp_path / "checkpoint-3")
    # the run trained on after the skipped step: finite weights that moved from step 2 to step 4
    weights = {
        d: load_file(tmp_path / d / "model.safetensors")
        for d in (".", "checkpoint-2", "checkpoint-4")}
    assert all(torch.isfinite(v).all() for v in weights["."].values())
    assert any(not torch.equal(weights["checkpoint-2"][k], weights["checkpoint-4"][k])
               for k in weights["."])


def test_too_many_non_finite_steps_in_a_row_stop_with_a_message_keeping_the_last_good_checkpoint(
        tiny, tmp_path):
    """lr 1e30: step 1 is finite and ruins the weights; every later step is NaN."""
    with pytest.raises(SystemExit, match=r"stopped at step 4: 3 steps in a row .*/checkpoint-1\. "):
        finetune.main([
            "--model_name_or_path", tiny["plain"], "--train_file", tiny["train"], "--output_dir",
            str(tmp_path), "--max_steps", "8", "--save_steps", "1", "--warmup_ratio", "0",
            "--learning_rate", "1e30", "--max_bad_steps", "3"])
    # none saved while bad
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_pretrain_stops_after_too_many_non_finite_steps_naming_the_last_good_checkpoint(
        tiny, tmp_path, monkeypatch):
    """From the second step on the SMAE loss is NaN; --max_bad_steps 3 stops at step 4."""
    real_loss, calls = sb.smae_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss
    monkeypatch.setattr(sb, "smae_loss", poisoned)
    with pytest.raises(SystemExit, match=r"stopped at step 4: 3 steps in a row .*/checkpoint-1\. "):
        pretrain.main(
            _script_args("pretrain.py", tiny, "plain", tmp_path, "--max_steps", "8", "--save_steps",
                         "1", "--per_device_train_batch_size", "4", "--max_bad_steps", "3"))
    assert training.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r.get("skipped", False) for r in log] == [False, True, True, True]
    assert [r["skipped_steps"] for r in log] == [0, 1, 2, 3]
    assert not os.path.exists(tmp_path / pretrain.HEADS_FILE)


# ----------------------------------------------------------------------------------------------
# Bad data: each kind of damage has its own message, at load time, before any model is loaded

GOOD = json.dumps({
    "query": "q one", "positive_passages": [{"text": "p one"}],
    "negative_passages": [{"text": "n"}]})


def _write_bytes(path, raw):
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


@pytest.mark.parametrize("name, raw, message", [
    ("truncated.jsonl", (GOOD + "\n" + GOOD[:40]).encode(),
     r"truncated.jsonl:2: the file ends in the middle of this record"),
    ("latin1.jsonl", (GOOD + "\n").encode() + '{"query": "caf\xe9"}\n'.encode("latin-1"),
     r"latin1.jsonl:2: not valid UTF-8"),
    ("empty.jsonl", b"\n  \n", r"empty.jsonl: file is empty"),
    ("array.jsonl", b'["q", "p"]\n', r"array.jsonl:1: a JSON object was expected"),
    ("fields.jsonl", b'{"question": "q", "answer": "a"}\n',
     r"fields.jsonl:1: unknown record layout with fields \['answer', 'question'\]"),
    ("pretty.json", b'[\n {"anchor": "a", "positive": "b"}\n]\n',
     r"pretty.json:1: .*one JSON array over several lines"),
    ("broken.jsonl", (GOOD[:30] + "\n" + GOOD + "\n").encode(), r"broken.jsonl:1: not valid JSON"),
    ("columns.tsv", b"a\tb\tc\td\n", r"columns.tsv:1: 4 columns: expected 2"), ])
def test_each_kind_of_bad_training_file_gets_its_own_error(tmp_path, name, raw, message):
    path = _write_bytes(tmp_path / name, raw)
    with pytest.raises(data.DataError, match=message):
        data.read_training_file(path)


def test_a_gzip_file_cut_short_is_a_data_error(tmp_path):
    raw = gzip.compress(("\n".join([GOOD] * 200) + "\n").encode())
    path = _write_bytes(tmp_path / "train.jsonl.gz", raw[:len(raw) // 2])
    with pytest.raises(data.DataError, match="train.jsonl.gz: damaged or cut-short gzip file"):
        data.read_training_file(path)


def test_skip_bad_lines_goes_on_and_prints_how_many_were_skipped(tmp_path, capsys):
    lines = [GOOD, "{not json", '["a list"]', GOOD, '{"question": "q"}', GOOD[:25]]
    path = _write_bytes(tmp_path / "mixed.jsonl", "\n".join(lines).encode())
    kind, records, _ = finetune.load_training_records(path, None, skip_bad_lines=True)
    assert kind == "contrastive" and len(records) == 2
    assert "skipped 4 bad lines of" in capsys.readouterr().err


def test_a_json_string_with_a_unicode_line_separator_is_one_record(tmp_path):
    record = {"anchor": "first\u2028second", "positive": "para\u2029graph"}
    path = _write_bytes(tmp_path / "seps.jsonl",
                        (json.dumps(record, ensure_ascii=False) + "\n").encode())
    kind, records, skipped = data.read_training_file(path)
    assert records == [{
        "query": "first\u2028second", "positives": ["para\u2029graph"], "negatives": []}]


def test_a_moved_copy_of_the_data_resumes_and_a_path_through_a_file_is_refused(
        tiny, tmp_path, capsys):
    """The run's identity compares the data by content, not by path; --output_dir a_file/sub fails
    before loading."""
    copy = tmp_path / "moved.jsonl"
    copy.write_text(open(tiny["train"]).read())
    finetune.main(_finetune_args(tiny, tmp_path / "run", "--max_steps", "2"))
    capsys.readouterr()
    finetune.main(
        _finetune_args(tiny, tmp_path / "run", "--max_steps", "2", "--train_file", str(copy),
                       "--resume"))
    assert "resuming from" in capsys.readouterr().out
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        finetune.main(_finetune_args(tiny, a_file / "sub"))
    assert "is a file, not a folder" in capsys.readouterr().err


def test_overwrite_never_deletes_the_model_a_run_starts_from(tiny, tmp_path, capsys):
    finetune.main(_finetune_args(tiny, tmp_path, "--max_steps", "1"))
    with pytest.raises(SystemExit):
        finetune.main([
            "--model_name_or_path",
            str(tmp_path / "checkpoint-1"), "--train_file", tiny["train"], "--output_dir",
            str(tmp_path), "--overwrite_output_dir", "--max_steps", "1"])
    assert "holds the model this run starts from" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "checkpoint-1")


def test_a_damaged_checkpoint_with_an_old_marker_falls_back_too(tiny, tmp_path, capsys):
    """A marker from before checksums (sizes only) and a training state that loads but lacks its
    parts."""
    finetune.main(_finetune_args(tiny, tmp_path))
    folder = tmp_path / "checkpoint-3"
    marker = json.load(open(folder / training.MARKER))
    torch.save({"step": 3}, folder / training.TRAINING_STATE)
    marker["files"][training.TRAINING_STATE] = os.path.getsize(folder / training.TRAINING_STATE)
    del marker["sha256"]
    json.dump(marker, open(folder / training.MARKER, "w"))
    capsys.readouterr()
    finetune.main(_finetune_args(tiny, tmp_path, "--resume"))
    out = capsys.readouterr()
    assert "lacks parts of a training state" in out.err and "resuming from" in out.out and \
        "checkpoint-2" in out.out


def test_a_model_retrained_in_place_is_another_run(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny["plain"], model)
    args = _finetune_args(tiny, tmp_path / "run", "--model_name_or_path", str(model), "--max_steps",
                          "2")
    finetune.main(args)
    weights = load_file(model / "model.safetensors")
    # same size, other weights
    save_file({k: v + 1e-3 for k, v in weights.items()}, model / "model.safetensors")
    with pytest.raises(ValueError, match="was written with model_weights="):
        finetune.main(args + ["--resume"])
