"""Every message tells the truth: a flag that a message suggests exists in the script that can show
it.

The messages a script can show are the strings of the functions its main() and parse_args() reach
(calls and references through the project's imports, followed statically); each `--flag` named in
them must be one of the script's own flags, as its --help lists them.
"""
import ast
import contextlib
import glob
import importlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*(?:-[a-z0-9_]+)*)")
# pip's and torchrun's flags, named in install and launch advice
NOT_OURS = {"no-deps", "nproc-per-node"}


def _modules():
    """{module name: path} of the project's Python files (top level and folders), tests left out."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
    names = {}
    for path in paths:
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ("tests", "bench", ".venv", "docs"):
            continue
        names[rel[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return names


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read()) for name, path in MODULES.items()}
SCRIPTS = sorted(name for name, tree in TREES.items()
                 if any(isinstance(n, ast.FunctionDef) and n.name == "main"
                        for n in tree.body) and any(
                            isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
                            for n in tree.body))


def _aliases(tree):
    """{local name: module or module.function} of every import in a module (at any depth)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or
                      a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                names[a.asname or a.name] = full
    return names


def _definitions():
    """{'module.name': function or class node} of every top-level definition (methods under their
    class)."""
    found = {}
    for module, tree in TREES.items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[f"{module}.{node.name}"] = node
    return found


DEFINITIONS = _definitions()


def _references(module, node):
    """The project definitions that a function or class body names (called or passed as values)."""
    aliases, refs = _aliases(TREES[module]), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            target = aliases.get(n.id, f"{module}.{n.id}")
            refs.add(target)
        elif isinstance(n, ast.Attribute) and isinstance(n.value,
                                                         ast.Name) and n.value.id in aliases:
            refs.add(f"{aliases[n.value.id]}.{n.attr}")
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute):
            refs.add(f"{ast.unparse(n.value)}.{n.attr}")  # package.module.function
    return {r for r in refs if r in DEFINITIONS}


SAYS = {"print", "exit", "error", "warn", "write"}  # calls that show a message
# a returned message, not argv
TEXT = (ast.Constant, ast.JoinedStr, ast.BinOp, ast.IfExp, ast.BoolOp)


def _message_strings(node):
    """The strings a body raises, prints, exits with, warns or returns as a message."""
    roots = []
    for n in ast.walk(node):
        if isinstance(n, ast.Raise) and n.exc is not None:
            roots.append(n.exc)
        elif isinstance(n, ast.Call) and (getattr(n.func, "attr", None) or
                                          getattr(n.func, "id", None)) in SAYS:
            roots.extend(n.args)
        elif isinstance(n, ast.Return) and isinstance(n.value, TEXT):
            roots.append(n.value)
    return [
        c.value for r in roots for c in ast.walk(r)
        if isinstance(c, ast.Constant) and isinstance(c.value, str)]


def messages_of(script):
    """{flag: where} of the flags named in what a script's main() and parse_args() can reach."""
    todo = [
        f"{script}.{name}" for name in ("main", "parse_args") if f"{script}.{name}" in DEFINITIONS]
    seen, flags = set(), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = name.rsplit(".", 1)[0]
        node = DEFINITIONS[name]
        for text in _message_strings(node):
            for flag in FLAG.findall(text):
                flags.setdefault(flag, name)
        other_scripts = {f"{s}.{f}" for s in SCRIPTS if s != script for f in ("main", "parse_args")}
        todo.extend(_references(module, node) - seen - other_scripts)  # a command's own messages
    return flags


def script_flags(script):
    """The flags a script's --help lists."""
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(FLAG.findall(out.getvalue()))


