"""Bad flags and malformed inputs: a non-zero exit, one line naming the flag or the file:line, no
traceback, and nothing written (docs/training.md, When things go wrong)."""
import json
import os

import pytest

import data
import evaluate
import finetune
import pretrain
from deploy import export

SCRIPTS = {
    "finetune": finetune.main, "pretrain": pretrain.main, "evaluate": evaluate.main,
    "export": export.main}


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _beir(folder, corpus_line):
    _write(folder / "corpus.jsonl", '{"_id": "d1", "text": "coffee"}\n' + corpus_line + "\n")
    _write(folder / "queries.jsonl", '{"_id": "q1", "text": "what is coffee"}\n')
    _write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return str(folder)


def _cases(tmp):
    """(script, argv, what the one error line must contain)."""
    triplet = json.dumps({"anchor": "q", "positive": "p", "negative": "n"})
    return [
        ("finetune", ["--temperature", "0"], "--temperature: must be positive"),
        ("finetune", ["--temperature=-0.05"], "--temperature: must be positive"),
        ("finetune", ["--warmup_ratio", "2"], "--warmup_ratio: must be in [0, 1)"),
        ("finetune", ["--learning_rate=-1e-5"], "--learning_rate: must be positive"),
        ("finetune", ["--learning_rate", "nan"], "--learning_rate: must be a finite number"),
        ("finetune", ["--bf16"], "--bf16 needs a CUDA GPU"),
        ("finetune", ["--per_device_train_batch_size",
                      "0"], "--per_device_train_batch_size: must be at least 1"),
        ("finetune", ["--save_steps=-1"], "--save_steps: must be 0 (off) or positive"),
        ("finetune", [
            "--train_file",
            _write(tmp / "bad.jsonl",
                   triplet + "\n{not json\n" + triplet + "\n")], "bad.jsonl:2: not valid JSON"),
        ("pretrain", ["--bf16"], "--bf16 needs a CUDA GPU"),
        ("pretrain", ["--mlm_probability", "0.5", "--decoder_mlm_probability",
                      "0.4"], "--mlm_probability"),
        ("evaluate", ["--depth", "0"], "--depth: must be at least 1"),
        ("evaluate", ["--sts_files",
                      _write(tmp / "sts.tsv",
                             "a b\tc d\t3.0\ne f\tg h\tnan\n")], "sts.tsv:2: score"),
        ("evaluate", ["--beir_dirs",
                      _beir(tmp / "noid", '{"text": "a passage without an id"}')],
         "corpus.jsonl:2: a BEIR record needs '_id'"),
        ("export", ["--pair", "9x8", "--overwrite_output_dir"], "layer 9 is outside"),
        ("export", ["--pair", "2x24"], "is not empty; pass --overwrite_output_dir"), ]


def test_every_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    for script, argv, expected in _cases(tmp_path):
        before = sorted(os.listdir(out))
        with pytest.raises(SystemExit) as stop:
            data.run_command(lambda: SCRIPTS[script]([*argv, "--output_dir", str(out)]))
        err = capsys.readouterr().err
        message = stop.value.code if isinstance(stop.value.code,
                                                str) else err.strip().splitlines()[-1]
        assert stop.value.code not in (0, None), (script, argv)
        assert "\n" not in message.strip() and message.startswith(
            "error: ") and expected in message, (argv, message)
        assert "Traceback" not in err
        assert sorted(os.listdir(out)) == before and (
            out / "keep.txt").read_text() == "an earlier result", argv


def test_a_run_whose_every_step_was_skipped_fails_and_saves_no_model(tmp_path, monkeypatch):
    """Every step non-finite (e.g. a broken loss): the untouched base model must not come out as the
    result."""
    import starbucks as sb
    real_loss = sb.srl_loss

    def poisoned(*args, **kwargs):
        return real_loss(*args, **kwargs) * float("nan")
    monkeypatch.setattr(sb, "srl_loss", poisoned)
    with pytest.raises(SystemExit,
                       match=r"stopped at step 2: 2 steps in a row had a non-finite loss"):
        finetune.main([
            "--output_dir",
            str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps",
            "0", "--max_bad_steps", "5"])
    assert not os.path.exists(tmp_path / "model.safetensors")


@pytest.mark.parametrize("flag_type, good, bad", [
    (data.positive_int, ("1", 1), ["0", "-3", "1.5", "x"]),
    (data.non_negative_int, ("0", 0), ["-1", "nan"]),
    (data.positive_float, ("1e-5", 1e-5), ["0", "-1", "inf", "nan"]),
    (data.non_negative_float, ("0", 0.0), ["-0.1", "inf"]),
    (data.fraction, ("0.1", 0.1), ["1", "-0.01", "nan"]),
])
def test_flag_types_accept_their_range_and_refuse_the_rest(flag_type, good, bad):
    assert flag_type(good[0]) == good[1] and type(flag_type(good[0])) is type(good[1])
    for text in bad:
        with pytest.raises(data.argparse.ArgumentTypeError):
            flag_type(text)
