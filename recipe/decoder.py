"""Decoder-only encoders (Ziarko et al., 2024): loading a GGUF file (models.load_model with a .gguf
path, e.g. the packaged smollm2-135m) and their symmetric InfoNCE loss (README Eq. 17; finetune.py
--method symmetric).
"""
import os

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

import starbucks as sb


def load_gguf(path):
    """A GGUF file as a base model (AutoModel: no LM head) in fp32 and its tokenizer.

    transformers' own gguf_file loading requires accelerate only to place weights; building the
    model from the GGUF's config and loading its dequantised tensors needs just the gguf package.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(path)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, gguf_file=name),
                                  dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()})
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def symmetric_contrastive_loss(q, p, temperature=1.0, similarity="cos"):
    """Eq. 17: symmetric InfoNCE (Ziarko et al.): queries against the batch's passages, and each
    positive against the batch's queries, averaged. q (B, d), p (B*G, d); hard negatives join the
    first direction only."""
    scores = sb.similarity_scores(q, p, temperature, similarity)  # (B, BG)
    positives = sb.positive_index(q.shape[0], p.shape[0], q.device)  # (B,)
    query_to_passage = F.cross_entropy(scores, positives)
    # (B, B)
    passage_to_query = F.cross_entropy(scores[:, positives].T,
                                       torch.arange(q.shape[0], device=q.device))
    return (query_to_passage + passage_to_query) / 2
