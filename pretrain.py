"""Pre-train a 2D Matryoshka encoder with SMAE, Starbucks Masked Autoencoding (README Eq. 10-13).

    python pretrain.py --output_dir out/smae                     # packaged MiniLM on the embedded real text
    python pretrain.py --train_file corpus.jsonl --max_length 512 --output_dir out/smae
    python pretrain.py --from_scratch --config_overrides num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024 --output_dir out/tiny
    python pretrain.py --save_steps 100 --resume --output_dir out/smae   # continue after a crash
    torchrun --nproc-per-node 8 pretrain.py --preset smae --model_name_or_path bert-base-uncased \\
        --train_file fineweb.jsonl --output_dir out/smae   # the released run's settings
    torchrun --nproc-per-node 4 pretrain.py --output_dir out/smae       # 4 GPUs, DDP over encoder and heads
    python finetune.py --model_name_or_path out/smae --output_dir out/smae_srl   # then SRL as usual

Text: one document per line, or JSONL with a 'text' field; each document is cut into consecutive
crops of --max_length tokens ([CLS] and [SEP] included). Saves the encoder with save_pretrained
(AutoModel, finetune.py and evaluate.py load it unchanged), its tokenizer, starbucks_config.json,
and smae_heads.pt beside it: the MLM head and the MAE decoder layer, kept out of the encoder's
weights. Every checkpoint-<step> folder is such a folder too, plus what --resume needs.
Reads top to bottom: settings, data, model, optimizer, loop, save.
"""
import contextlib
import math
import os
import sys
from dataclasses import dataclass

import data  # torch-free: the command line is checked before torch loads


HEADS_FILE = "smae_heads.pt"

# Every hyperparameter of the released SMAE run (github.com/ielab/Starbucks at 2a3b24f:
# smae/README.md, smae/pretrain_smae.sh on 4 nodes x 2 GPUs); an explicit flag still wins. Global
# batch 512 = 32 per device x 2 accumulation steps x 8 GPUs: on fewer processes, raise
# --gradient_accumulation_steps. Crops of 512 tokens: their MLMDataset keeps
# tokenizer.model_max_length (512) - 2 pieces, plus [CLS] and [SEP]. Hugging Face's defaults where
# the command has none: seed 42, max_grad_norm 1. The schedule is always cosine here (their
# --lr_scheduler_type cosine). Not in the preset: the model (their bert-base-uncased) and the data
# (FineWeb sample-100BT): pass --model_name_or_path and --train_file.
PRESETS = {
    "smae": dict(objective="smae", max_length=512, mlm_probability=0.2, decoder_mlm_probability=0.4,
                 per_device_train_batch_size=32, gradient_accumulation_steps=2, learning_rate=1e-4,
                 weight_decay=0.001, warmup_ratio=0.05, num_train_epochs=1.0, bf16=True,
                 save_steps=10000, logging_steps=100, seed=42, max_grad_norm=1.0),
}
RELEASED_GLOBAL_BATCH = 512


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="every hyperparameter of the authors' released SMAE run; flags given "
                        "explicitly override it")
    p.add_argument("--model_name_or_path", default=data.DEFAULT_MODEL,
                   help="model folder or packaged model name")
    p.add_argument(
        "--from_scratch", action="store_true",
        help="random initialisation with the config (and vocabulary) of --model_name_or_path")
    p.add_argument("--config_overrides", default=None,
                   help="with --from_scratch, the size: e.g. num_hidden_layers=4,hidden_size=256,"
                        "num_attention_heads=4,intermediate_size=1024")
    p.add_argument("--tokenizer_name", default=None,
                   help="tokenizer folder or WordPiece vocab.txt; default: the model's")
    p.add_argument(
        "--train_file", default=None,
        help="plain text (one document per line) or JSONL with 'text'; default: embedded real text")
    p.add_argument("--output_dir", default="output/pretrain")
    p.add_argument("--pairs", default=None,
                   help="LAYERxDIM list, e.g. 2x32,4x64; default: the paper's shape for the model")
    p.add_argument("--max_length", type=int, default=128, help="tokens per crop (the paper: 512)")
    p.add_argument("--mlm_probability", type=float, default=0.2,
                   help="encoder masking rate (the authors' flag name)")
    p.add_argument("--decoder_mlm_probability", type=float, default=0.4,
                   help="MAE decoder masking rate; its set contains the encoder's")
    p.add_argument("--objective", choices=("smae", "mlm_2d", "mlm"), default="smae",
                   help="smae: Eq. 13; mlm_2d: the sliced MLM of every pair without the MAE "
                        "decoder (the authors' BertFor2DMatryoshkaMaskedLM); mlm: plain MLM at the"
                        " full pair (the paper's ablations)")
    data.add_training_arguments(p, learning_rate=1e-4, weight_decay=0.001, warmup_ratio=0.05)
    p.add_argument("--gradient_accumulation_steps", type=data.positive_int, default=1,
                   help="micro-batches of --per_device_train_batch_size per optimizer step; the "
                        "loss is the mean over the masked tokens of all of them (steps count "
                        "optimizer steps)")
    args, given = data.parse_with_preset(p, argv, PRESETS)
    if data.bf16_problem(args.bf16):
        p.error(data.bf16_problem(args.bf16))
    if args.config_overrides and not args.from_scratch:
        p.error("--config_overrides needs --from_scratch (a checkpoint keeps its own size)")
    if args.max_length < 3:
        p.error("--max_length must be at least 3 ([CLS], one token, [SEP])")
    if not 0 < args.mlm_probability <= args.decoder_mlm_probability <= 1:
        p.error(
            "need 0 < --mlm_probability <= --decoder_mlm_probability <= 1 (encoder set inside "
            "decoder set)"
        )
    problem = data.output_dir_problem(
        args.output_dir,
        "pass --resume to continue it or --overwrite_output_dir to start over there", args.resume,
        args.overwrite_output_dir, source=args.model_name_or_path)
    for problem in (problem, data.model_problem(args.model_name_or_path),
                    args.train_file and not os.path.isfile(args.train_file)
                    and f"--train_file {args.train_file}: no such file"):
        if problem:
            p.error(problem)
    return args


