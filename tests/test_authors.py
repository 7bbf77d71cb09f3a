"""Our losses against independent transcriptions of the authors' released code
(github.com/ielab/Starbucks at 2a3b24f), written here from their source without calling ours, on
tiny random tensors, to 1e-6."""
import pytest
import torch
import torch.nn.functional as F

import starbucks as sb
from conftest import tiny_bert
from recipe import flops

# their matryoshka_layers / matryoshka_dims, paired by position; H = 8
LAYERS, DIMS = [1, 2, 3], [4, 6, 8]


def _shrink(x, dim):
    """sts/matryoshkaloss_modified.py ForwardDecorator.shrink: truncate to dim, then
    L2-normalise."""
    return F.normalize(x[..., :dim], p=2, dim=-1)


def _mnrl(anchors, *candidates, scale=20.0):
    """sentence-transformers' MultipleNegativesRankingLoss: cos_sim(a, cat(positives, negatives)) *
    20, CE on arange."""
    b = torch.cat(candidates)  # all positives, then all negatives
    scores = F.normalize(anchors, dim=-1) @ F.normalize(b, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(len(anchors)))


def _cosent(a, b, labels, scale=20.0):
    """sentence-transformers' CoSENTLoss, line by line."""
    scores = F.cosine_similarity(a, b) * scale
    scores = scores[:, None] - scores[None, :]
    labels = (labels[:, None] < labels[None, :]).float()
    scores = scores - (1 - labels) * 1e12
    return torch.logsumexp(torch.cat((torch.zeros(1, dtype=scores.dtype), scores.view(-1))), dim=0)


def _released_starbucks(columns, inner, kl_temperature=0.3, kl_div_weight=1.0,
                        last_layer_weight=1.0):
    """sts/starbucks_loss.py StarbucksLoss.forward (lines 102-150): columns[layer] = [pooled (B, H)
    per text column].

    The last layer's loss at its full width, then for every prior layer the inner loss at its paired
    dim and the KL between that layer's and the last layer's concatenated embeddings (every call of
    the forward decorator), both cut to dim, F.kl_div(log_softmax(p), softmax(q), 'batchmean'),
    times kl_temperature * kl_div_weight."""
    last = LAYERS[-1]
    loss = inner(*[_shrink(c, DIMS[-1]) for c in columns[last]]) * last_layer_weight
    final_embeddings = torch.cat(columns[last], dim=0)
    for layer, dim in zip(LAYERS[:-1], DIMS):
        loss = loss + inner(*[_shrink(c, dim) for c in columns[layer]]) * 1  # prior_layers_weight
        p, q = torch.cat(columns[layer], dim=0)[:, :dim], final_embeddings.clone()[:, :dim]
        loss = loss + F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1),
                               reduction="batchmean") * kl_temperature * kl_div_weight
    return loss


