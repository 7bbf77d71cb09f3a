"""finetune.py: every method trains and saves a loadable model; the batches are the same for all
methods."""
import json
import os
import random
import re
import shlex

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import data
import metrics
import finetune
import models
import starbucks as sb
import training


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    words = "coffee tea milk water juice bread rice beans soup salad".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("train") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            w = words[i % len(words)]
            f.write(
                json.dumps({
                    "query": f"what is {w}", "positive_passages": [{
                        "docid": str(i), "title": w, "text": f"{w} is food"}],
                    "negative_passages": [{
                        "docid": f"n{j}", "title": "", "text": f"{rng.choice(words)} is not it"}
                                          for j in range(3)]}) + "\n")
    return str(path)


def run(tiny_model_dir, train_file, out, *extra):
    finetune.main([
        "--model_name_or_path", tiny_model_dir, "--train_file", train_file, "--output_dir",
        str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--pairs", "2x16,4x32",
        "--train_group_size", "3", *extra])


def test_grad_cache_through_finetune_trains_the_weights_the_plain_step_trains(
        tmp_path, tiny_model_dir, train_file):
    """--grad_cache_chunk in the loop itself: the same loss and gradients, so the same weights
    (within float error: the chunks' matmuls are smaller), and the same logged losses."""
    # dropout off: the plain step draws one mask per batch, GradCache one per chunk
    model_dir = str(tmp_path / "no_dropout")
    AutoModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    weights, losses = {}, {}
    for name, extra in (("plain", []), ("cached", ["--grad_cache_chunk", "2"])):
        run(model_dir, train_file, tmp_path / name, "--learning_rate", "1e-3", *extra)
        weights[name] = AutoModel.from_pretrained(tmp_path / name).state_dict()
        losses[name] = [json.loads(line)["loss"] for line in open(tmp_path / name /
                                                                 "train_log.jsonl")]
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-4)
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["cached"][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["srl", "2dmse", "2dmse_retrieval", "mrl", "full", "symmetric"])
def test_each_method_trains_and_saves_a_loadable_model(tmp_path, tiny_model_dir, train_file,
                                                       method):
    run(tiny_model_dir, train_file, tmp_path, "--method", method)
    model = AutoModel.from_pretrained(tmp_path)
    before = AutoModel.from_pretrained(tiny_model_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before.state_dict()[n])]
    assert changed  # the optimiser moved the weights
    saved = json.load(open(tmp_path / "starbucks_config.json"))
    assert saved["pairs"] == [[2, 16], [4, 32]] and saved["training_arguments"]["method"] == method
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)


def test_separate_trains_one_model_per_layer_touching_only_its_layers(tmp_path, tiny_model_dir,
                                                                      train_file):
    run(tiny_model_dir, train_file, tmp_path, "--method", "separate")
    saved = json.load(open(tmp_path / "starbucks_config.json"))
    assert saved["separate"] == {"2": "layer_2", "4": "layer_4"}
    before = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    layer2 = AutoModel.from_pretrained(tmp_path / "layer_2").state_dict()
    # Eq. 7 trains (2, H): layers 3 and 4 are never run, so they keep their initial weights
    assert all(
        torch.equal(layer2[k], before[k]) for k in before
        if k.startswith(("encoder.layer.2.", "encoder.layer.3.")))
    assert not torch.equal(layer2["encoder.layer.0.attention.self.query.weight"],
                           before["encoder.layer.0.attention.self.query.weight"])


def test_separately_trained_folder_evaluates_each_pair_with_its_layers_model(
        tmp_path, tiny_model_dir, train_file):
    run(tiny_model_dir, train_file, tmp_path, "--method", "separate")
    docs = ["coffee is hot", "tea is hot", "rice is food", "soup is warm", "water is cold"]
    sts = ("sts", ([docs[0], docs[1], docs[2], docs[3]], [docs[1], docs[2], docs[3], docs[4]], [
        3.0, 1.0, 2.0, 0.5]))
    together = metrics.evaluate_model(str(tmp_path), {"toy": sts}, metrics.EvalSettings(),
                                      torch.device("cpu"))[1]
    assert set(together["toy"]) == {"2x16", "4x32"}
    # each pair equals evaluating that layer's own model at that pair alone
    for n, d in [(2, 16), (4, 32)]:
        alone = metrics.evaluate_model(str(tmp_path / f"layer_{n}"), {"toy": sts},
                                       metrics.EvalSettings(pairs=f"{n}x{d}"),
                                       torch.device("cpu"))[1]
        assert together["toy"][f"{n}x{d}"] == alone["toy"][f"{n}x{d}"]


