"""Starbucks: 2D Matryoshka embeddings, the math in one file.

References
- Zhuang, Wang, Koopman, Zuccon. "Starbucks: Improved Training for 2D Matryoshka Embeddings",
  arXiv 2410.13230 (v3). Authors' code: github.com/ielab/Starbucks (retrieval/modeling.py,
  sts/starbucks_loss.py, smae/modeling.py).
- Kusupati et al. "Matryoshka Representation Learning", NeurIPS 2022 (1D MRL, Eq. 8).
- Li et al. "2D Matryoshka Sentence Embeddings" (2DMSE) and sentence-transformers' Matryoshka2dLoss
  (Eq. 9, the random-sampling baseline).
- Su, "CoSENT" (the loss the paper uses for the low-resource STS-B variant).
- Ziarko, Jiang, Miłoś et al. "Repurposing Language Models into Embedding Models: Finding the
  Compute-Optimal Recipe", arXiv 2406.04165 (symmetric InfoNCE, Eq. 17, is in
  recipe/decoder.py, its FLOP accounting in recipe/flops.py and its tuning methods in
  recipe/tuning.py).

Equation numbers (Eq. 1, Eq. 2, ...) are those of the README's "Equations" section. Every function
here is pure: tensors and a model in, tensors out; no files, no argparse, no global state.

Shapes: B queries, G passages per query (1 positive then G-1 hard negatives), T tokens, H hidden
size, L layers, d a sub-dimension, n a sub-layer (1-based: n = 1 is the first transformer layer).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

# The paper's six layer-dim pairs for a 12 x 768 encoder (BERT-base), small to large.
STARBUCKS_PAIRS = [(2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768)]


# ----------------------------------------------------------------------------------------------
# Layer-dim pairs

def default_pairs(num_layers, hidden_size):
    """The paper's grid shape for any backbone: layers L/6, 2L/6, ..., L and dims H/32, ..., H.

    For 12 x 768 this returns STARBUCKS_PAIRS (the paper's dims 32..512 are not H/32-multiples).
    """
    if (num_layers, hidden_size) == (12, 768):
        return list(STARBUCKS_PAIRS)
    pairs = []
    for k in range(1, 7):
        n = max(1, round(num_layers * k / 6))
        d = max(1, hidden_size * 2 ** (k - 1) // 32)
        if not pairs or (n, d) != pairs[-1]:
            pairs.append((n, d))
    pairs[-1] = (num_layers, hidden_size)  # the full model is always the last (teacher) pair
    return check_pairs(pairs, num_layers, hidden_size)


def check_pairs(pairs, num_layers, hidden_size):
    """Validate user pairs: integers, inside the model, sorted small to large, no duplicates."""
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("pairs is empty: give at least one (layer, dim) pair")
    for p in pairs:
        if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
            raise ValueError(f"pair {p!r} is not two integers (layer, dim)")
        n, d = p
        if not 1 <= n <= num_layers:
            raise ValueError(
                f"pair {p}: layer {n} is outside 1..{num_layers} (the model has {num_layers} "
                "layers)"
            )
        if not 1 <= d <= hidden_size:
            raise ValueError(
                f"pair {p}: dim {d} is outside 1..{hidden_size} (the model's hidden size)")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"duplicate pairs in {pairs}")
    if pairs != sorted(pairs):
        raise ValueError(f"pairs must be sorted small to large (the last is the teacher): {pairs}")
    return pairs


def parse_pairs(text):
    """'2x32,4x64' -> [(2, 32), (4, 64)] (unvalidated; see check_pairs)."""
    pairs = []
    for item in text.replace(",", " ").split():
        layer, _, dim = item.partition("x")
        if not (layer.isdigit() and dim.isdigit()):
            raise ValueError(f"cannot read pair {item!r}: write pairs as LAYERxDIM, e.g. 2x32,4x64")
        pairs.append((int(layer), int(dim)))
    return pairs


@dataclass
class StarbucksConfig:
    """How a checkpoint embeds and compares texts; saved beside it as starbucks_config.json."""
    pairs: list  # [(n, d), ...] small to large; the last is the full model (teacher)
    pooling: str = "cls"  # 'cls' (retrieval), 'mean' (STS, decoders), 'last' (decoders)
    similarity: str = "dot"  # 'dot' (retrieval, tau = 1) or 'cos' (STS, tau = 0.05)
    temperature: float = 1.0


# ----------------------------------------------------------------------------------------------
# 2D embeddings from one forward pass (Eq. 1)

def transformer_layers(model):
    """The model's list of transformer blocks (BERT/MPNet:
    encoder.layer, Llama: layers, GPT-2: h)."""
    for path in ("encoder.layer", "layers", "h", "gpt_neox.layers", "transformer.h",
                 "model.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


def final_norm(model):
    """The final norm of a pre-LN backbone (applied to every
    sub-layer), or None for post-LN BERT."""
    for name in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class _StopForward(Exception):
    """Raised by a forward hook once the largest requested layer has run."""


def layer_hidden_states(model, input_ids, attention_mask, layers):
    """Hidden states {n: (B, T, H)} of the requested layers; layers above max(layers) never run.

    Forward hooks record the blocks' outputs and stop the pass after the largest layer; they are
    removed afterwards, so the model is left exactly as it was (no swapped layer lists, no patches).
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    blocks = transformer_layers(inner)
    layers = sorted(set(layers))
    last = layers[-1]
    # A forward that raises out of DDP skips its gradient-sync
    # setup, so under DDP it always finishes.
    stop = last < len(blocks) and inner is model
    hidden = {}

    def record(n):
        def hook(module, inputs, output):
            hidden[n] = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            if stop and n == last:
                raise _StopForward
        return hook

    handles = [blocks[n - 1].register_forward_hook(record(n)) for n in layers]
    extra = {"use_cache": False} if getattr(inner.config, "use_cache", None) is not None else {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    norm = final_norm(inner)
    if norm is not None:  # pre-LN: intermediate layers are un-normalised, so apply the final norm
        hidden = {n: norm(h) for n, h in hidden.items()}
    return hidden


def pool(hidden, attention_mask, pooling):
    """Sentence vector of one layer: 'cls' (first token), 'mean' (over
    real tokens), 'last' (last real token)."""
    if pooling == "cls":
        return hidden[:, 0]  # (B, H)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "mean":
        # (B, H): divide by real tokens, not T
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if pooling == "last":
        # index of the last real token; works for right and left padding alike
        T = attention_mask.shape[1]
        last = T - 1 - attention_mask.flip(1).argmax(1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    raise ValueError(f"unknown pooling {pooling!r}: use 'cls', 'mean' or 'last'")


def embed_2d(model, input_ids, attention_mask, pairs, pooling="cls", normalize=False):
    """Eq. 1: e^(n,d) = pool(h^(n))[:d] for every pair, from ONE forward pass up to layer max(n)."""
    hidden = layer_hidden_states(model, input_ids, attention_mask, [n for n, _ in pairs])
    pooled = {n: pool(h, attention_mask, pooling) for n, h in hidden.items()}  # {n: (B, H)}
    out = {}
    for n, d in pairs:
        e = pooled[n][:, :d]  # (B, d)
        out[(n, d)] = F.normalize(e, dim=-1) if normalize else e  # normalise after truncation
    return out


# ----------------------------------------------------------------------------------------------
# Fine-tuning losses (Eq. 2-5) and baselines (Eq. 6-9)

def similarity_scores(q, p, temperature=1.0, similarity="dot"):
    """Eq. 2: s(q, p) / tau for every query against every candidate: (B, d) x (BG, d) -> (B, BG)."""
    if similarity == "cos":
        q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}: use 'dot' or 'cos'")
    return q @ p.T / temperature  # (B, BG)


def positive_index(num_queries, num_candidates, device=None):
    """Column of each query's positive: p[i*G] for query i (G = candidates per query)."""
    if num_queries == 0 or num_candidates % num_queries:
        raise ValueError(
            f"{num_candidates} passages do not split into groups for {num_queries} queries")
    return torch.arange(num_queries, device=device) * (num_candidates // num_queries)  # (B,)


def contrastive_loss(q, p, temperature=1.0, similarity="dot"):
    """Eq. 3: InfoNCE with in-batch negatives; q (B, d), p (B*G, d), positive of query i is
    p[i*G]."""
    scores = similarity_scores(q, p, temperature, similarity)  # (B, BG)
    return F.cross_entropy(scores, positive_index(q.shape[0], p.shape[0], q.device))


def kl_loss(student_scores, teacher_scores):
    """Eq. 4: KL(P_teacher || P_student) over the candidates, batch mean; the teacher is detached.

    The scores already carry 1/tau (Eq. 2); the paper's distillation temperature is T = 1."""
    teacher = F.softmax(teacher_scores.detach(), dim=-1)  # (B, BG)
    student = F.log_softmax(student_scores, dim=-1)  # (B, BG)
    return F.kl_div(student, teacher, reduction="batchmean")


def srl_loss(q_2d, p_2d, pairs, temperature=1.0, kl_weight=1.0, similarity="dot"):
    """Eq. 5: Starbucks Representation Learning, every pair every step; teacher = the last pair.

    The paper averages over the |S| pairs; the authors' code sums (a factor |S| that gradient
    clipping and the warmup-scale of the loss are not invariant to). We follow the paper.
    """
    teacher_scores = similarity_scores(q_2d[pairs[-1]], p_2d[pairs[-1]], temperature, similarity)
    labels = positive_index(teacher_scores.shape[0], teacher_scores.shape[1], teacher_scores.device)
    ce_total, kl_total = 0.0, 0.0
    for pair in pairs:
        scores = similarity_scores(q_2d[pair], p_2d[pair], temperature, similarity)  # (B, BG)
        ce_total = ce_total + F.cross_entropy(scores, labels)
        if pair != pairs[-1]:  # the teacher's KL to itself is zero
            kl_total = kl_total + kl_loss(scores, teacher_scores)
    return (ce_total + kl_weight * kl_total) / len(pairs)


def embedding_kl_loss(student, teacher, temperature=1.0):
    """Eq. 4': KL over embedding coordinates, KL(softmax(teacher[:, :d]/T) ||
    softmax(student/T)), batch mean over the rows, teacher NOT detached. student (N, d), teacher
    (N, >= d): the rows are every text of the batch.

    This is what the authors' STS script and sentence-transformers' 2D loss use; offered only to
    reproduce those runs (Eq. 4, over candidate scores and detached, is the intended form).
    """
    d = student.shape[-1]
    return F.kl_div(F.log_softmax(student / temperature, dim=-1),
                    F.softmax(teacher[:, :d] / temperature, dim=-1), reduction="batchmean")


def released_starbucks_loss(base_loss, a_2d, b_2d, pairs, kl_weight=0.3):
    """Eq. 5', the authors' StarbucksLoss as released (sts/starbucks_loss.py, forward): the SUM
    over pairs of base_loss(a, b) plus, for every pair but the last, kl_weight x Eq. 4' over the
    embeddings of EVERY text of the batch (both columns concatenated, as its ForwardDecorator
    concatenates each call's embeddings), the teacher being the full pair's embedding truncated
    to d. kl_weight = kl_temperature (0.3) x kl_div_weight (1): the released code multiplies by
    its 'temperature' and divides by none. Departs from the paper's mean over |S| (Eq. 5) on
    purpose: it reproduces the released STS runs.
    """
    # (B + B', H): every text at the full pair
    teacher = torch.cat([a_2d[pairs[-1]], b_2d[pairs[-1]]])
    total = 0.0
    for pair in pairs:
        total = total + base_loss(a_2d[pair], b_2d[pair])
        if pair != pairs[-1]:
            total = total + kl_weight * embedding_kl_loss(torch.cat([a_2d[pair], b_2d[pair]]),
                                                          teacher)
    return total


def srl_loss_embedding_kl(q_2d, p_2d, pairs, temperature=1.0, kl_weight=0.3, similarity="cos"):
    """Eq. 5' with Eq. 3 as the base loss: the released AllNLI STS run
    (MultipleNegativesRankingLoss in StarbucksLoss)."""
    return released_starbucks_loss(lambda q, p: contrastive_loss(q, p, temperature, similarity),
                                   q_2d, p_2d, pairs, kl_weight)


def full_loss(q_2d, p_2d, pairs, temperature=1.0, similarity="dot"):
    """Eq. 6: the full model only, L_CE^(L,H); smaller sizes are truncations at evaluation."""
    return contrastive_loss(q_2d[pairs[-1]], p_2d[pairs[-1]], temperature, similarity)


def matryoshka_loss(q, p, dims, temperature=1.0, similarity="dot"):
    """Eq. 8: 1D Matryoshka (MRL), sum over d of L_CE at the last layer truncated to d (c_d = 1)."""
    return sum(contrastive_loss(q[:, :d], p[:, :d], temperature, similarity) for d in dims)


def matryoshka_2d_loss(q_layers, p_layers, dims, generator, temperature=1.0, similarity="cos",
                       kl_temperature=0.3, kl_weight=1.0, base_loss=None):
    """Eq. 9: 2DMSE as the paper's STS baseline ran it: ONE random size per step, not all of them.

    q_layers / p_layers: {n: (B, H)} and {n: (B', H)} full-width pooled embeddings of every layer
    1..L (keys sorted). Samples d_a for the last layer, one earlier layer n uniformly and one d_b;
    weight w_n = 1/n; KL over the coordinates of the full-width embeddings of EVERY text (both
    columns, as the library's forward decorator concatenates them) with temperature T = 0.3,
    multiplied by T, the teacher not detached: this mirrors sentence-transformers' Matryoshka2dLoss
    before its 2026 fixes (issues #3757, #3880, #3901), the version the paper's STS baseline ran.
    base_loss(a, b): Eq. 3 by default; CoSENT for scored pairs. Nine parameters: that loss's own
    settings, one per argument, so that it reads line by line against the library's.
    """
    base_loss = base_loss or (lambda q, p: contrastive_loss(q, p, temperature, similarity))
    layers = sorted(q_layers)
    last = layers[-1]
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=generator))]
    d_a, n, d_b = pick(dims), pick(layers[:-1]), pick(dims)
    loss = base_loss(q_layers[last][:, :d_a], p_layers[last][:, :d_a])
    loss = loss + base_loss(q_layers[n][:, :d_b], p_layers[n][:, :d_b]) / n
    kl = embedding_kl_loss(torch.cat([q_layers[n], p_layers[n]]),
                           torch.cat([q_layers[last], p_layers[last]]),
                           kl_temperature)  # every text, full width
    return loss + kl_weight * kl_temperature * kl


