"""Models as folders: find a packaged model, load an encoder or a decoder (GGUF), read and write
starbucks_config.json. Every script loads and saves models through here; nothing is downloaded.

A saved folder is what save_pretrained writes (AutoModel loads it unchanged)
plus starbucks_config.json: the pairs, pooling and similarity that
evaluate.py and deploy/export.py read back.
"""
import json
import os
import sys
from dataclasses import asdict

import torch
from transformers import AutoModel, AutoTokenizer, BertTokenizer
from transformers.utils import logging as hf_logging

import data
import starbucks as sb

CONFIG_FILE = "starbucks_config.json"


def default_device():
    """The one process's device: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_path(name_or_path):
    """A local model folder or .gguf file, or the name of a packaged
    model. There are no hub downloads here."""
    if name_or_path in data.PACKAGED_MODELS:
        return data.packaged_path(*data.PACKAGED_MODELS[name_or_path])
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        return name_or_path
    if not os.path.isdir(name_or_path):
        raise data.DataError(
            f"{name_or_path!r} is not a model folder (nothing is downloaded from a hub); "
            f"packaged models: {', '.join(data.PACKAGED_MODELS)}")
    if not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise data.DataError(f"{name_or_path} is not a model folder: it has no config.json")
    return name_or_path


def load_model(name_or_path, device):
    """(model, tokenizer) of a model folder, a .gguf file or a
    packaged name; decoders get a pad token."""
    path = resolve_model_path(name_or_path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar on every load is noise
    try:
        if path.endswith(".gguf"):
            from recipe import decoder
            model, tokenizer = decoder.load_gguf(path)
        else:
            model = AutoModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise data.DataError(f"{path} is not a loadable model folder: {e}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # decoder-only LMs: pad with EOS; pooling reads the attention mask
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # causal attention: real tokens never see right-hand padding
    return model.to(device), tokenizer


def load_tokenizer(name_or_path):
    """A tokenizer folder, or a WordPiece vocab.txt
    (BertTokenizer(vocab=...); vocab_file= would give all [UNK])."""
    if os.path.isfile(name_or_path):
        return BertTokenizer(vocab=name_or_path)
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise data.DataError(f"{name_or_path} has no loadable tokenizer: {e}") from None


def save_model(model, tokenizer, output_dir, config, training_arguments, flops=None):
    """save_pretrained (loads with AutoModel; LoRA merged, Eq. 16) plus starbucks_config.json:
    pairs, pooling, arguments and the FLOP accounting (Eq. 15)."""
    # LoRA layers exist only where recipe.tuning added them
    tuning = sys.modules.get("recipe.tuning")
    (tuning.merged_copy(model) if tuning else model).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
        json.dump(
            {
                **asdict(config), "training_arguments": training_arguments,
                **({"flops": flops} if flops else {})
            }, f, indent=2)


def read_config(path, model, pairs=None, grid=False, pooling=None, similarity=None):
    """-> (the checkpoint's StarbucksConfig, its 'separate' map or None); the arguments override it.

    pairs: a LAYERxDIM string; grid: every layer x every dim of the pairs."""
    saved = {}
    config_file = os.path.join(path, CONFIG_FILE)
    if os.path.exists(config_file):
        saved = json.load(open(config_file))
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    layer_dims = sb.parse_pairs(pairs) if pairs else [tuple(p) for p in saved.get("pairs", [])
                                                      ] or sb.default_pairs(L, H)
    layer_dims = sb.check_pairs(layer_dims, L, H)
    if grid:
        layer_dims = [(n, d) for n in sorted({n
                                              for n, _ in layer_dims})
                      for d in sorted({d
                                       for _, d in layer_dims})]
    config = sb.StarbucksConfig(layer_dims, pooling or saved.get("pooling", "mean"),
                                similarity or saved.get("similarity", "cos"))
    return config, saved.get("separate")


def checkpoint_folders(name_or_path):
    """-> (path, folder to load): the checkpoint and its model folder, the same folder except for
    separately trained models (Eq. 7), whose top folder holds only starbucks_config.json and whose
    first layer's model is loaded (all share one config)."""
    config_file = os.path.join(name_or_path, CONFIG_FILE)
    separate = None
    if os.path.exists(config_file) and not os.path.exists(os.path.join(name_or_path,
                                                                       "config.json")):
        separate = json.load(open(config_file)).get("separate")
    if not separate:
        path = resolve_model_path(name_or_path)
        return path, path
    return name_or_path, os.path.join(name_or_path, next(iter(separate.values())))


# ----------------------------------------------------------------------------------------------
# Encoding many texts (evaluation, deployment)

@torch.no_grad()
def encode_2d(model, tokenizer, texts, pairs, pooling="cls", max_length=128, batch_size=64,
              normalize=False, progress=None):
    """Embed texts at every pair: {(n, d): (N, d)}, one forward pass per batch, up to layer max(n).

    Texts are sorted by length so that batches hold similar lengths (less padding), then restored.
    Nine parameters: the settings of a call users make, as keywords with defaults (as
    sentence-transformers' encode takes them).
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = {pair: [] for pair in pairs}
    device = next(model.parameters()).device
    starts = range(0, len(texts), batch_size)
    for start in (progress(starts) if progress else starts):
        batch = [texts[i] for i in order[start:start + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out = sb.embed_2d(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                          pairs, pooling, normalize)
        for pair in pairs:
            chunks[pair].append(out[pair].float().cpu())
            # no score or metric could be right after this
            if not torch.isfinite(chunks[pair][-1]).all():
                raise ValueError(
                    f"the model's {pair[0]}x{pair[1]} embeddings are not finite (NaN or inf): "
                    f"a broken checkpoint, or an overflow in reduced precision")
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(texts))
    return {
        pair: torch.cat(chunks[pair])[inverse] if texts else torch.empty(0, pair[1])
        for pair in pairs
    }


# ----------------------------------------------------------------------------------------------
# Early-exit encoding at one size (Eq. 1); deploy/funnel.py uses the sizes (Eq. 14)


def encode(model, tokenizer, texts, pair, pooling="cls", max_length=128, batch_size=64,
           normalize=False, progress=None):
    """Eq. 1 at one size: e^(n,d) of every text, (N, d), running only the first n layers (early
    exit). Nine parameters: encode_2d's keywords, at one pair."""
    if isinstance(texts, str):
        raise ValueError("texts is one string: pass a list of strings")
    pair = sb.check_pairs([pair], model.config.num_hidden_layers, model.config.hidden_size)[0]
    return encode_2d(model, tokenizer, list(texts), [pair], pooling, max_length, batch_size,
                     normalize, progress)[pair]
