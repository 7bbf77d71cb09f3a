"""Pre-train a 2D Matryoshka encoder with SMAE, Starbucks Masked Autoencoding (README Eq. 10-13).

    python pretrain.py --output_dir out/smae                     # packaged MiniLM on the embedded real text
    python pretrain.py --train_file corpus.jsonl --max_length 512 --output_dir out/smae
    python pretrain.py --from_scratch --config_overrides num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024 --output_dir out/tiny
    python pretrain.py --save_steps 100 --resume --output_dir out/smae   # continue after a crash
    torchrun --nproc-per-node 4 pretrain.py --output_dir out/smae       # 4 GPUs, DDP over encoder and heads
    python finetune.py --model_name_or_path out/smae --output_dir out/smae_srl   # then SRL as usual

Text: one document per line, or JSONL with a 'text' field; each document is cut into consecutive
crops of --max_length tokens ([CLS] and [SEP] included). Saves the encoder with save_pretrained
(AutoModel, finetune.py and evaluate.py load it unchanged), its tokenizer, starbucks_config.json,
and smae_heads.pt beside it: the MLM head and the MAE decoder layer, kept out of the encoder's
weights. Every checkpoint-<step> folder is such a folder too, plus what --resume needs.
Reads top to bottom: settings, data, model, optimizer, loop, save.
"""
import argparse
import math
import os
import sys

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertTokenizer

import checkpoints
import data
import distributed
import finetune
import starbucks as sb

HEADS_FILE = "smae_heads.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL, help="model folder or packaged model name")
    p.add_argument("--from_scratch", action="store_true",
                   help="random initialisation with the config (and vocabulary) of --model_name_or_path")
    p.add_argument("--config_overrides", default=None,
                   help="with --from_scratch, the size: e.g. num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024")
    p.add_argument("--tokenizer_name", default=None, help="tokenizer folder or WordPiece vocab.txt; default: the model's")
    p.add_argument("--train_file", default=None, help="plain text (one document per line) or JSONL with 'text'; default: embedded real text")
    p.add_argument("--output_dir", default="output/pretrain")
    p.add_argument("--pairs", default=None, help="LAYERxDIM list, e.g. 2x32,4x64; default: the paper's shape for the model")
    p.add_argument("--max_length", type=int, default=128, help="tokens per crop (the paper: 512)")
    p.add_argument("--mlm_probability", type=float, default=0.2, help="encoder masking rate (the authors' flag name)")
    p.add_argument("--decoder_mlm_probability", type=float, default=0.4, help="MAE decoder masking rate; its set contains the encoder's")
    finetune.add_training_arguments(p, learning_rate=1e-4, weight_decay=0.001, warmup_ratio=0.05)
    args = p.parse_args(argv)
    finetune.check_training_arguments(p, args)
    if args.config_overrides and not args.from_scratch:
        p.error("--config_overrides needs --from_scratch (a checkpoint keeps its own size)")
    if args.max_length < 3:
        p.error("--max_length must be at least 3 ([CLS], one token, [SEP])")
    if not 0 < args.mlm_probability <= args.decoder_mlm_probability <= 1:
        p.error("need 0 < --mlm_probability <= --decoder_mlm_probability <= 1 (encoder set inside decoder set)")
    return args


def load_tokenizer(name_or_path):
    """A tokenizer folder, or a WordPiece vocab.txt (BertTokenizer(vocab=...); vocab_file= would give all [UNK])."""
    if os.path.isfile(name_or_path):
        return BertTokenizer(vocab=name_or_path)
    try:
        return AutoTokenizer.from_pretrained(data.resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise data.DataError(f"{name_or_path} has no loadable tokenizer: {e}") from None


def load_encoder(args, device):
    """-> (encoder, tokenizer): the checkpoint, or a random one of the checkpoint's config plus --config_overrides."""
    if not args.from_scratch:
        model, tokenizer = finetune.load_model(args.model_name_or_path, device)
        if args.tokenizer_name:
            tokenizer = load_tokenizer(args.tokenizer_name)
    else:
        config = AutoConfig.from_pretrained(data.resolve_model_path(args.model_name_or_path))
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path)
        config.vocab_size = len(tokenizer)
        model = AutoModel.from_config(config).to(device)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's embeddings only "
                         f"{model.get_input_embeddings().weight.shape[0]}")
    return model, tokenizer