def matryoshka_2d_retrieval_loss(q_layers, p_layers, dims, generator, temperature=1.0,
                                 similarity="dot", kl_weight=1.0):
    """Eq. 9', 2DMSE as the authors' retrieval code runs it (retrieval/modeling.py,
    `sub_model_sampling`; the paper's MS MARCO 2DMSE row): one layer sampled from the pairs'
    layers but the last, plus the last layer; at each of the two, Eq. 3 at EVERY dim of
    `dims` (the last layer's full width once), each plus kl_weight x Eq. 4 against the
    detached full pair's scores; summed, no 1/n weight.

    q_layers / p_layers: {n: (B, H)} and {n: (BG, H)} full-width pooled embeddings
    of the pairs' layers (keys sorted). Their code draws the layer with Python's
    random; here it is the step's seeded generator.
    """
    layers = sorted(q_layers)
    last, full = layers[-1], q_layers[layers[-1]].shape[-1]
    teacher = similarity_scores(q_layers[last], p_layers[last], temperature, similarity)  # (B, BG)
    labels = positive_index(teacher.shape[0], teacher.shape[1], teacher.device)
    loss = F.cross_entropy(teacher, labels)
    sampled = layers[int(torch.randint(len(layers) - 1, (1,), generator=generator))]
    for n, d in [(sampled, d) for d in dims] + [(last, d) for d in dims if d != full]:
        scores = similarity_scores(q_layers[n][:, :d], p_layers[n][:, :d], temperature, similarity)
        loss = loss + F.cross_entropy(scores, labels) + kl_weight * kl_loss(scores, teacher)
    return loss


