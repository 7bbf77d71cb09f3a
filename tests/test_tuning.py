"""recipe/tuning.py: LoRA (Eq. 16) is exact, each method trains exactly what it claims, FLOPs (Eq.
15) by hand."""
import json

import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaModel

import finetune
import starbucks as sb
from conftest import save_with_vocab, tiny_bert
from recipe import flops, tuning

# tiny Llama: H = 32, 4 query heads and 2 key/value heads of 8, MLP 64, vocab 30522 (BERT's, for its
# tokenizer)
L, H, I, V, KV = 3, 32, 64, 30522, 16


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaModel(config).eval()


def inputs(seed=1, batch=4, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # one padded text
    return ids, mask


def embedding(model, ids, mask):
    return sb.embed_2d(model, ids, mask, [(L, H)], "mean")[(L, H)]  # (B, H)


def changed_after_one_step(model):
    """Names of the tensors that one AdamW step (no weight decay) on a contrastive loss changes."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.0)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    q_ids, q_mask = inputs(seed=1)
    p_ids, p_mask = inputs(seed=2)
    q = sb.embed_2d(model, q_ids, q_mask, [(n_layers, hidden)], "mean")[(n_layers, hidden)]
    p = sb.embed_2d(model, p_ids, p_mask, [(n_layers, hidden)], "mean")[(n_layers, hidden)]
    sb.contrastive_loss(q, p, 0.05, "cos").backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


# ----------------------------------------------------------------------------------------------
# LoRA (Eq. 16)

def per_layer_lora(r, names):
    """r (in + out) of each named projection of one tiny-Llama block, counted from the shapes."""
    shapes = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
              "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    return sum(r * sum(shapes[n]) for n in names)


@pytest.mark.parametrize("targets", [tuning.ALL_LINEAR, ["q_proj", "v_proj"]])
def test_lora_trainable_parameter_count_is_exact(targets):
    model = tiny_llama()
    n_before = sum(p.numel() for p in model.parameters())
    tuning.add_lora(model, r=4, alpha=8, target_modules=targets)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if targets == tuning.ALL_LINEAR else targets
    assert tuning.parameter_counts(model) == (n_before, L * per_layer_lora(4, names))
    trainable = {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_lora_starts_as_the_base_model_and_merges_exactly(tmp_path):
    model, ids_mask = tiny_llama(), inputs()
    with torch.no_grad():
        base = embedding(model, *ids_mask)
        tuning.add_lora(model, r=4, alpha=8)
        # B = 0 at the start
        torch.testing.assert_close(embedding(model, *ids_mask), base, rtol=0, atol=0)
        for m in model.modules():
            if isinstance(m, tuning.LoRALinear):
                m.lora_B.normal_()  # as if trained
        lora_out = embedding(model, *ids_mask)
        q = model.layers[1].self_attn.q_proj
        expected_weight = q.base.weight + 2.0 * q.lora_B @ q.lora_A  # W_0 + (alpha / r) B A
    merged = tuning.merged_copy(model)
    assert merged is not model and not any(
        isinstance(m, tuning.LoRALinear) for m in merged.modules())
    # training goes on unmerged
    assert any(isinstance(m, tuning.LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged.layers[1].self_attn.q_proj.weight, expected_weight, rtol=0,
                               atol=0)
    with torch.no_grad():
        torch.testing.assert_close(embedding(merged, *ids_mask), lora_out, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lora_out, base, atol=1e-3)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(embedding(reloaded, *ids_mask), lora_out, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_its_adapters():
    model = tiny_llama()
    tuning.add_lora(model, r=2, alpha=2, target_modules=["q_proj", "down_proj"])
    changed = changed_after_one_step(model)
    # step 1 moves B only: A's gradient is B^T (...) and B starts at zero
    assert changed == {
        f"layers.{i}.{m}.lora_B" for i in range(L) for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_lora_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="no Linear layer .* named .*this model's are"):
        tuning.add_lora(tiny_llama(), 4, 4, ["query"])


# ----------------------------------------------------------------------------------------------
# Bias-only and block freezing: the tensors that change after one step

def test_bias_only_trains_exactly_the_biases():
    model = tiny_bert()
    claimed = set(tuning.train_biases_only(model))
    assert claimed == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    changed = changed_after_one_step(model)
    # the pooler is not in the loss
    assert changed == {n for n in claimed if not n.startswith("pooler.")}


def test_bias_only_on_a_model_without_biases_is_a_clear_error():
    with pytest.raises(ValueError, match="no bias parameters"):
        tuning.train_biases_only(tiny_llama())


@pytest.mark.parametrize("k", [1, 2])
def test_freeze_trains_exactly_the_last_k_blocks_and_final_norm(k):
    model = tiny_llama()
    tuning.apply_tuning(model, f"freeze:{k}")
    expected = {n for n, _ in model.named_parameters()
                if n == "norm.weight" or any(n.startswith(f"layers.{i}.") for i in range(L - k, L))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert changed_after_one_step(model) == expected


def test_full_trains_every_block():
    model = tiny_llama()
    tuning.apply_tuning(model, "full")
    changed = changed_after_one_step(model)
    assert changed == {n for n, _ in model.named_parameters()}


def test_bad_tuning_values_are_clear_errors():
    for text in ("freeze", "freeze:0", "freeze:x", "lora:2", "prefix"):
        with pytest.raises(ValueError, match="cannot read --tuning"):
            tuning.parse_tuning(text)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        tuning.apply_tuning(tiny_llama(), "freeze:4")
    assert tuning.parse_tuning("freeze:2") == ("freeze", 2)


# ----------------------------------------------------------------------------------------------
# FLOPs (Eq. 15)

def hand_count_llama():
    """Every parameter of the tiny Llama from its shapes: embeddings, blocks, final norm."""
    attention = H * H + H * KV + H * KV + H * H
    mlp = 3 * H * I
    block = attention + mlp + 2 * H  # two RMSNorm weights
    return V * H + L * block + H, block


def test_flops_per_token_equal_a_hand_count():
    n, block = hand_count_llama()
    for spec, expected in [
        ("full", 6 * n),
        ("lora", 4 * n + 2 * L * per_layer_lora(
            32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
        ("freeze:1", 2 * n + 4 * (block + H)), ("freeze:3", 2 * n + 4 * (3 * block + H))]:
        model = tuning.apply_tuning(tiny_llama(), spec)
        counts = tuning.parameter_counts(model)
        assert counts[0] == n
        assert flops.flops_per_token(tuning.parse_tuning(spec)[0], *counts) == expected, spec
    # intermediate 64, vocab 30522
    bert = tuning.apply_tuning(tiny_bert(num_layers=4, hidden=32), "bias")
    # per layer: q k v o, MLP in and out, two LayerNorms
    biases = 4 * (4 * 32 + 64 + 32 + 2 * 32) + 32 + 32
    n_bert, trainable = tuning.parameter_counts(bert)
    assert trainable == biases
    assert flops.flops_per_token("bias", n_bert, trainable) == 4 * n_bert + 2 * biases


def test_steps_for_budget():
    assert flops.steps_for_budget(1000.0, 10, 9) == 11
    with pytest.raises(ValueError, match="less than one step"):
        flops.steps_for_budget(50.0, 10, 9)


# ----------------------------------------------------------------------------------------------
# finetune.py --tuning and --flops_budget

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, vocab_path):
    return save_with_vocab(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), vocab_path)


def test_finetune_lora_with_a_flops_budget_saves_merged_weights_and_its_accounting(
        tmp_path, tiny_llama_dir, capsys):
    base = AutoModel.from_pretrained(tiny_llama_dir)
    n = sum(p.numel() for p in base.parameters())
    trainable = L * per_layer_lora(4, ["q_proj", "v_proj"])
    budget = 3.5 * (4 * n + 2 * trainable) * 200
    finetune.main([
        "--model_name_or_path", tiny_llama_dir, "--output_dir",
        str(tmp_path), "--method", "full", "--pooling", "last", "--tuning", "lora", "--lora_r", "4",
        "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj", "--flops-budget",
        str(budget), "--per_device_train_batch_size", "2", "--train_group_size", "2",
        "--query_max_len", "8", "--passage_max_len", "16", "--learning_rate", "1e-2",
        "--save_steps", "0"])
    saved = json.load(open(tmp_path / "starbucks_config.json"))["flops"]
    assert (saved["N"], saved["N_trainable"]) == (n, trainable)
    assert saved["flops_per_token"] == 4 * n + 2 * trainable
    assert saved["budget_steps"] == int(budget //
                                        (saved["flops_per_token"] * saved["tokens_per_step"]))
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert len(log) == saved["budget_steps"] == saved["steps"]
    assert saved["tokens_seen"] == sum(r["tokens"] for r in log)
    assert "FLOPs (README Eq. 15, tuning lora)" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path)  # merged: plain Linear weights, no adapters
    state = model.state_dict()
    assert set(state) == set(base.state_dict())
    changed = {k for k in state if not torch.equal(state[k], base.state_dict()[k])}
    assert changed == {
        f"layers.{i}.self_attn.{m}.weight" for i in range(L) for m in ("q_proj", "v_proj")}


def test_a_flops_budget_on_scored_pairs_counts_the_tokens_its_steps_read(tmp_path,
                                                                       tiny_model_dir):
    """Scored pairs read both sides at --passage_max_len; the planned tokens per step are those
    the loop logs, so the budget is not overspent."""
    words = "the river bank was full of water after the long rain in the hills".split()
    with open(tmp_path / "sts.tsv", "w") as f:
        for i in range(32):  # both sides longer than --query_max_len 8
            f.write(f"{' '.join(words[i % 5:] * 2)}\t{' '.join(words[:12 - i % 4] * 2)}\t{i % 5}\n")
    budget = 1e10  # about 11 steps: more than the 8 whose tokens are planned
    finetune.main(["--model_name_or_path", tiny_model_dir,
                   "--train_file", str(tmp_path / "sts.tsv"), "--output_dir", str(tmp_path / "out"),
                   "--method", "full", "--tuning", "bias",
                   "--flops_budget", str(budget), "--per_device_train_batch_size", "4",
                   "--query_max_len", "8", "--passage_max_len", "64", "--save_steps", "0"])
    saved = json.load(open(tmp_path / "out" / "starbucks_config.json"))["flops"]
    log = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    assert len(log) > 8 and saved["tokens_per_step"] == pytest.approx(
        sum(r["tokens"] for r in log[:8]) / 8)
