"""Export one (n, d) size of a 2D Matryoshka encoder as a standalone model (README Eq. 1).

    python -m deploy.export                                     # packaged MiniLM, its smallest pair
    python -m deploy.export --model_name_or_path out/srl --pair 2x24 --output_dir out/srl-2x24

The folder holds the first n layers only (config num_hidden_layers = n) and the tokenizer, so
`AutoModel.from_pretrained(folder)`, then pooling and [:d], gives e^(n,d) without this project;
starbucks_config.json records the pair, pooling and similarity (evaluate.py reads it), and a
sentence-transformers layout (modules.json, 1_Pooling/, config_sentence_transformers.json with
truncate_dim = d) lets `SentenceTransformer(folder)` give the same vectors. The script checks
that the exported model's embeddings equal embed_2d's on real text and prints the size on disk.
"""
import glob
import json
import os
from dataclasses import asdict

import torch
import transformers
from transformers import AutoConfig, AutoModel

import data
import models
import starbucks as sb


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL,
                   help="model folder or packaged model name")
    p.add_argument("--pair", default=None,
                   help="LAYERxDIM to export, e.g. 2x24; default: the checkpoint's smallest pair")
    p.add_argument("--output_dir", default="output/export")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default=None,
                   help="default: the checkpoint's, else mean")
    p.add_argument("--similarity", choices=("dot", "cos"), default=None,
                   help="default: the checkpoint's, else cos")
    p.add_argument("--max_seq_length", type=data.positive_int, default=256,
                   help="sentence-transformers' truncation length")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="write into a non-empty --output_dir")
    return p.parse_args(argv)


def weights_size(folder):
    """Bytes of the weight files (safetensors or PyTorch) in a model folder."""
    return sum(
        os.path.getsize(f) for pattern in ("*.safetensors", "*.bin")
        for f in glob.glob(os.path.join(folder, pattern)))


def write_sentence_transformers_files(folder, hidden_size, d, pooling, similarity, max_seq_length):
    """modules.json (Transformer, Pooling), 1_Pooling/config.json, sentence_bert_config.json and
    config_sentence_transformers.json. No Normalize module: it would act before truncate_dim, so
    cosine models record similarity_fn_name 'cosine' instead (cosine re-normalises the d
    coordinates)."""
    modules = [{
        "idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"
    }, {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling_config = {
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last", "include_prompt": True}
    files = {
        "modules.json": modules,
        os.path.join("1_Pooling", "config.json"): pooling_config, "sentence_bert_config.json": {
            "max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "truncate_dim": d, "prompts": {}, "default_prompt_name": None,
            "similarity_fn_name": "cosine" if similarity == "cos" else "dot"}}
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)


def main(argv=None):
    args = parse_args(argv)
    path = models.resolve_model_path(args.model_name_or_path)
    problem = data.output_dir_problem(args.output_dir,
                                      "pass --overwrite_output_dir to replace what is there",
                                      overwrite=args.overwrite_output_dir, source=path, empty=True)
    if problem:
        raise ValueError(problem)
    full, tokenizer = models.load_model(path, "cpu")
    full.eval()
    config, separate = models.read_config(path, full, pooling=args.pooling,
                                          similarity=args.similarity)
    L, H = full.config.num_hidden_layers, full.config.hidden_size
    if separate:
        raise ValueError(f"{path} holds separately trained models (Eq. 7): export one of its "
                         "layer_<n> folders")
    (n, d), = sb.check_pairs(sb.parse_pairs(args.pair) if args.pair else config.pairs[:1], L, H)

    # the sub-model: from_pretrained with num_hidden_layers = n reads only the weights of layers
    # 1..n
    sub_config = AutoConfig.from_pretrained(path)
    sub_config.num_hidden_layers = n
    verbosity = transformers.logging.get_verbosity()
    # the unread weights of layers n+1..L are listed as UNEXPECTED
    transformers.logging.set_verbosity_error()
    model = AutoModel.from_pretrained(path, config=sub_config)
    transformers.logging.set_verbosity(verbosity)
    model.eval()
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, models.CONFIG_FILE), "w") as f:
        exported = sb.StarbucksConfig([(n, d)], config.pooling, config.similarity,
                                      config.temperature)
        json.dump({**asdict(exported), "exported_from": path, "source_layers": L}, f, indent=2)
    max_seq_length = min(args.max_seq_length,
                         getattr(full.config, "max_position_embeddings", args.max_seq_length))
    write_sentence_transformers_files(args.output_dir, H, d, config.pooling, config.similarity,
                                      max_seq_length)

    # check: the folder, reloaded from disk, embeds real text exactly as embed_2d's (n, d) does
    reloaded = AutoModel.from_pretrained(args.output_dir).eval()
    texts = data.lee_documents()[:8]
    expected = models.encode(full, tokenizer, texts, (n, d), config.pooling,
                             max_seq_length)  # (8, d)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length,
                    return_tensors="pt")
    with torch.no_grad():
        hidden = reloaded(**enc).last_hidden_state  # (8, T, H)
    got = sb.pool(hidden, enc["attention_mask"], config.pooling)[:, :d]  # (8, d)
    error = (got - expected).abs().max().item()
    size, source_size = weights_size(args.output_dir), weights_size(path)
    print(f"exported {n}x{d} of {path} ({L} layers x {H}) to {args.output_dir}: pooling "
          f"{config.pooling}, similarity {config.similarity}")
    print(f"max |exported - embed_2d| on {len(texts)} Lee documents: {error:.3g}")
    print(f"weights on disk: {size / 1e6:.1f} MB, source {source_size / 1e6:.1f} MB, ratio "
          f"{size / source_size:.3f} (layers {n}/{L}; the word embeddings are kept whole)")
    if error > 1e-4:
        raise ValueError(f"the exported model's embeddings differ from embed_2d's by {error:.3g}")
    return {"error": error, "size": size, "source_size": source_size}


if __name__ == "__main__":
    data.run_command(main)