def cosent_loss(a, b, gold, scale=20.0):
    """CoSENT on scored pairs: log(1 + sum over (i, j) with gold_i >
    gold_j of exp(scale (cos_j - cos_i)))."""
    cos = F.cosine_similarity(a, b, dim=-1) * scale  # (B,)
    diff = cos[None, :] - cos[:, None]  # (B, B): entry (i, j) = cos_j - cos_i
    # keep pairs with gold_i > gold_j
    diff = diff.masked_fill(gold[:, None] <= gold[None, :], float("-inf"))
    zero = torch.zeros(1, dtype=diff.dtype, device=diff.device)
    return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


def srl_cosent_loss(a_2d, b_2d, gold, pairs, scale=20.0):
    """Eq. 5 on scored pairs (the paper's low-resource STS-B run, as the paper writes it):
    mean over pairs of CoSENT. No candidate distribution exists on scored pairs, so Eq. 4 has
    nothing to act on; the released run's coordinate KL is `released_starbucks_loss` with
    CoSENT (finetune.py --kl embeddings)."""
    return sum(cosent_loss(a_2d[p], b_2d[p], gold, scale) for p in pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------
# Pre-training losses (Eq. 10-13): Starbucks Masked Autoencoding (SMAE)
#
# Labels follow transformers' convention: the token id at a masked position, -100 elsewhere.
# The masks (M_enc inside M_dec, BERT's 80/10/10) are made by training.whole_word_masking.

class SMAEHeads(torch.nn.Module):
    """The trainable parts of Eq. 10 and 12 outside the encoder: the
    shared MLM head and the MAE decoder.

    Holds weights only (no forward): mlm_transform, mlm_logits and mae_loss
    read them. The vocabulary decoder has no weight of its own: it is tied to
    the encoder's word embeddings (Eq. 10).
    """

    def __init__(self, encoder):
        super().__init__()
        if not isinstance(getattr(encoder, "embeddings", None), torch.nn.Module):
            raise ValueError(
                f"SMAE needs a BERT-style encoder with .embeddings, not {type(encoder).__name__}")
        config = encoder.config
        # dense (H x H), GELU, LayerNorm over H
        self.transform = BertPredictionHeadTransform(config)
        # the vocabulary decoder's bias
        self.bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        # Eq. 12: one transformer layer initialised from (a copy of) the encoder's first layer
        self.decoder_layer = copy.deepcopy(transformer_layers(encoder)[0])
        # BERT's init
        torch.nn.init.normal_(self.transform.dense.weight, std=config.initializer_range)
        torch.nn.init.zeros_(self.transform.dense.bias)


def mlm_transform(heads, h):
    """Eq. 10, first part: GELU-LN(W[:, :d] h + b) for h (..., d):
    the projection reads only d inputs."""
    d = h.shape[-1]
    z = F.linear(h, heads.transform.dense.weight[:, :d], heads.transform.dense.bias)  # (..., H)
    return heads.transform.LayerNorm(heads.transform.transform_act_fn(z))  # (..., H)


def mlm_logits(heads, word_embeddings, t):
    """Eq. 10, vocabulary decoder: t E^T + b, its weight tied to the word embeddings E (V, H)."""
    return F.linear(t, word_embeddings, heads.bias)  # (..., V)


def mlm_loss(heads, word_embeddings, h, labels, all_positions=False):
    """Eq. 11: cross-entropy of the sliced head (Eq. 10) on h = h^(n)[:, :, :d] (B, T, d) at
    masked positions.

    all_positions=True computes logits at every position and ignores unmasked
    labels, as the authors' code does (same loss, ~T/M times the head's
    FLOPs); kept for the benchmark and the tests.
    """
    if all_positions:
        logits = mlm_logits(heads, word_embeddings, mlm_transform(heads, h))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    masked = labels != -100  # (B, T)
    # (M, V): masked only
    logits = mlm_logits(heads, word_embeddings, mlm_transform(heads, h[masked]))
    return F.cross_entropy(logits, labels[masked])


def mae_decoder(heads, decoder_embeds, sentence, attention_mask, rows=None):
    """Eq. 12's decoder: one layer over the decoder input's embeddings (B, T, H) with
    position 0 replaced by the sub-model's sentence vector (B, H) -> its outputs at `rows`
    (B, T) bool, (M, H); None: all, (B, T, H).

    Only the keys and values need every position: with rows given, the attention output and the
    feed-forward (3/4 of the layer's FLOPs) run at those rows only, through the layer's own modules.
    """
    x = torch.cat([sentence[:, None], decoder_embeds[:, 1:]], dim=1)  # (B, T, H)
    # additive mask (B, 1, 1, T): 0 on real tokens, -inf-like on padding
    # (eager and SDPA attention accept it)
    pad = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    layer = heads.decoder_layer
    if rows is None:  # the whole layer at every position, as the authors run it
        y = layer(x, attention_mask=pad)
        return y[0] if isinstance(y, tuple) else y  # (B, T, H)
    context = layer.attention.self(x, attention_mask=pad)[0]  # (B, T, H): every query, every key
    # (M, H): output projection, residual, LayerNorm
    a = layer.attention.output(context[rows], x[rows])
    return layer.output(layer.intermediate(a), a)  # (M, H): feed-forward, residual, LayerNorm


def mae_loss(heads, word_embeddings, decoder_embeds, sentence, attention_mask, decoder_labels,
             all_positions=False):
    """Eq. 12: the MAE decoder's prediction of the decoder input's
    masked tokens (through the Eq. 10 head)."""
    if all_positions:
        y = mae_decoder(heads, decoder_embeds, sentence, attention_mask)  # (B, T, H)
        return mlm_loss(heads, word_embeddings, y, decoder_labels, all_positions=True)
    rows = decoder_labels != -100  # (B, T)
    y = mae_decoder(heads, decoder_embeds, sentence, attention_mask, rows)  # (M, H)
    return F.cross_entropy(mlm_logits(heads, word_embeddings, mlm_transform(heads, y)),
                           decoder_labels[rows])


def smae_loss(encoder, heads, input_ids, attention_mask, labels, decoder_input_ids, decoder_labels,
              pairs, all_positions=False, token_counts=None):
    """Eq. 13: mean over pairs of (L_MLM^(n,d) + L_MAE^(n,d)) / 2, every pair from ONE encoder pass.

    The encoder reads the 20 % masked input (labels), the MAE decoder the 40 % masked one
    (decoder_labels). all_positions=True is the authors' computation (logits at every position, pair
    by pair), for comparison. token_counts: (encoder, decoder) masked tokens of a whole batch of
    which this call sees a slice; each term's cross-entropies are summed and divided by these counts
    instead of averaged, so the slices' losses add up to the whole batch's loss (torchrun: ranks
    hold different numbers of masked tokens). Ten parameters: the modules, tensors and pairs of
    Eq. 10-13 and two options, one per argument, so that the function lifts into another project
    without a batch type of ours.
    """
    if all_positions and token_counts is not None:
        raise ValueError(
            "token_counts needs the masked-positions computation (all_positions=False)")
    # {n: (B, T, H)}
    hidden = layer_hidden_states(encoder, input_ids, attention_mask, [n for n, _ in pairs])
    # (V, H), shared by encoder, head and decoder
    word_embeddings = encoder.get_input_embeddings().weight
    # Departure: one forward, one dropout mask for every pair (authors re-embed per pair); same mean
    # (B, T, H), once for all pairs
    decoder_embeds = encoder.embeddings(input_ids=decoder_input_ids)
    # transform of the first token only; the authors transform every token, then keep
    # the first (same values) {pair: (B, H)}
    sentences = {(n, d): mlm_transform(heads, hidden[n][:, 0, :d]) for n, d in pairs}
    if all_positions:
        return sum((mlm_loss(heads, word_embeddings, hidden[n][:, :, :d], labels, True) +
                    mae_loss(heads, word_embeddings, decoder_embeds, sentences[(n, d)],
                             attention_mask, decoder_labels, True)) / 2
                   for n, d in pairs) / len(pairs)
    masked, decoder_masked = labels != -100, decoder_labels != -100  # (B, T) each
    states, targets = [], []
    for n, d in pairs:
        # (M_dec, H)
        y = mae_decoder(heads, decoder_embeds, sentences[(n, d)], attention_mask, decoder_masked)
        states += [mlm_transform(heads, hidden[n][:, :, :d][masked]), mlm_transform(heads, y)]
        targets += [labels[masked], decoder_labels[decoder_masked]]
    # One vocabulary matmul for all 2|S| terms (the same logits as Eq. 11/12 pair by pair): the tied
    # embeddings' (V, H) gradient is then formed once, not 2|S| times.
    logits = mlm_logits(heads, word_embeddings, torch.cat(states))  # (sum of masked counts, V)
    ce = F.cross_entropy(logits, torch.cat(targets), reduction="none")
    per_term = ce.split([len(t) for t in targets])
    if token_counts is None:
        terms = torch.stack([c.mean() for c in per_term])  # L_MLM, L_MAE of each pair
    else:  # sums over this slice / counts of the whole batch, alternating MLM and MAE as `targets`
        terms = torch.stack([c.sum() / token_counts[i % 2] for i, c in enumerate(per_term)])
    return terms.mean()  # = (1/|S|) sum over pairs of (L_MLM + L_MAE) / 2


def mlm_2d_loss(encoder, heads, input_ids, attention_mask, labels, pairs, token_count=None):
    """SMAE's ablation without the MAE decoder: (1/|S|) sum over pairs of Eq. 11, every pair from
    one encoder pass (the authors' BertFor2DMatryoshkaMaskedLM, smae/modeling.py). With pairs =
    [(L, H)] it is plain MLM continued pre-training. token_count: the whole batch's masked tokens
    when this call sees a slice (torchrun)."""
    # {n: (B, T, H)}
    hidden = layer_hidden_states(encoder, input_ids, attention_mask, [n for n, _ in pairs])
    word_embeddings = encoder.get_input_embeddings().weight  # (V, H)
    masked = labels != -100  # (B, T)
    # (|S| M, H)
    states = torch.cat([mlm_transform(heads, hidden[n][:, :, :d][masked]) for n, d in pairs])
    ce = F.cross_entropy(mlm_logits(heads, word_embeddings, states), labels[masked].repeat(
        len(pairs)), reduction="none")  # (|S| M,): one vocabulary matmul for every pair
    per_pair = ce.view(len(pairs), -1)  # (|S|, M)
    terms = per_pair.mean(1) if token_count is None else per_pair.sum(1) / token_count
    return terms.mean()