def test_the_scripts_are_found():
    assert {"finetune", "pretrain", "evaluate"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_a_message_suggests_exists_in_that_script(script):
    accepted = script_flags(script)
    wrong = {flag: where for flag, where in messages_of(script).items()
             if flag not in accepted and flag not in NOT_OURS}
    assert not wrong, f"{script} can suggest flags it does not have: {wrong}"


def test_the_message_check_sees_a_shared_module_s_advice():
    """The check follows calls into other modules: finetune reaches the bad-steps advice."""
    assert "learning_rate" in messages_of("finetune")


# ---- the messages of issue 24, each as a user meets it ----------------------------------------

import data  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402
import metrics  # noqa: E402


@pytest.mark.parametrize("first_row", ["text1,text2,label", "A man plays.,A man is playing.,five"])
def test_an_unknown_header_or_a_word_score_is_blamed_on_row_one(tmp_path, first_row):
    path = tmp_path / "sts.csv"
    path.write_text(f"{first_row}\nA cat sits.,A cat is sitting.,4.5\nA dog.,A car.,0.5\n")
    with pytest.raises(data.DataError) as e:
        metrics.read_sts_file(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}:1: ") and "sentence1,sentence2,score" in message
    assert repr(first_row.split(",")[-1]) in message  # the column that was not a score


def test_an_unknown_qrels_header_names_the_known_ones(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("q\td\trel\nq1\td1\t1\n")
    with pytest.raises(data.DataError,
                       match=r":1: header \['q', 'd', 'rel'\] not known: BEIR qrels start"):
        metrics.read_qrels(str(path))


def test_an_unknown_layout_lists_the_known_layouts(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"foo": 1}\n')
    with pytest.raises(data.DataError,
                       match="known layouts: Tevatron .*sentence-transformers .*scored"):
        data.read_training_file(str(path))


def test_a_bad_line_names_the_skip_flag_only_where_the_script_has_it(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"foo": 1}\n')
    with pytest.raises(data.BadLine) as e:
        data.read_training_file(str(path))
    assert "--skip_bad_lines" not in str(e.value)  # evaluate.py reads with the same reader
    with pytest.raises(data.BadLine, match=r"\(pass --skip_bad_lines to skip such lines\)$"):
        finetune.main(["--train_file", str(path), "--output_dir", str(tmp_path / "out")])


def test_a_beir_folder_without_the_split_names_the_splits_it_has(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    (tmp_path / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(data.DataError, match=r"test.tsv: no such file; qrels there: \['dev.tsv'\] "
                                             r"\(pick one with --beir_split\)"):
        metrics.read_beir_queries(str(tmp_path))


@pytest.mark.parametrize("argv", [["--learning_rate", "-1e-4"], ["--learning_rate=-1e-4"],
                                  ["--learning_rate", "-.5"], ["--warmup_ratio", "-2"]])
def test_negative_numbers_reach_the_range_check(argv, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(argv + ["--output_dir", "unused"])
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_evaluate_refuses_a_folder_with_results_unless_told_to_overwrite(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--output_dir", str(tmp_path)])
    assert ("holds another run (results.json); pass --overwrite_output_dir"
            in capsys.readouterr().err)
    assert evaluate.parse_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_s_default_once(script):
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    # one per flag, as printed
    entries = re.split(r"\n(?=  -)", out.getvalue().split("options:", 1)[1])
    for entry in entries:
        entry = " ".join(entry.split())
        if entry.startswith("--") and not entry.startswith("-h"):
            assert entry.lower().count("default") == 1, f"{script}: {entry}"


def test_a_preset_names_its_bert_base_pairs_and_what_to_pass_on_a_smaller_model(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\nA man plays.\tA man is playing.\t4.5\nA cat.\tA "
                    "dog.\t1.0\n")
    with pytest.raises(
            ValueError, match=r"--preset stsb-srl trains BERT-base's pairs .* has 6 layers x 384: "
            r"pass --pairs \(.*--pairs 1x12,2x24,3x48,4x96,5x192,6x384\)"):
        finetune.main([
            "--preset", "stsb-srl", "--train_file",
            str(path), "--output_dir",
            str(tmp_path / "o")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_keeps_the_example_lines_as_written(script):
    """A backslash at a line's end in a docstring joins the lines unless escaped: the examples stay
    copyable."""
    doc = TREES[script].body[0].value.value
    for line in doc.splitlines():
        assert "         --" not in line.strip(), f"{script}: a continuation was joined: {line}"
    source = open(MODULES[script], encoding="utf-8").read().split('"""', 2)[1]
    # each continuation of the source shows in --help
    assert doc.count("\\\n") == source.count("\\\n")


def test_a_labelled_file_s_header_is_not_an_example_and_unknown_fields_are_named(tmp_path):
    from classification import datasets
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\n")
    assert datasets.read_labelled_file(str(path)) == (["good film", "bad film"], [1, 0],
                                                      ["neg", "pos"])
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"sentence": "good film", "label": "pos"}\n')
    with pytest.raises(data.DataError, match=r"needs 'text' and 'label' fields, got \['label', "
                                             r"'sentence'\]"):
        datasets.read_labelled_file(str(jsonl))
