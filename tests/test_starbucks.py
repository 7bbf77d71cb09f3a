"""starbucks.py: each equation checked against a hand computation or an independent one."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
import starbucks as sb
from conftest import tiny_bert
from recipe import decoder


def batch(B=3, T=7, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # one padded row
    ids[1, 4:] = 0
    return ids, mask


# ---- pairs -------------------------------------------------------------------------------------

def test_default_pairs_bert_base_is_the_papers_grid():
    """The paper's six pairs for BERT-base, written out here (README, Eq. 1), not read from the
    constant."""
    assert sb.default_pairs(12, 768) == [(2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768)]


def test_default_pairs_minilm_keeps_the_shape():
    assert sb.default_pairs(6, 384) == [(1, 12), (2, 24), (3, 48), (4, 96), (5, 192), (6, 384)]


def test_default_pairs_other_backbones_end_at_the_full_model():
    pairs = sb.default_pairs(30, 576)
    assert pairs == [(5, 18), (10, 36), (15, 72), (20, 144), (25, 288), (30, 576)]
    small = sb.default_pairs(2, 32)
    assert small[-1] == (2, 32) and small == sorted(set(small))


@pytest.mark.parametrize("pairs, message", [
    ([(7, 32)], "layer 7 is outside"),
    ([(0, 32)], "layer 0 is outside"),
    ([(2, 800)], "dim 800 is outside"),
    ([(2, 0)], "dim 0 is outside"),
    ([(4, 64), (2, 32)], "sorted"),
    ([(2, 32), (2, 32)], "duplicate"),
    ([], "empty"),
    ([(2.0, 32)], "two integers"),
    ([(2, 32, 1)], "two integers"), ])
def test_check_pairs_rejects_bad_pairs(pairs, message):
    with pytest.raises(ValueError, match=message):
        sb.check_pairs(pairs, 6, 384)


def test_parse_pairs():
    assert sb.parse_pairs("2x32,4x64") == [(2, 32), (4, 64)]
    assert sb.parse_pairs("2x32 4x64") == [(2, 32), (4, 64)]
    with pytest.raises(ValueError, match="LAYERxDIM"):
        sb.parse_pairs("2:32")


# ---- pooling and Eq. 1 -------------------------------------------------------------------------

def test_pool_hand_values():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)  # (B=2, T=3, H=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(sb.pool(hidden, mask, "cls"), torch.tensor([[0., 1.], [6., 7.]]))
    # mean over REAL tokens: row 0 averages tokens 0 and 1 only
    assert torch.allclose(sb.pool(hidden, mask, "mean"), torch.tensor([[1., 2.], [8., 9.]]))
    assert torch.equal(sb.pool(hidden, mask, "last"), torch.tensor([[2., 3.], [10., 11.]]))
    # left padding: the last real token is the last position
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(sb.pool(hidden, left, "last"), torch.tensor([[4., 5.], [10., 11.]]))
    with pytest.raises(ValueError, match="unknown pooling"):
        sb.pool(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_embed_2d_equals_pooling_the_models_own_hidden_states(pooling):
    model = tiny_bert()
    ids, mask = batch()
    pairs = [(1, 8), (2, 16), (3, 24), (4, 32)]
    with torch.no_grad():
        out = sb.embed_2d(model, ids, mask, pairs, pooling)
        reference = model(input_ids=ids, attention_mask=mask,
                          output_hidden_states=True).hidden_states
    for n, d in pairs:
        assert out[(n, d)].shape == (3, d)
        assert torch.allclose(out[(n, d)], sb.pool(reference[n], mask, pooling)[:, :d], atol=1e-6)


def test_embed_2d_runs_no_layer_above_the_largest_pair():
    model = tiny_bert()
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i + 1))
               for i, layer in enumerate(model.encoder.layer)]
    ids, mask = batch()
    sb.embed_2d(model, ids, mask, [(1, 8), (2, 16)])
    for h in handles:
        h.remove()
    assert calls == [1, 2]


def test_embed_2d_leaves_the_model_as_it_was():
    model = tiny_bert()
    fresh = copy.deepcopy(model)
    ids, mask = batch()
    sb.embed_2d(model, ids, mask, [(1, 8), (2, 16)])  # early exit at layer 2 of 4
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        expected = fresh(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(after.hidden_states) == len(expected.hidden_states) == 5
    for a, b in zip(after.hidden_states, expected.hidden_states):
        assert torch.equal(a, b)
    for ours, theirs in zip(model.encoder.layer, fresh.encoder.layer):  # none of our hooks is left
        assert len(ours._forward_hooks) == len(theirs._forward_hooks)


def test_embed_2d_normalize_after_truncation():
    model = tiny_bert()
    ids, mask = batch()
    out = sb.embed_2d(model, ids, mask, [(2, 8), (4, 32)], "mean", normalize=True)
    raw = sb.embed_2d(model, ids, mask, [(2, 8), (4, 32)], "mean")
    for pair in out:
        assert torch.allclose(out[pair].norm(dim=-1), torch.ones(3), atol=1e-6)
        assert torch.allclose(out[pair], F.normalize(raw[pair], dim=-1), atol=1e-6)


def test_transformer_layers_and_final_norm():
    model = tiny_bert()
    assert sb.transformer_layers(model) is model.encoder.layer
    assert sb.final_norm(model) is None  # BERT is post-LN
    with pytest.raises(ValueError, match="cannot find"):
        sb.transformer_layers(torch.nn.Linear(2, 2))


def test_layer_hidden_states_applies_final_norm_of_pre_ln_backbones():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    model = LlamaModel(
        LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = sb.layer_hidden_states(model, ids, mask, [1, 3])
        reference = model(input_ids=ids, attention_mask=mask,
                          output_hidden_states=True).hidden_states
    # HF's last hidden state is already normed
    assert torch.allclose(hidden[3], reference[3], atol=1e-5)
    assert torch.allclose(hidden[1], model.norm(reference[1]), atol=1e-5)


# ---- Eq. 2-5 -----------------------------------------------------------------------------------

def test_similarity_scores_hand_values():
    q = torch.tensor([[1., 0.], [1., 1.]])
    p = torch.tensor([[2., 0.], [0., 3.], [1., 1.], [0., 1.]])
    assert torch.equal(sb.similarity_scores(q, p), torch.tensor([[2., 0., 1., 0.], [2., 3., 2.,
                                                                                    1.]]))
    cos = sb.similarity_scores(q, p, 0.5, "cos")
    assert torch.allclose(cos[1, 2], torch.tensor(2.0))  # cos = 1, / 0.5
    assert torch.allclose(cos[0, 2], torch.tensor(math.sqrt(0.5) / 0.5))
    with pytest.raises(ValueError, match="unknown similarity"):
        sb.similarity_scores(q, p, similarity="l2")


def test_positive_index_and_group_check():
    assert sb.positive_index(3, 12).tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match="do not split"):
        sb.positive_index(3, 10)


def test_contrastive_loss_equals_hand_softmax():
    torch.manual_seed(0)
    q, p = torch.randn(3, 5), torch.randn(6, 5)  # G = 2
    s = (q @ p.T / 0.5).numpy()
    expected = -np.mean([s[i, 2 * i] - np.log(np.exp(s[i]).sum()) for i in range(3)])
    assert sb.contrastive_loss(q, p, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_symmetric_contrastive_loss_averages_both_directions():
    torch.manual_seed(0)
    q, p = torch.randn(3, 5), torch.randn(6, 5)  # G = 2: positives are p[0], p[2], p[4]
    s = (q @ p.T / 0.5).numpy()
    q_to_p = -np.mean([s[i, 2 * i] - np.log(np.exp(s[i]).sum()) for i in range(3)])
    # positive i vs all queries
    p_to_q = -np.mean([s[i, 2 * i] - np.log(np.exp(s[:, 2 * i]).sum()) for i in range(3)])
    loss = decoder.symmetric_contrastive_loss(q, p, temperature=0.5, similarity="dot")
    assert loss.item() == pytest.approx((q_to_p + p_to_q) / 2, rel=1e-5)
    p1 = p[::2]  # G = 1: swapping queries and passages gives the same loss
    assert decoder.symmetric_contrastive_loss(p1, q, 0.5, "dot").item() == pytest.approx(
        decoder.symmetric_contrastive_loss(q, p1, 0.5, "dot").item(), rel=1e-6)


def test_kl_loss_matches_definition_and_sends_no_gradient_to_teacher():
    torch.manual_seed(0)
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    loss = sb.kl_loss(student, teacher)
    pt, ps = F.softmax(teacher, -1), F.softmax(student, -1)
    expected = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert sb.kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def two_d(q, pairs):
    return {(n, d): q[n][:, :d] for n, d in pairs}


def test_single_pair_srl_is_contrastive():
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(12, 8)
    pairs = [(2, 8)]
    assert torch.allclose(sb.srl_loss({pairs[0]: q}, {pairs[0]: p}, pairs, 0.05, 1.0, "cos"),
                          sb.contrastive_loss(q, p, 0.05, "cos"))


def test_srl_loss_is_mean_ce_plus_weighted_kl_to_the_detached_last_pair():
    torch.manual_seed(0)
    layers = {1: torch.randn(4, 8, requires_grad=True), 2: torch.randn(4, 8, requires_grad=True)}
    passages = {1: torch.randn(8, 8), 2: torch.randn(8, 8)}
    pairs = [(1, 4), (2, 8)]
    q2d, p2d = two_d(layers, pairs), two_d(passages, pairs)
    loss = sb.srl_loss(q2d, p2d, pairs, kl_weight=0.5)
    ce = [sb.contrastive_loss(q2d[x], p2d[x]) for x in pairs]
    kl = sb.kl_loss(sb.similarity_scores(q2d[(1, 4)], p2d[(1, 4)]),
                    sb.similarity_scores(q2d[(2, 8)], p2d[(2, 8)]))
    assert loss.item() == pytest.approx(((ce[0] + ce[1] + 0.5 * kl) / 2).item(), rel=1e-6)
    loss.backward()
    # the teacher's gradient comes from its own CE only (the KL target is detached)
    teacher_only = torch.autograd.grad(ce[1] / 2, layers[2])[0]
    assert torch.allclose(layers[2].grad, teacher_only, atol=1e-6)


def test_embedding_kl_is_not_detached_and_matches_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    loss = sb.embedding_kl_loss(student, teacher, temperature=0.3)
    pt, ps = F.softmax(teacher[:, :4] / 0.3, -1), F.softmax(student / 0.3, -1)
    assert loss.item() == pytest.approx((pt * (pt.log() - ps.log())).sum(-1).mean().item(),
                                        rel=1e-5)
    loss.backward()
    assert teacher.grad is not None and teacher.grad[:, :4].abs().sum() > 0


def test_srl_embedding_kl_single_pair_is_contrastive_and_adds_weighted_kl():
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(8, 8)
    assert torch.allclose(sb.srl_loss_embedding_kl({(1, 8): q}, {(1, 8): p}, [(1, 8)]),
                          sb.contrastive_loss(q, p, 1.0, "cos"))
    pairs = [(1, 4), (2, 8)]
    q2d, p2d = {(1, 4): q[:, :4], (2, 8): q}, {(1, 4): p[:, :4], (2, 8): p}
    # the released StarbucksLoss: a sum over pairs; the KL over every text (anchors and passages) of
    # the batch
    expected = (sb.contrastive_loss(q[:, :4], p[:, :4], 1.0, "cos")
                + 0.3 * sb.embedding_kl_loss(torch.cat([q, p])[:, :4], torch.cat([q, p]))
                + sb.contrastive_loss(q, p, 1.0, "cos"))
    assert torch.allclose(sb.srl_loss_embedding_kl(q2d, p2d, pairs), expected)


# ---- baselines (Eq. 6, 8, 9) and CoSENT --------------------------------------------------------

def test_full_loss_is_contrastive_of_the_last_pair():
    torch.manual_seed(0)
    q, p = torch.randn(2, 8), torch.randn(4, 8)
    pairs = [(1, 4), (2, 8)]
    assert torch.equal(
        sb.full_loss({(1, 4): q[:, :4], (2, 8): q}, {(1, 4): p[:, :4], (2, 8): p}, pairs),
        sb.contrastive_loss(q, p))


def test_matryoshka_loss_sums_truncated_contrastive_losses():
    torch.manual_seed(0)
    q, p = torch.randn(3, 8), torch.randn(6, 8)
    expected = sum(sb.contrastive_loss(q[:, :d], p[:, :d]) for d in (2, 4, 8))
    assert torch.allclose(sb.matryoshka_loss(q, p, [2, 4, 8]), expected)


def test_matryoshka_2d_loss_samples_one_size_and_is_reproducible():
    torch.manual_seed(0)
    q = {n: torch.randn(3, 8) for n in (1, 2, 3)}
    p = {n: torch.randn(6, 8) for n in (1, 2, 3)}
    dims = [2, 4, 8]
    loss = sb.matryoshka_2d_loss(q, p, dims, torch.Generator().manual_seed(7))
    again = sb.matryoshka_2d_loss(q, p, dims, torch.Generator().manual_seed(7))
    assert torch.equal(loss, again)
    g = torch.Generator().manual_seed(7)  # replay the same draws independently
    d_a = dims[int(torch.randint(3, (1,), generator=g))]
    n = [1, 2][int(torch.randint(2, (1,), generator=g))]
    d_b = dims[int(torch.randint(3, (1,), generator=g))]
    ce = sb.contrastive_loss(q[3][:, :d_a], p[3][:, :d_a], 1.0, "cos") \
        + sb.contrastive_loss(q[n][:, :d_b], p[n][:, :d_b], 1.0, "cos") / n
    # every text of the batch, as the library's decorator
    pt = F.softmax(torch.cat([q[3], p[3]]) / 0.3, -1)
    ps = F.softmax(torch.cat([q[n], p[n]]) / 0.3, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert loss.item() == pytest.approx((ce + 0.3 * kl).item(), rel=1e-5)
    draws = {
        sb.matryoshka_2d_loss(q, p, dims,
                              torch.Generator().manual_seed(s)).item() for s in range(20)}
    assert len(draws) > 3  # sizes really are sampled


def test_cosent_loss_hand_value():
    a = torch.tensor([[1., 0.], [1., 0.], [1., 0.]])
    b = torch.tensor([[1., 0.], [0., 1.], [1., 1.]])  # cos = 1, 0, 0.7071
    gold = torch.tensor([3.0, 1.0, 2.0])
    cos = torch.tensor([1.0, 0.0, math.sqrt(0.5)]) * 20
    # pairs (i, j) with gold_i > gold_j: (0,1), (0,2), (2,1)
    terms = torch.stack([cos[1] - cos[0], cos[2] - cos[0], cos[1] - cos[2]])
    expected = torch.log(1 + terms.exp().sum())
    assert sb.cosent_loss(a, b, gold).item() == pytest.approx(expected.item(), rel=1e-5)
    # no ordered pair: log(1)
    assert sb.cosent_loss(a, b, torch.ones(3)).item() == pytest.approx(0.0)


def test_srl_cosent_single_pair_is_cosent():
    torch.manual_seed(0)
    a, b, gold = torch.randn(5, 8), torch.randn(5, 8), torch.rand(5)
    assert torch.allclose(sb.srl_cosent_loss({(1, 8): a}, {(1, 8): b}, gold, [(1, 8)]),
                          sb.cosent_loss(a, b, gold))


# ---- encode_2d ---------------------------------------------------------------------------------

def test_encode_2d_equals_embed_2d_in_input_order(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer
    model, tok = AutoModel.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir)
    texts = [
        "a much longer sentence about coffee and beans", "short one", "the third text here", "x"]
    pairs = [(2, 16), (4, 32)]
    out = models.encode_2d(model, tok, texts, pairs, "mean", batch_size=2)
    for i, text in enumerate(texts):
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            one = sb.embed_2d(model, enc["input_ids"], enc["attention_mask"], pairs, "mean")
        for pair in pairs:
            assert torch.allclose(out[pair][i], one[pair][0], atol=1e-5)
    assert models.encode_2d(model, tok, [], pairs)[(2, 16)].shape == (0, 16)
    with torch.no_grad():
        # layer 4 broken, layer 2 still fine
        model.encoder.layer[3].output.dense.bias[0] = float("nan")
    assert torch.isfinite(models.encode_2d(model, tok, texts, [(2, 16)], "mean")[(2, 16)]).all()
    with pytest.raises(ValueError, match="4x32 embeddings are not finite"):
        models.encode_2d(model, tok, texts, pairs, "mean", batch_size=2)
