"""Classification with the sizes (README Eq. 18-20): MRL's nested classifiers and its adaptive
cascade, in 2D (Kusupati et al., 2022, Sec. 3 and 4.2; the 2D cascade that continues one forward
pass is ours): the heads and their loss, training them (a probe on frozen features, or end to end),
the cascade, its costs and operating points, and the SVD baseline. classification/classify.py runs
them.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import models
import starbucks as sb
import training
from classification import accuracy
from recipe import flops


# ----------------------------------------------------------------------------------------------
# The heads (Eq. 18) and their loss (Eq. 19)

class NestedClassifier(torch.nn.Module):
    """Eq. 18: one linear head per layer-dim pair, logits^(n,d) = W^(n,d) e^(n,d) + b^(n,d).

    efficient=True is MRL-E: ONE weight W (C, H) and bias b for every pair, the pair (n, d) using
    W[:, :d], so all heads together cost one full classifier's parameters.
    """

    def __init__(self, pairs, hidden_size, num_classes, efficient=False):
        super().__init__()
        self.pairs, self.efficient = [tuple(p) for p in pairs], efficient
        if efficient:
            self.shared = torch.nn.Linear(hidden_size, num_classes)  # W (C, H), sliced by d
        else:
            self.heads = torch.nn.ModuleDict({
                f"{n}x{d}": torch.nn.Linear(d, num_classes) for n, d in self.pairs})

    def logits(self, pair, e):
        """(B, d) -> (B, C) for one pair."""
        n, d = pair
        if self.efficient:
            return F.linear(e, self.shared.weight[:, :d], self.shared.bias)
        return self.heads[f"{n}x{d}"](e)

    def forward(self, features_2d):
        """{(n, d): (B, d)} -> {(n, d): (B, C)}."""
        return {pair: self.logits(pair, features_2d[pair]) for pair in self.pairs}


def mrl_classification_loss(logits_2d, labels, weights=None):
    """Eq. 19: sum over pairs of c_(n,d) * cross-entropy (MRL's loss; c = 1 unless weights={pair:
    c})."""
    return sum((1.0 if weights is None else weights[pair]) * F.cross_entropy(logits, labels)
               for pair, logits in logits_2d.items())


# ----------------------------------------------------------------------------------------------
# Training the heads: a probe on frozen features, or end to end with the encoder


@dataclass(frozen=True)
class ProbeSettings:
    """How fit_probe trains heads on frozen features (full batch, AdamW)."""
    epochs: int = 300
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


def fit_probe(classifier, features_2d, labels, epochs=300, learning_rate=1e-2, weight_decay=1e-4,
              seed=0):
    """Train a NestedClassifier on cached features {pair: (N, d)} with Eq. 19, full batch, AdamW; ->
    classifier.

    Frozen encoder: the features are computed once, so every epoch costs only the heads' matmuls."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate,
                                  weight_decay=weight_decay)
    classifier.train()
    for _ in range(epochs):
        loss = mrl_classification_loss(classifier({p: features_2d[p]
                                                   for p in classifier.pairs}), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return classifier.eval()


@dataclass(frozen=True)
class EndToEndSettings:
    """How train_classifier_end_to_end trains the encoder and its heads together (AdamW)."""
    steps: int = 50  # optimizer steps
    batch_size: int = 16
    learning_rate: float = 2e-5
    weight_decay: float = 1e-4
    max_length: int = 256  # tokens per text
    seed: int = 0  # the batches' order and the initial state


def train_classifier_end_to_end(model, tokenizer, classifier, texts, labels, pooling,
                                settings=EndToEndSettings()):
    """Eq. 19 through the encoder: every pair's head and the encoder trained together (MRL's full
    training); -> (model, classifier), both in eval mode."""
    torch.manual_seed(settings.seed)
    optimizer = training.adamw(torch.nn.ModuleList([model, classifier]), settings.learning_rate,
                               settings.weight_decay)
    model.train(), classifier.train()
    for _, indices in training.global_batches(len(texts), settings.batch_size, 0, settings.steps,
                                              settings.seed):
        enc = tokenizer([texts[i] for i in indices], padding=True, truncation=True,
                        max_length=settings.max_length, return_tensors="pt")
        features = sb.embed_2d(model, enc["input_ids"], enc["attention_mask"], classifier.pairs,
                               pooling)
        loss = mrl_classification_loss(classifier(features), labels[indices])  # forward, Eq. 19
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), classifier.eval()