def _columns(num_columns, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: [
            torch.randn(batch, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(num_columns)]
        for n in LAYERS}  # float64: the two orders of summation agree far below 1e-6


def test_released_starbucks_loss_with_mnrl_equals_the_authors_allnli_run():
    """Triplets (anchor, entailment, contradiction): ours takes the candidates group-major (p_i,
    n_i), theirs all positives then all negatives; cross-entropy does not care about the order of
    the candidates."""
    columns = _columns(3)
    pairs = list(zip(LAYERS, DIMS))
    q_2d = {(n, d): columns[n][0][:, :d] for n, d in pairs}
    p_2d = {(n, d): torch.stack([columns[n][1], columns[n][2]], dim=1).reshape(-1, 8)[:, :d]
            for n, d in pairs}
    ours = sb.srl_loss_embedding_kl(q_2d, p_2d, pairs, temperature=0.05, kl_weight=0.3,
                                    similarity="cos")
    theirs = _released_starbucks(columns, _mnrl)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    grads = torch.autograd.grad(ours, columns[LAYERS[-1]][0]), torch.autograd.grad(
        theirs, columns[LAYERS[-1]][0])
    torch.testing.assert_close(*grads, atol=1e-6, rtol=0)  # the teacher is not detached in either


def test_released_starbucks_loss_with_cosent_equals_the_authors_low_resource_run():
    columns, gold = _columns(2, seed=1), torch.tensor([0.1, 0.9, 0.5, 0.3], dtype=torch.float64)
    pairs = list(zip(LAYERS, DIMS))
    a_2d = {(n, d): columns[n][0][:, :d] for n, d in pairs}
    b_2d = {(n, d): columns[n][1][:, :d] for n, d in pairs}
    ours = sb.released_starbucks_loss(lambda a, b: sb.cosent_loss(a, b, gold), a_2d, b_2d, pairs,
                                      0.3)
    theirs = _released_starbucks(columns, lambda a, b: _cosent(a, b, gold))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_separate_models_count_only_the_layers_that_run():
    """Eq. 15 for --method separate (Eq. 7): a model trained at layer n runs layers 1..n only, so N
    counts the embeddings and those n blocks (a hand count), not the blocks above n that never
    run."""
    model = tiny_bert(num_layers=4, hidden=32)
    blocks = sb.transformer_layers(model)
    embeddings = sum(p.numel() for p in model.embeddings.parameters())
    per_block = sum(p.numel() for p in blocks[0].parameters())
    assert flops.parameters_run(model, 2) == embeddings + 2 * per_block
    # all blocks; the pooler never runs
    assert flops.parameters_run(model, 4) == embeddings + 4 * per_block


def test_retrieval_2dmse_equals_the_authors_sub_model_sampling():
    """retrieval/modeling.py forward (lines 101-146) with sub_model_sampling: one sampled prior
    layer plus the last, every dim of each (the full pair once), CE and the detached score KL at
    each, summed."""
    g = torch.Generator().manual_seed(3)
    L, B, G, H = 3, 4, 2, 8
    # their [num_layers, batch, hidden]
    q_reps = torch.randn(L, B, H, generator=g, dtype=torch.float64)
    p_reps = torch.randn(L, B * G, H, generator=g, dtype=torch.float64)
    temperature, kl_weight, dims = 0.5, 1.0, [4, 6, 8]
    # ours draws the layer with the step's generator
    sampled_draw = torch.Generator().manual_seed(11)
    layer_idx = int(torch.randint(L - 1, (1,), generator=torch.Generator().manual_seed(11)))

    target = torch.arange(B) * (p_reps.size(1) // q_reps.size(1))
    all_scores = torch.einsum("lqh,ldh -> lqdh", q_reps, p_reps)
    full_layer_scores = all_scores[L - 1].sum(dim=-1)
    total = F.cross_entropy(full_layer_scores / temperature, target)
    target_scores = full_layer_scores.detach()
    for layer, dim in [(layer, dim) for layer in (layer_idx, L - 1) for dim in dims]:
        if layer == L - 1 and dim == H:
            continue
        layer_scores = all_scores[layer, :, :, :dim].sum(dim=-1)
        total = total + F.cross_entropy(layer_scores / temperature, target)
        total = total + kl_weight * F.kl_div(F.log_softmax(layer_scores / temperature, dim=1),
                                             F.softmax(target_scores / temperature, dim=1),
                                             reduction="batchmean")
    ours = sb.matryoshka_2d_retrieval_loss({n + 1: q_reps[n] for n in range(L)}, {
        n + 1: p_reps[n] for n in range(L)}, dims, sampled_draw, temperature, "dot", kl_weight)
    assert ours.item() == pytest.approx(total.item(), abs=1e-6)


def test_mlm_2d_equals_the_authors_2d_masked_lm():
    """smae/modeling.py BertFor2DMatryoshkaMaskedLM.forward (lines 72-81) with its sliced head
    decorator (lines 14-27): mean over pairs of the cross-entropy of cls(hidden_states[layer][:, :,
    :dim]), -100 ignored."""
    encoder = tiny_bert(num_layers=4, hidden=32)
    heads = sb.SMAEHeads(encoder)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1000, 2000, (2, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = torch.randint(1000, 2000, (2, 3), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        # 0: embeddings
        hidden = encoder(input_ids=ids, attention_mask=mask,
                         output_hidden_states=True).hidden_states
        total = 0
        for layer, dim in [(2, 16), (4, 32)]:
            h = hidden[layer][:, :, :dim]
            z = F.linear(h, heads.transform.dense.weight[:, :dim], heads.transform.dense.bias)
            z = heads.transform.LayerNorm(heads.transform.transform_act_fn(z))
            scores = z @ encoder.embeddings.word_embeddings.weight.T + heads.bias
            total = total + F.cross_entropy(scores.view(-1, scores.shape[-1]), labels.view(-1))
        total = total / 2
        ours = sb.mlm_2d_loss(encoder, heads, ids, mask, labels, [(2, 16), (4, 32)])
    assert ours.item() == pytest.approx(total.item(), abs=1e-5)