if __name__ == "__main__":  # --help, a bad flag or a missing path answer before torch loads
    data.run_command(parse_args)

import safetensors  # noqa: E402
import torch  # noqa: E402 (here, below parse_args: --help and bad paths answer before torch loads)
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402


@dataclass
class PretrainArguments(training.TrainingArguments):
    """The shared flags plus pre-training's own: accumulation, masking rates, objective."""
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (Hugging Face's name)
    mlm_probability: float = 0.2  # the encoder's masking rate (the authors' name)
    decoder_mlm_probability: float = 0.4  # the MAE decoder's; its set contains the encoder's
    objective: str = "smae"  # or the ablations mlm_2d, mlm


def cosine_schedule(step, total, warmup):
    """Linear warmup to 1, then cosine decay to 0 (as transformers'
    get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class SMAE(torch.nn.Module):
    """The encoder and its SMAE heads as one module whose forward is the
    loss (Eq. 13), for one DDP over both.

    The vocabulary decoder reads the encoder's word embeddings (tied, Eq. 10): one parameter, in the
    encoder, that DDP all-reduces once with the sum of both uses' gradients.
    """

    def __init__(self, encoder, heads, pairs, objective="smae"):
        super().__init__()
        self.encoder, self.heads, self.pairs, self.objective = encoder, heads, pairs, objective
        # the ablations have no MAE decoder: keep it out of the optimizer and of DDP
        if objective != "smae":
            heads.decoder_layer.requires_grad_(False)

    def forward(self, input_ids, attention_mask, labels, decoder_input_ids, decoder_labels,
                token_counts=None):
        if self.objective == "smae":
            return sb.smae_loss(self.encoder, self.heads, input_ids, attention_mask, labels,
                                decoder_input_ids, decoder_labels, self.pairs,
                                token_counts=token_counts)
        # mlm: the full pair alone
        pairs = self.pairs if self.objective == "mlm_2d" else [self.pairs[-1]]
        return sb.mlm_2d_loss(self.encoder, self.heads, input_ids, attention_mask, labels, pairs,
                              token_counts[0] if token_counts else None)


def masked_batch(crops, tokenizer, is_subword, seed, mlm_probability=0.2,
                 decoder_mlm_probability=0.4):
    """The global batch's (input_ids, attention_mask, labels, decoder_input_ids, decoder_labels),
    all (B, T)."""
    input_ids, attention_mask, maskable = training.batch_tensors(crops, tokenizer.pad_token_id,
                                                                 tokenizer.all_special_ids)
    enc_ids, labels, dec_ids, dec_labels = training.whole_word_masking(
        input_ids, maskable, is_subword, tokenizer.mask_token_id, seed, mlm_probability,
        decoder_mlm_probability)
    return enc_ids, attention_mask, labels, dec_ids, dec_labels


def training_step(net, batch, device, accumulation=1):
    """Eq. 13 on this rank's rows of the global batch -> the global batch's loss; gradients in
    .grad.

    Every term of the loss is a mean over masked tokens, and the ranks' slices hold different
    numbers of them, so averaging the ranks' own means would not give the global mean. Every rank
    masked the whole global batch and so knows its counts: each rank divides its sums of
    cross-entropies by the global counts (smae_loss's token_counts), and the ranks' losses add up to
    exactly the single-process loss. DDP averages gradients over ranks: backward of loss x world
    size. accumulation k: the global batch is k micro-batches of consecutive rows, each split over
    the ranks in turn, with the same global counts, so their losses and gradients add up to the
    whole batch's (DDP synchronises the gradients at the last one only).
    """
    rank, world_size = training.rank_and_world_size()
    labels, decoder_labels = batch[2], batch[4]
    token_counts = (int((labels != -100).sum()), int((decoder_labels != -100).sum()))
    rows = len(labels) // accumulation  # a micro-batch: every rank's rows of it
    total = None
    for k in range(accumulation):
        micro = [x[k * rows:(k + 1) * rows] for x in batch]
        mine = [training.shard(x, rank, world_size).to(device) for x in micro]  # (rows / W, T)
        sync = k == accumulation - 1 or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():
            loss = net(*mine, token_counts=token_counts)
            (loss * world_size).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return training.sum_over_ranks(total)


def train(encoder, heads, tokenizer, crops, config, run, flags):
    """The loop: seeded per step (data order by epoch, masks by step); non-finite steps are skipped.

    config: the pairs (and how the saved encoder embeds); run: PretrainArguments; flags: the
    command line's, the run's identity in its checkpoints and written into starbucks_config.json."""
    pairs, output_dir = config.pairs, run.output_dir
    device = next(encoder.parameters()).device
    rank, world_size = training.rank_and_world_size()
    A = run.gradient_accumulation_steps
    B = run.per_device_train_batch_size * world_size * A  # global batch: all ranks' micro-batches
    steps_per_epoch = len(crops) // B  # optimizer steps, as every count of the loop
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(crops)} crops of text are fewer than one batch of {B} "
                             f"({world_size} processes x {run.per_device_train_batch_size} x {A} "
                             f"accumulation steps)")
    total = run.total_steps(steps_per_epoch)
    is_subword = training.subword_flags(tokenizer)
    training.freeze_unreached(encoder, max(n for n, _ in pairs))  # the pooler, layers above
    smae = SMAE(encoder, heads, pairs, run.objective)
    trainable = [p for p in smae.parameters() if p.requires_grad]
    # everything that decides the result: --resume refuses a checkpoint of another run
    identity = training.run_identity(
        flags, world_size, [flags.get("train_file")],
        models.resolve_model_path(flags["model_name_or_path"]))
    optimizer, scheduler, folder, start, train_log = training.start_training(
        encoder, run, cosine_schedule, total, identity, optimized=smae)
    if folder:  # the encoder's weights are restored; the heads are in their own file
        heads.load_state_dict(torch.load(os.path.join(folder, HEADS_FILE), weights_only=True))
    net = training.wrap(smae, device)  # DDP over encoder and heads together under torchrun
    smae.train()

    def save(folder):
        """The loadable encoder folder (models.save_model), plus smae_heads.pt (MLM head, MAE
        decoder layer)."""
        models.save_model(encoder, tokenizer, folder, config, flags)
        torch.save(heads.state_dict(), os.path.join(folder, HEADS_FILE))

    batches = training.global_batches(len(crops), B, start, total, run.seed)
    progress = tqdm(batches, initial=start, total=total, disable=rank != 0, dynamic_ncols=True,
                    desc=f"smae {os.path.basename(output_dir)}")
    for step, indices in progress:
        # every rank draws and masks the whole global batch (masks seeded by step), keeps its rows
        batch = masked_batch([crops[i] for i in indices], tokenizer, is_subword,
                             run.seed * 1_000_003 + step, run.mlm_probability,
                             run.decoder_mlm_probability)
        bf16 = run.bf16 and device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = training_step(net, batch, device, A)  # forward, sb.smae_loss (Eq. 13), backward
        line = training.finish_step(step, loss, trainable, (optimizer, scheduler),  # clip, step
                                    run.max_grad_norm, train_log)
        if train_log.bad_in_row >= run.max_bad_steps or train_log.bad_in_row == total:
            train_log.close()  # too many non-finite steps in a row, or not one step applied
            sys.exit(training.bad_steps_message(step, train_log, output_dir))
        if (step + 1) % run.logging_steps == 0 or step + 1 == total:
            progress.set_postfix(loss=f"{line['loss']:.4f}", skipped=train_log.skipped)
        if run.save_steps and (step + 1) % run.save_steps == 0 and train_log.bad_in_row == 0:
            training.save_training_checkpoint(run, step + 1, save, (optimizer, scheduler),
                                              identity, train_log)  # after a good step
    train_log.close()
    if rank == 0:
        save(output_dir)
        print(f"saved the encoder and its SMAE heads to {output_dir}")


# ----------------------------------------------------------------------------------------------
# Pre-training's inputs: plain text, the encoder to start from, a BERT checkpoint's MLM head

def read_text_file(path, skip_bad_lines=False):
    """Documents of a plain-text file (one per line) or JSONL (a 'text' field
    per record) -> (documents, skipped)."""
    lines = data.Lines(path, skip_bad_lines)
    documents = []
    if data.is_jsonl(path):
        for line_no, record in lines.jsonl():
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                lines.bad(line_no, "no non-empty 'text' field")
                continue
            documents.append(text)
    else:
        documents = [line.strip() for _, line in data.stream_lines(path)]
    if not documents:
        raise data.DataError(f"{path}: no documents")
    return documents, lines.skipped


def load_encoder(name_or_path, device, from_scratch=False, config_overrides=None,
                 tokenizer_name=None):
    """-> (encoder, tokenizer): the checkpoint, or a random one of the
    checkpoint's config plus config_overrides."""
    if not from_scratch:
        model, tokenizer = models.load_model(name_or_path, device)
        if tokenizer_name:
            tokenizer = models.load_tokenizer(tokenizer_name)
    else:
        config = transformers.AutoConfig.from_pretrained(models.resolve_model_path(name_or_path))
        if config_overrides:
            config.update_from_string(config_overrides)
        tokenizer = models.load_tokenizer(tokenizer_name or name_or_path)
        config.vocab_size = len(tokenizer)
        model = transformers.AutoModel.from_config(config).to(device)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's embeddings only "
                         f"{model.get_input_embeddings().weight.shape[0]}")
    return model, tokenizer


def load_mlm_head(heads, path):
    """Copy a BERT checkpoint's prediction head (cls.predictions.*) into
    SMAE heads; False if it has none."""
    file = os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        return False
    with safetensors.safe_open(file, "pt") as f:
        keys = set(f.keys())
        prefix = "cls.predictions."
        names = [
            f"transform.{k}"
            for k in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")
        ]
        if not all(prefix + n in keys for n in names):
            return False
        state = {n: f.get_tensor(prefix + n) for n in names}
        bias = prefix + "bias" if prefix + "bias" in keys else prefix + "decoder.bias"
        state["bias"] = f.get_tensor(bias)
    # the decoder layer keeps its copy of the encoder's layer 1
    heads.load_state_dict(state, strict=False)
    return True


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = training.setup()  # torchrun: one process per GPU; else one process
    torch.manual_seed(args.seed)
    if args.preset and rank == 0:
        print(data.preset_summary(args.preset, PRESETS[args.preset], vars(args)))
    if args.train_file is None:
        documents = data.training_documents()
    else:
        documents, bad = training.read_training_data(read_text_file, args.train_file,
                                                     args.skip_bad_lines)
        if bad and rank == 0:
            print(f"skipped {bad} bad lines of {args.train_file}", file=sys.stderr)
    encoder, tokenizer = load_encoder(args.model_name_or_path, device, args.from_scratch,
                                             args.config_overrides, args.tokenizer_name)
    crops = training.crop_documents(tokenizer, documents, args.max_length)
    L, H = encoder.config.num_hidden_layers, encoder.config.hidden_size
    pairs = (sb.check_pairs(sb.parse_pairs(args.pairs), L, H) if args.pairs
             else sb.default_pairs(L, H))
    heads = sb.SMAEHeads(encoder).to(device)
    from_checkpoint = not args.from_scratch and load_mlm_head(
        heads, models.resolve_model_path(args.model_name_or_path))
    if rank == 0:
        head = "from the checkpoint" if from_checkpoint else "fresh (the checkpoint has none)"
        reads = f" (its loss reads {pairs[-1]} only)" if args.objective == "mlm" else ""
        print(f"{args.objective}: {len(documents)} documents, {len(crops)} crops of <= "
              f"{args.max_length} tokens, pairs {pairs}{reads}, {L} layers x {H}, device {device} "
              f"x {world_size} processes; MLM head {head}, its vocabulary decoder tied to the word "
              f"embeddings")
    # the MAE sentence vector is the CLS one
    config = sb.StarbucksConfig(pairs, pooling="cls", similarity="dot")
    if args.preset and rank == 0:
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
        if batch != RELEASED_GLOBAL_BATCH:
            print(f"--preset {args.preset}: the global batch is {batch} ({world_size} processes); "
                  f"the released run's was {RELEASED_GLOBAL_BATCH} (8 GPUs): raise "
                  f"--gradient_accumulation_steps")
    run = PretrainArguments.from_flags(args)
    train(encoder, heads, tokenizer, crops, config, run, vars(args))
    training.cleanup()


if __name__ == "__main__":
    data.run_command(main)