def test_scored_pairs_train_with_cosent(tmp_path, tiny_model_dir):
    path = tmp_path / "sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a b {i}\tc d {i}\t{i % 5}\n"
                                                              for i in range(8)))
    run(tiny_model_dir, str(path), tmp_path / "out", "--method", "srl")
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    with pytest.raises(ValueError, match="needs query/passage data"):
        run(tiny_model_dir, str(path), tmp_path / "out2", "--method", "mrl")


def test_same_batches_for_every_method(tmp_path, tiny_model_dir, train_file, monkeypatch):
    """Rows of a table differ only by the loss: every method's training steps see the same token
    ids."""
    seen, real_embed = {}, sb.embed_2d

    def recording(model, input_ids, *rest):  # the loop embeds the queries, then the passages
        seen.setdefault(method, []).append(input_ids.tolist())
        return real_embed(model, input_ids, *rest)
    monkeypatch.setattr(sb, "embed_2d", recording)
    for method in ("srl", "full", "2dmse", "mrl"):
        run(tiny_model_dir, train_file, tmp_path / method, "--method", method)
    # two steps of two different batches: queries and passages of each
    assert len(seen["srl"]) == 4 and seen["srl"][0] != seen["srl"][2]
    assert seen["full"] == seen["srl"] and seen["2dmse"] == seen["srl"] and seen["mrl"] == seen[
        "srl"]
    kind, records, _ = data.read_training_file(train_file)
    queries, passages, _ = training.batch_texts(records, kind, [0, 5, 7], 3, random.Random(11))
    # each query's positive first
    assert len(passages) == 9 and passages[0] == records[0]["positives"][0]


def test_bad_inputs_get_clear_errors(tmp_path, tiny_model_dir, train_file):
    with pytest.raises(ValueError, match="layer 9 is outside"):
        run(tiny_model_dir, train_file, tmp_path, "--pairs", "2x16,9x32")
    with pytest.raises(ValueError, match="sorted"):
        run(tiny_model_dir, train_file, tmp_path, "--pairs", "4x32,2x16")
    no_negs = tmp_path / "pairs.tsv"
    no_negs.write_text("q one\tp one\nq two\tp two\n")
    with pytest.raises(data.DataError, match="no negative passage"):
        run(tiny_model_dir, str(no_negs), tmp_path)
    with pytest.raises(data.DataError, match="fewer than one batch"):
        run(tiny_model_dir, str(no_negs), tmp_path, "--train_group_size", "1")
    # refused while parsing, before torch and transformers load
    with pytest.raises(SystemExit) as e:
        run(str(tmp_path / "nothing"), train_file, tmp_path)
    assert e.value.code == 2
    empty = tmp_path.parent / f"{tmp_path.name}_empty"  # a folder with no model in it
    empty.mkdir()
    with pytest.raises(data.DataError, match="not a model folder"):
        run(str(empty), train_file, tmp_path)
    with pytest.raises(SystemExit):
        run(tiny_model_dir, train_file, tmp_path, "--train_group_size", "0")


def test_linear_schedule_warms_up_then_decays():
    values = [finetune.linear_schedule(s, 10, 2) for s in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0] and values[-1] == pytest.approx(0.125)