def load_mlm_head(heads, path):
    """Copy a BERT checkpoint's prediction head (cls.predictions.*) into heads; False if it has none."""
    file = os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        return False
    with safe_open(file, "pt") as f:
        keys = set(f.keys())
        prefix = "cls.predictions."
        names = [f"transform.{k}" for k in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")]
        if not all(prefix + n in keys for n in names):
            return False
        state = {n: f.get_tensor(prefix + n) for n in names}
        bias = prefix + "bias" if prefix + "bias" in keys else prefix + "decoder.bias"
        state["bias"] = f.get_tensor(bias)
    heads.load_state_dict(state, strict=False)  # the decoder layer keeps its copy of the encoder's layer 1
    return True


def subword_flags(tokenizer):
    """(V,) bool: True for WordPiece continuation pieces ('##...'), the glue of whole-word masking."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    flags = torch.tensor([t.startswith("##") for t in tokens])
    if not flags.any():
        raise ValueError("whole-word masking needs a WordPiece vocabulary ('##' continuation pieces)")
    return flags


def crop_documents(tokenizer, documents, max_length):
    """Every document cut into consecutive crops of max_length - 2 tokens, each wrapped in [CLS] ... [SEP]."""
    pieces = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    size = max_length - 2
    return [[tokenizer.cls_token_id] + ids[i:i + size] + [tokenizer.sep_token_id]
            for ids in pieces for i in range(0, len(ids), size)]


def cosine_schedule(step, total, warmup):
    """Linear warmup to 1, then cosine decay to 0 (as transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_tensors(crops, pad_token_id, special_ids):
    """Right-padded (input_ids, attention_mask, maskable) (B, T); maskable = real, non-special tokens."""
    T = max(len(c) for c in crops)
    input_ids = torch.full((len(crops), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(crops), T), dtype=torch.long)
    for i, c in enumerate(crops):
        input_ids[i, :len(c)] = torch.tensor(c)
        attention_mask[i, :len(c)] = 1
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    return input_ids, attention_mask, maskable


class SMAE(torch.nn.Module):
    """The encoder and its SMAE heads as one module whose forward is the loss (Eq. 13), for one DDP over both.

    The vocabulary decoder reads the encoder's word embeddings (tied, Eq. 10): one parameter, in the
    encoder, that DDP all-reduces once with the sum of both uses' gradients.
    """

    def __init__(self, encoder, heads, pairs):
        super().__init__()
        self.encoder, self.heads, self.pairs = encoder, heads, pairs

    def forward(self, input_ids, attention_mask, labels, decoder_input_ids, decoder_labels, token_counts=None):
        return sb.smae_loss(self.encoder, self.heads, input_ids, attention_mask, labels, decoder_input_ids,
                            decoder_labels, self.pairs, token_counts=token_counts)


def masked_batch(crops, tokenizer, is_subword, seed, args):
    """The global batch's (input_ids, attention_mask, labels, decoder_input_ids, decoder_labels), all (B, T)."""
    input_ids, attention_mask, maskable = batch_tensors(crops, tokenizer.pad_token_id, tokenizer.all_special_ids)
    enc_ids, labels, dec_ids, dec_labels = sb.whole_word_masking(
        input_ids, maskable, is_subword, tokenizer.mask_token_id, seed, args.mlm_probability,
        args.decoder_mlm_probability)
    return enc_ids, attention_mask, labels, dec_ids, dec_labels


def training_step(net, batch, device):
    """Eq. 13 on this rank's rows of the global batch -> the global batch's loss; gradients in .grad.

    Every term of the loss is a mean over masked tokens, and the ranks' slices hold different
    numbers of them, so averaging the ranks' own means would not give the global mean. Every rank
    masked the whole global batch and so knows its counts: each rank divides its sums of
    cross-entropies by the global counts (smae_loss's token_counts), and the ranks' losses add up to
    exactly the single-process loss. DDP averages gradients over ranks: backward of loss x world size.
    """
    rank, world_size = distributed.rank_and_world_size()
    labels, decoder_labels = batch[2], batch[4]
    token_counts = (int((labels != -100).sum()), int((decoder_labels != -100).sum()))
    mine = [distributed.shard(x, rank, world_size).to(device) for x in batch]  # (B / world size, T) each
    loss = net(*mine, token_counts=token_counts)
    (loss * world_size).backward()
    return distributed.sum_over_ranks(loss.detach())


# Changing these between a run and its --resume would change the batches (data order, crops, masks).
RESUME_MUST_MATCH = ("seed", "per_device_train_batch_size", "max_length", "mlm_probability", "decoder_mlm_probability")


def train(args, encoder, heads, tokenizer, crops, pairs, config):
    """The loop: seeded per step (data order by epoch, masks by step); non-finite steps are skipped."""
    device = next(encoder.parameters()).device
    rank, world_size = distributed.rank_and_world_size()
    B = args.per_device_train_batch_size * world_size  # the global batch: every rank's crops together
    steps_per_epoch = len(crops) // B
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(crops)} crops of text are fewer than one batch of {B} "
                             f"({world_size} processes x {args.per_device_train_batch_size})")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = math.ceil(args.warmup_ratio * total)
    is_subword = subword_flags(tokenizer)
    distributed.freeze_unreached(encoder, max(n for n, _ in pairs))  # the pooler, layers above the pairs
    smae = SMAE(encoder, heads, pairs)
    trainable = [p for p in smae.parameters() if p.requires_grad]
    optimizer = finetune.adamw(smae, args.learning_rate, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))
    run_settings = {**{k: getattr(args, k) for k in RESUME_MUST_MATCH}, "world_size": world_size}
    folder, start, train_log = checkpoints.resume_or_start(args.output_dir, args.resume, encoder, optimizer,
                                                           scheduler, run_settings, total)
    if folder:  # the encoder's weights are restored; the heads are in their own file
        heads.load_state_dict(torch.load(os.path.join(folder, HEADS_FILE), weights_only=True))
    net = distributed.wrap(smae, device)  # DDP over encoder and heads together under torchrun
    smae.train()
    progress = tqdm(finetune.global_batches(len(crops), B, start, total, args.seed), initial=start, total=total,
                    disable=rank != 0, dynamic_ncols=True, desc=f"smae {os.path.basename(args.output_dir)}")
    for step, indices in progress:
        # every rank draws and masks the whole global batch (masks seeded by step) and keeps its rows
        batch = masked_batch([crops[i] for i in indices], tokenizer, is_subword, args.seed * 1_000_003 + step, args)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            loss = training_step(net, batch, device)
        line = finetune.finish_step(step, loss, trainable, optimizer, scheduler, args, train_log, args.output_dir)
        if (step + 1) % args.logging_steps == 0 or step + 1 == total:
            progress.set_postfix(loss=f"{line['loss']:.4f}", skipped=train_log.skipped)
        if args.save_steps and (step + 1) % args.save_steps == 0 and train_log.bad_in_row == 0:  # after a good step
            checkpoints.save_training_checkpoint(args.output_dir, step + 1,
                                                 lambda folder: save(encoder, heads, tokenizer, folder, config, args),
                                                 optimizer, scheduler, run_settings, train_log, args.save_total_limit)
    train_log.close()
    if rank == 0:
        save(encoder, heads, tokenizer, args.output_dir, config, args)


