"""MRL's evaluation of a classifier's sizes (Kusupati et al., "Matryoshka Representation Learning"):
accuracy, 1-nearest-neighbour accuracy and class-based retrieval mAP@k, over sub-embeddings compared
by cosine similarity as Eq. 2 compares them.
"""
import torch


def accuracy(predictions, labels):
    return float((torch.as_tensor(predictions) == torch.as_tensor(labels)).float().mean())


def _cosine_neighbours(train, test, k):
    """Indices of each test row's k most cosine-similar training rows, best first: (Q, k)."""
    # (Q, N)
    scores = torch.nn.functional.normalize(test, dim=-1) @ torch.nn.functional.normalize(
        train, dim=-1).T
    return scores.topk(min(k, train.shape[0]), dim=1).indices


def nearest_neighbour_accuracy(train, train_labels, test, test_labels):
    """1-NN accuracy under cosine similarity (MRL's training-free evaluation of a size)."""
    return accuracy(train_labels[_cosine_neighbours(train, test, 1)[:, 0]], test_labels)


def map_at_k(train, train_labels, test, test_labels, k=10):
    """Class-based retrieval mAP@k: each test text ranks the training texts by cosine
    similarity; relevant = same class; AP@k = sum_i P@i rel_i / min(k, relevant in the
    training set), averaged over test texts.

    MRL's retrieval/compute_metrics.py divides by k and ranks by L2 distance. The divisors agree
    whenever every class has at least k training texts (the embedded sets: 50 per class, k = 10);
    with fewer, ours still reaches 1 for a perfect ranking and MRL's cannot. Cosine:
    sub-embeddings are compared as Eq. 2 does."""
    # (Q, k)
    relevant = (train_labels[_cosine_neighbours(train, test, k)] == test_labels[:, None]).float()
    precision = relevant.cumsum(1) / torch.arange(1, relevant.shape[1] + 1)  # P@i
    # min(k, R)
    available = (train_labels[None, :] == test_labels[:, None]).sum(1).clamp(max=relevant.shape[1])
    return float(((precision * relevant).sum(1) / available.clamp(min=1)).mean())