def test_real_minilm_srl_steps_on_embedded_data(tmp_path):
    """Slow: three SRL steps of the packaged MiniLM on the embedded inverse-cloze data."""
    finetune.main([
        "--output_dir",
        str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--train_group_size", "2"])
    model = AutoModel.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 6
    saved = json.load(open(tmp_path / "starbucks_config.json"))
    assert [tuple(p) for p in saved["pairs"]] == sb.default_pairs(6, 384)


# ----------------------------------------------------------------------------------------------
# The packaged SmolLM2-135M (slow: real weights, a GGUF file dequantised to fp32)

def test_packaged_smollm2_is_a_base_decoder_with_2d_embeddings():
    model, tokenizer = models.load_model("smollm2-135m", torch.device("cpu"))
    model.eval()
    # AutoModel: no LM head
    assert type(model).__name__ == "LlamaModel" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    texts = [
        "Coffee is brewed from roasted beans.", "Tea",
        "The central bank raised interest rates again today."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][1].sum() < enc["attention_mask"].shape[1]  # "Tea" is right-padded
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
        assert len(out.hidden_states) == 31  # embeddings + 30 blocks
        e = sb.embed_2d(model, enc["input_ids"], enc["attention_mask"], [(15, 288), (30, 576)],
                        "last")
        # pre-LN: the final RMSNorm is applied to the intermediate layer too, then the last REAL
        # token
        mid = model.norm(out.hidden_states[15])
        last = enc["attention_mask"].sum(1) - 1
        torch.testing.assert_close(e[(15, 288)], mid[torch.arange(3), last, :288])
        torch.testing.assert_close(e[(30, 576)], out.last_hidden_state[torch.arange(3), last])
        alone = tokenizer(texts[1:2], return_tensors="pt")  # no padding at all
        e_alone = sb.embed_2d(model, alone["input_ids"], alone["attention_mask"], [(30, 576)],
                              "last")[(30, 576)]
        torch.testing.assert_close(e[(30, 576)][1:2], e_alone, atol=1e-4, rtol=1e-4)
    # evaluate.py takes the packaged name too: no starbucks_config.json, so the backbone's default
    # pairs, mean pooling
    config, _ = models.read_config(models.resolve_model_path("smollm2-135m"), model)
    assert config.pairs == sb.default_pairs(30, 576) and config.pooling == "mean"


def test_a_negative_is_never_repeated_to_fill_a_group(tmp_path, tiny_model_dir):
    """A triplet file has one hard negative: the default group becomes 2; asking for 4 is refused by
    name."""
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text("".join(
        json.dumps({"anchor": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}) + "\n"
        for i in range(8)))
    kind, records, group_size = finetune.load_training_records(str(triplets), None, False)
    assert kind == "contrastive" and group_size == 2
    queries, passages, _ = training.batch_texts(records, kind, [0, 1], group_size, random.Random(0))
    assert passages == ["p0", "n0", "p1", "n1"]
    with pytest.raises(
            data.DataError,
            match=r"--train_group_size 4 needs 3 hard negatives per query, but 8 queries"):
        finetune.load_training_records(str(triplets), 4, False)
    out = tmp_path / "out"
    finetune.main([
        "--model_name_or_path", tiny_model_dir, "--train_file",
        str(triplets), "--output_dir",
        str(out), "--per_device_train_batch_size", "4", "--max_steps", "1", "--pairs", "2x16,4x32"])
    assert json.load(open(out /
                          "starbucks_config.json"))["training_arguments"]["train_group_size"] == 2


def test_2dmse_and_the_released_kl_train_on_scored_pairs(tmp_path, tiny_model_dir):
    """The paper's STS-B table has 2DMSE; the released low-resource run wraps CoSENT in
    StarbucksLoss (Eq. 5')."""
    path = tmp_path / "sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a b {i}\tc d {i}\t{i % 5}\n"
                                                              for i in range(8)))
    for extra in (["--method", "2dmse"], [
            "--method", "srl", "--kl", "embeddings", "--kl_weight", "0.3"]):
        out = tmp_path / "_".join(extra)
        run(tiny_model_dir, str(path), out, *extra)
        assert os.path.exists(out / "model.safetensors")


def test_presets_set_every_setting_of_a_released_run_and_flags_win(capsys):
    args = finetune.parse_args([
        "--preset", "msmarco-srl", "--learning_rate", "3e-5", "--output_dir", "/nonexistent/x"])
    for name, value in finetune.PRESETS["msmarco-srl"].items():
        if name not in ("learning_rate", "bf16"):
            assert getattr(args, name) == value, name
    assert args.learning_rate == 3e-5 and (args.pooling, args.train_group_size,
                                           args.weight_decay) == ("cls", 8, 0.0)
    # main prints it
    out = data.preset_summary("msmarco-srl", finetune.PRESETS["msmarco-srl"], vars(args))
    assert "--preset msmarco-srl: --method srl" in out and "--passage_max_len 196" in out
    if not torch.cuda.is_available():
        assert not args.bf16 and "no CUDA bf16, so the run is in fp32" in out