# ----------------------------------------------------------------------------------------------
# The 2D cascade (Eq. 20)

def cascade_thresholds(pairs, thresholds):
    """Eq. 20's thresholds as one per pair (a number: the same for all), checked: pairs in order of
    layer."""
    thresholds = [thresholds] * len(pairs) if isinstance(thresholds,
                                                         (int, float)) else list(thresholds)
    if len(thresholds) != len(pairs) or [p[0] for p in pairs] != sorted(p[0] for p in pairs):
        raise ValueError("the cascade needs pairs in order of layer and one threshold per pair, "
                         f"got {pairs}, {thresholds}")
    return thresholds


@torch.no_grad()
def cascade_classify(model, input_ids, attention_mask, classifier, pairs, thresholds,
                     pooling="mean"):
    """Eq. 20: classify with the cheapest pair first; an example whose max softmax probability is
    below its pair's threshold goes on to the next pair. -> (predictions (B,), index of the pair
    each stopped at (B,)).

    pairs: in order of cost (sorted by layer, then dim); thresholds: one per pair, or one for all
    (the last pair always answers). Moving from layer n to n' CONTINUES the same forward pass from
    layer n, on the examples still undecided only: an example that stops early never runs the later
    layers.
    """
    blocks, norm = sb.transformer_layers(model), sb.final_norm(model)
    thresholds = cascade_thresholds(pairs, thresholds)
    inputs = {}

    # what the model passes its first block: embeddings, masks
    def capture(module, positional, keywords):
        inputs["args"], inputs["kwargs"] = positional, keywords
        raise sb._StopForward
    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    except sb._StopForward:
        pass
    finally:
        handle.remove()
    # hidden (B, T, H)
    hidden, args, kwargs = inputs["args"][0], list(inputs["args"][1:]), dict(inputs["kwargs"])
    batch = hidden.shape[0]
    rows, mask = torch.arange(batch, device=hidden.device), attention_mask  # the undecided examples
    predictions = torch.empty(batch, dtype=torch.long, device=hidden.device)
    stopped_at = torch.empty(batch, dtype=torch.long, device=hidden.device)
    layers_run = 0
    for i, (n, d) in enumerate(pairs):
        # continue the pass: layers layers_run+1 .. n, undecided rows only
        for block in blocks[layers_run:n]:
            out = block(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        layers_run = n
        h = norm(hidden) if norm is not None else hidden
        probabilities = F.softmax(classifier.logits((n, d), sb.pool(h, mask, pooling)[:, :d]),
                                  dim=-1)  # (b, C)
        confidence, predicted = probabilities.max(-1)
        stop = (confidence >= thresholds[i] if i < len(pairs) - 1
                else torch.ones_like(confidence, dtype=torch.bool))
        predictions[rows[stop]], stopped_at[rows[stop]] = predicted[stop], i
        keep = ~stop
        if not keep.any():
            break
        # per-example tensors (masks) follow the undecided rows; shared ones (rotary) do not
        size = len(rows)
        take = lambda x: x[keep] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == size else x
        rows, hidden, mask = rows[keep], hidden[keep], mask[keep]
        args, kwargs = [take(a) for a in args], {k: take(v) for k, v in kwargs.items()}
    return predictions, stopped_at


# ----------------------------------------------------------------------------------------------
# Costs and the cascade's operating points

def token_counts(tokenizer, texts, max_length=256):
    """Tokens of each text after truncation, as the encoder sees them: [N]."""
    return [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def text_flops(model, tokens, layers):
    """{n: (N,) encoder FLOPs of each text (tokens [N]) through the first n layers} for every n in
    layers."""
    return {n: np.array([flops.encoder_flops(model, n, t) for t in tokens]) for n in set(layers)}


def classification_costs(model, tokenizer, texts, pairs, num_classes, max_length=256):
    """{pair: mean FLOPs per text} of classifying at one pair: the encoder's first n layers + the
    head (2 d C)."""
    per_layer = text_flops(model, token_counts(tokenizer, texts, max_length), [n for n, _ in pairs])
    return {(n, d): float(per_layer[n].mean()) + 2 * d * num_classes for n, d in pairs}


@dataclass
class CascadeOutcomes:
    """Every pair's answer to every text, from one forward pass: all that Eq. 20 needs to price any
    thresholds."""
    pairs: list  # [(n, d)] in order of layer
    confidence: torch.Tensor  # (N, P): max softmax probability of each pair's head
    predicted: torch.Tensor  # (N, P): each pair's class
    # (N, P): FLOPs of stopping at pair i (layers run + heads consulted) over the full pair's mean
    cost: np.ndarray
    gold: torch.Tensor  # (N,)


@dataclass(frozen=True)
class CascadeSettings:
    """How cascade_outcomes encodes the texts and prices the heads."""
    pooling: str = "mean"
    max_length: int = 256  # tokens per text
    batch_size: int = 32
    num_classes: int = 2  # C: each head costs 2 d C


def cascade_outcomes(model, tokenizer, texts, labels, classifier, settings=CascadeSettings(),
                     features=None):
    """One forward pass per batch (encode_2d) -> CascadeOutcomes, in the texts' order, at every
    pair of the classifier (in order of layer). The cost of an example that stops at pair i: the
    encoder's first n_i layers (the cascade continues its pass, never reruns it) plus every head it
    consulted (2 d_j C each), over the mean cost of classifying at the full pair alone.

    features: encode_2d's {pair: (N, d)} of these texts with the same max_length and batch_size (so
    the same batches and values), when the caller has them already: no second pass.
    """
    pairs, num_classes = classifier.pairs, settings.num_classes
    max_length = settings.max_length
    cascade_thresholds(pairs, 0.0)  # pairs in order of layer, as the cascade runs them
    if not texts or len(texts) != len(labels):
        raise ValueError(f"the cascade needs texts and one label each, got {len(texts)} texts, "
                         f"{len(labels)} labels")
    if features is None:
        features = models.encode_2d(model, tokenizer, texts, pairs, settings.pooling, max_length,
                                    settings.batch_size)
    elif any(p not in features or len(features[p]) != len(texts) for p in pairs):
        raise ValueError(f"features must hold every pair of {list(pairs)} for the {len(texts)} "
                         f"texts, got { {p: len(v) for p, v in features.items()} }")
    device = next(classifier.parameters()).device
    with torch.no_grad():
        probabilities = torch.stack([
            classifier.logits(p, features[p].to(device)).softmax(-1).cpu()
            for p in pairs], 1)  # (N, P, C)
    per_layer = text_flops(model, token_counts(tokenizer, texts, max_length), [n for n, _ in pairs])
    heads = np.cumsum([2 * d * num_classes for _, d in pairs])  # (P,): heads consulted up to pair i
    cost = np.stack([per_layer[n] for n, _ in pairs], 1) + heads  # (N, P)
    # the full pair alone, its head only
    full = per_layer[pairs[-1][0]].mean() + 2 * pairs[-1][1] * num_classes
    return CascadeOutcomes(list(pairs), probabilities.amax(-1), probabilities.argmax(-1),
                           cost / full, torch.tensor(list(labels)))


def cascade_answers(outcomes, thresholds):
    """Eq. 20 text by text, read off outcomes -> (the class each text gets (N,), the index of the
    pair it stopped at (N,)), in the texts' order. thresholds: one for every pair, or one per pair
    (the last always answers)."""
    per_pair = torch.tensor(cascade_thresholds(outcomes.pairs, thresholds),
                            dtype=outcomes.confidence.dtype)
    confident = outcomes.confidence >= per_pair  # (N, P)
    confident[:, -1] = True
    stopped = confident.float().argmax(1)  # (N,): the first pair confident enough
    return outcomes.predicted[torch.arange(len(stopped)), stopped], stopped


def cascade_point(outcomes, thresholds):
    """Eq. 20 at one threshold for every pair, or one per pair (the last always answers), priced
    from outcomes -> {'threshold', 'accuracy', 'relative_cost', 'stopped': share per pair}: what
    cascade_classify decides, pass by pass (tested)."""
    predicted, stopped = cascade_answers(outcomes, thresholds)
    return {"threshold": thresholds, "accuracy": accuracy.accuracy(predicted, outcomes.gold),
            "relative_cost": float(outcomes.cost[np.arange(len(stopped)), stopped.numpy()].mean()),
            "stopped": [float((stopped == i).float().mean()) for i in range(len(outcomes.pairs))]}


def accuracy_drop(outcomes, thresholds):
    """-> (accuracy of the full pair minus the cascade's on the same texts, the standard error of
    that paired difference): how sure a drop measured on N texts is (the per-text difference is -1,
    0 or 1)."""
    # (N,) the full pair alone answers every text
    full = (outcomes.predicted[:, -1] == outcomes.gold).double()
    lost = full - (cascade_answers(outcomes, thresholds)[0] == outcomes.gold).double()  # (N,)
    return float(lost.mean()), float(lost.std() / len(lost)**0.5) if len(lost) > 1 else float("nan")


def cascade_points(outcomes, thresholds):
    """Eq. 20 at each of thresholds (a number, or one per pair) -> [cascade_point], all priced from
    the one forward pass of outcomes (cascade_outcomes)."""
    return [cascade_point(outcomes, threshold) for threshold in thresholds]


THRESHOLD_GRID = [round(0.01 * i, 2) for i in range(100)] + [0.995, 0.999, 1.01]


def qualifies(outcomes, point, target, margin=0.0):
    """A cascade_point reaches the target accuracy with margin standard errors of its drop
    (accuracy_drop) to spare: a point chosen on held-out texts for reaching it is likely to have
    been lucky there."""
    return point["accuracy"] - (margin * accuracy_drop(outcomes, point["threshold"])[1]
                                if margin else 0.0) >= target


def cheapest_threshold(outcomes, tolerance=0.005, grid=THRESHOLD_GRID, margin=0.0):
    """The cascade_point of the cheapest single threshold of grid whose accuracy is at least the
    full pair's minus tolerance, with margin (qualifies; grid ends above 1: every text at the full
    pair, which always does)."""
    target = cascade_point(outcomes, 1.01)["accuracy"] - tolerance
    return min((q for q in (cascade_point(outcomes, t)
                            for t in grid) if qualifies(outcomes, q, target, margin)),
               key=lambda q: q["relative_cost"])


def choose_thresholds(outcomes, tolerance=0.005, grid=THRESHOLD_GRID, margin=0.0):
    """One threshold per pair (as MRL's cascade, one per size, chosen on held-out data) whose
    accuracy is at least the full pair's minus tolerance, with margin (qualifies), at a low expected
    cost -> (thresholds, their cascade_point). A local search: from cheapest_threshold, move one
    pair's threshold at a time while that lowers the cost. Never dearer than one threshold for all;
    not always the cheapest (a move of two at once can be needed)."""
    target = cascade_point(outcomes, 1.01)["accuracy"] - tolerance
    best = cheapest_threshold(outcomes, tolerance, grid, margin)
    thresholds, improved = [best["threshold"]] * len(outcomes.pairs), True
    while improved:
        improved = False
        for i in range(len(outcomes.pairs) - 1):  # the last pair always answers
            for value in grid:
                point = cascade_point(outcomes, thresholds[:i] + [value] + thresholds[i + 1:])
                if point["relative_cost"] < best["relative_cost"] - 1e-12 and qualifies(
                        outcomes, point, target, margin):
                    best, thresholds, improved = point, point["threshold"], True
    return thresholds, {**best, "threshold": thresholds}


def plot_cascade(points, accuracy_by_pair, costs, pairs, path):
    """Accuracy against FLOPs relative to the full pair: each pair alone, and the cascade's
    thresholds (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([costs[p] / costs[pairs[-1]]
             for p in pairs], [accuracy_by_pair[p]
                               for p in pairs], "o-", label="one pair (MRL head)")
    for (n, d) in pairs:
        ax.annotate(f"{n}x{d}", (costs[(n, d)] / costs[pairs[-1]], accuracy_by_pair[(n, d)]),
                    fontsize=7)
    ax.plot([p["relative_cost"]
             for p in points], [p["accuracy"] for p in points], "s--", label="cascade (Eq. 20)")
    ax.set_xscale("log")
    ax.set_xlabel("expected FLOPs per text, relative to the full pair")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



# ----------------------------------------------------------------------------------------------
# Baselines

def svd_directions(full_embeddings, m):
    """MRL's SVD baseline: the top-m right singular vectors of the (centred) full embeddings, (H,
    m); a size-m embedding is e^(L,H) @ V[:, :m]."""
    centred = full_embeddings - full_embeddings.mean(0, keepdim=True)  # (N, H)
    directions = torch.linalg.svd(centred, full_matrices=False).Vh[:m].T  # (H, min(m, N, H))
    # (H, m): past the data's rank, zero columns
    return F.pad(directions, (0, m - directions.shape[1]))