def save(encoder, heads, tokenizer, output_dir, config, args):
    """finetune.save's loadable encoder folder, plus smae_heads.pt (the MLM head and the MAE decoder layer)."""
    finetune.save(encoder, tokenizer, output_dir, config, args)
    torch.save(heads.state_dict(), os.path.join(output_dir, HEADS_FILE))


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world_size, device = distributed.setup()  # torchrun: one process per GPU; else one process
    if args.train_file is None:
        documents = data.training_documents()
    else:
        documents, bad = data.read_text_file(args.train_file, args.skip_bad_lines)
        if bad and rank == 0:
            print(f"skipped {bad} bad lines of {args.train_file}", file=sys.stderr)
    encoder, tokenizer = load_encoder(args, device)
    crops = crop_documents(tokenizer, documents, args.max_length)
    L, H = encoder.config.num_hidden_layers, encoder.config.hidden_size
    pairs = sb.check_pairs(sb.parse_pairs(args.pairs), L, H) if args.pairs else sb.default_pairs(L, H)
    heads = sb.SMAEHeads(encoder).to(device)
    from_checkpoint = not args.from_scratch and load_mlm_head(heads, data.resolve_model_path(args.model_name_or_path))
    if rank == 0:
        print(f"smae: {len(documents)} documents, {len(crops)} crops of <= {args.max_length} tokens, pairs {pairs}, "
              f"{L} layers x {H}, device {device} x {world_size} processes; MLM head "
              f"{'from the checkpoint' if from_checkpoint else 'initialised fresh (the checkpoint has none)'}, "
              f"its vocabulary decoder tied to the word embeddings")
    config = sb.StarbucksConfig(pairs, pooling="cls", similarity="dot")  # the MAE sentence vector is the CLS one
    train(args, encoder, heads, tokenizer, crops, pairs, config)
    distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