@pytest.mark.parametrize("preset", ["allnli-srl", "stsb-srl"])
def test_the_sts_presets_read_512_tokens_as_sentence_transformers(preset, tmp_path, vocab_path):
    """sts/train_starbucks.py sets no max_seq_length: sentence-transformers infers it from the model
    (bert-base-uncased: 512 positions, tokenizer.model_max_length 512) and cuts both texts there."""
    from sentence_transformers.models import Transformer
    from transformers import BertConfig, BertModel, BertTokenizer
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)  # bert-base-uncased's
    BertModel(config).save_pretrained(tmp_path)
    BertTokenizer(vocab=vocab_path, model_max_length=512).save_pretrained(tmp_path)
    inferred = Transformer(str(tmp_path)).max_seq_length
    args = finetune.parse_args(["--preset", preset, "--output_dir", "/nonexistent/x"])
    assert args.query_max_len == args.passage_max_len == inferred == 512
    args = finetune.parse_args(["--preset", preset, "--query_max_len", "64",
                                "--output_dir", "/nonexistent/x"])
    assert (args.query_max_len, args.passage_max_len) == (64, 512)


@pytest.mark.parametrize("document", ["README.md", "docs/departures.md", "docs/training.md"])
def test_every_preset_command_the_docs_print_parses(document, tmp_path, monkeypatch):
    """Each `finetune.py --preset ...` (or `--preset ...` flags) in the table of released runs is
    accepted as written, with its model folder and training file in place."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, document), encoding="utf-8").read()
    commands = [c for c in re.findall(r"`([^`]*--preset [a-z][^`]*)`", text)
                if c.startswith(("finetune.py ", "--preset ")) and "|" not in c]  # not a choice
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command.removeprefix("finetune.py "))
        for flag, value in zip(argv, argv[1:]):
            if flag == "--model_name_or_path":
                os.makedirs(value, exist_ok=True)
            elif flag == "--train_file":
                open(value, "w").close()
        try:
            finetune.parse_args(argv + ["--output_dir", str(tmp_path / "out")])
        except (SystemExit, ValueError) as e:
            raise AssertionError(f"{document}: `{command}` is refused ({e})") from None
    assert commands or document != "README.md"


def test_2dmse_honours_an_explicit_kl_weight_and_refuses_a_kl_it_has_not():
    """Matryoshka2dLoss weighs its KL (over embeddings); the retrieval 2DMSE its KL over scores."""
    out = ["--output_dir", "/nonexistent/x"]
    with pytest.raises(ValueError, match="--method 2dmse has only the KL over embeddings"):
        finetune.parse_args(["--method", "2dmse", "--kl", "scores", *out])
    with pytest.raises(ValueError, match="2dmse_retrieval has only the KL over candidate scores"):
        finetune.parse_args(["--method", "2dmse_retrieval", "--kl=embeddings", *out])
    args = finetune.parse_args(["--method", "2dmse", "--kl", "embeddings", "--kl_w", "0.5", *out])
    assert args.kl_weight == 0.5
    args = finetune.parse_args(["--method", "2dmse_retrieval", "--kl", "scores", "--kl_weight", "2",
                                *out])
    assert args.kl_weight == 2.0
    assert finetune.parse_args(["--method", "srl", "--kl", "scores", *out]).kl == "scores"
    # allnli-srl's 0.3 is StarbucksLoss's weight; 2dmse keeps Matryoshka2dLoss's default 1
    args = finetune.parse_args(["--preset", "allnli-srl", "--method", "2dmse", *out])
    assert args.kl_weight == 1.0
    torch.manual_seed(0)
    q = {(n, 32): torch.randn(4, 32) for n in range(1, 5)}
    p = {(n, 32): torch.randn(12, 32) for n in range(1, 5)}
    for kind, gold in (("contrastive", None), ("scored", torch.rand(4))):
        p_kind = p if kind == "contrastive" else {k: v[:4] for k, v in p.items()}
        loss = {}
        for w in (0.0, 0.5, 1.0):
            config = sb.StarbucksConfig([(2, 16), (4, 32)], "mean", "cos", 0.05)
            _, loss_fn = finetune.method_loss("2dmse", config, (4, 32), kind, "embeddings", w)
            loss[w] = float(loss_fn(q, p_kind, gold, torch.Generator().manual_seed(3)))
        assert loss[1.0] > loss[0.0]
        assert loss[0.5] == pytest.approx((loss[0.0] + loss[1.0]) / 2, rel=1e-5)
