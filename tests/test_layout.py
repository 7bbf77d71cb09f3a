"""The house rules (README, Where things are): scripts are leaves, helpers take values, nothing is
written twice."""
import ast
import glob
import importlib
import importlib.util
import re
import sys
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run as commands (`python finetune.py`, `python -m classification.classify`); import none of them
SCRIPTS = {"finetune", "pretrain", "evaluate", "classification.classify", "recipe.compute_optimal",
           "deploy.export"}
# the toolkit: packages in folders, which import the reference; the reference imports them lazily
TOOLKIT = sorted(
    os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "*", "__init__.py")))
REFERENCE = [
    "starbucks", "finetune", "pretrain", "evaluate", "data", "metrics", "models", "training"]


def _python_files():
    """{name: path} of every project file outside tests (top level, bench/ and the toolkit's
    folders)."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    paths += [p for folder in TOOLKIT for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]
    return {os.path.relpath(p, ROOT): p for p in sorted(paths)}


def _is_script(relpath):
    """The commands: the scripts, bench/bench_*.py and bench/reproduce.py (bench/timing.py is a
    module)."""
    name = os.path.basename(relpath)
    return os.path.splitext(relpath)[0].replace(
        os.sep, ".") in SCRIPTS or (relpath.startswith("bench" + os.sep) and
                                    (name.startswith("bench_") or name == "reproduce.py"))


def _tree(path):
    return ast.parse(open(path, encoding="utf-8").read(), filename=path)


@pytest.mark.parametrize("relpath", sorted(_python_files()))
def test_no_file_imports_a_script_except_to_run_its_main(relpath):
    """A module never imports a script; a script may import another only to call its main(argv), as
    a command."""
    tree = _tree(_python_files()[relpath])
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update({a.asname or a.name: a.name for a in node.names if a.name in SCRIPTS})
        elif isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
            raise AssertionError(f"{relpath}: `from {node.module} import ...` (import the module, "
                                 "call its main)")
        elif isinstance(node, ast.ImportFrom):  # from classification import classify
            imported.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                             if f"{node.module}.{a.name}" in SCRIPTS})
    if not imported:
        return
    assert _is_script(
        relpath), f"{relpath} is a module and imports the script(s) {sorted(imported.values())}"
    uses = [
        (n.value.id, n.attr) for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in imported
    ]
    assert all(attr == "main" for _, attr in uses), f"{relpath} uses a script beyond main: {uses}"


@pytest.mark.parametrize("relpath", sorted(_python_files()))
def test_no_helper_takes_the_command_line_namespace(relpath):
    """Only a script's main and parse_args see the argparse namespace; nothing builds a fake one."""
    tree = _tree(_python_files()[relpath])
    for node in ast.walk(tree):
        if isinstance(node,
                      (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ("main",
                                                                                     "parse_args"):
            names = {a.arg for a in node.args.args + node.args.kwonlyargs}
            assert not names & {"args", "opts", "namespace"
                                }, f"{relpath}:{node.lineno} {node.name} takes {names}"
        if isinstance(node, ast.Attribute) and node.attr in ("Namespace", "SimpleNamespace"):
            raise AssertionError(f"{relpath}:{node.lineno} builds a {node.attr}")
        if isinstance(node, ast.ImportFrom) and any(a.name == "SimpleNamespace"
                                                    for a in node.names):
            raise AssertionError(f"{relpath}:{node.lineno} imports SimpleNamespace")


def _code_lines(path):
    """(line number, stripped line) of the lines that carry code: no blanks, comments, imports or
    lone brackets."""
    lines = []
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        text = line.strip()
        if text and not text.startswith(
            ("#", "import ", "from ")) and text not in (")", "]", "}", '"""'):
            lines.append((number, text))
    return lines


def test_no_block_of_six_lines_is_repeated_between_files():
    """What two files share lives in one module: no 6 consecutive code lines appear in two files."""
    window, seen, repeated = 6, {}, []
    for relpath, path in _python_files().items():
        lines = _code_lines(path)
        for i in range(len(lines) - window + 1):
            block = tuple(text for _, text in lines[i:i + window])
            where = seen.setdefault(block, (relpath, lines[i][0]))
            if where[0] != relpath:
                repeated.append(f"{where[0]}:{where[1]} and {relpath}:{lines[i][0]}")
    assert not repeated, "repeated blocks: " + "; ".join(repeated[:5])


def _module_level_imports(node):
    """The modules a file imports when it is imported: every import outside a function body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            yield from (a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            yield child.module or ""
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _module_level_imports(child)


def test_the_toolkit_is_found():
    assert {"classification", "recipe", "deploy", "large_batch"} <= set(TOOLKIT)


@pytest.mark.parametrize("folder", TOOLKIT + ["bench"])
def test_every_toolkit_folder_has_a_readme_naming_each_of_its_files(folder):
    readme = open(os.path.join(ROOT, folder, "README.md"), encoding="utf-8").read()
    for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
        name = os.path.basename(path)
        assert name == "__init__.py" or f"`{name}`" in readme, f"{folder}/README.md: {name}"


def test_bench_layout_follows_module_level_imports_only():
    """The closure of finetune.py: the reference modules it imports at module level, not the
    toolkit its flags load inside functions; the lines are those of its files."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_layout
    modules = bench_layout.project_files()
    reached = bench_layout.closure("finetune", modules)
    assert reached == {"finetune", "data", "models", "starbucks", "training"}
    assert "recipe.flops" in bench_layout.closure("finetune", modules, module_level=False)
    assert bench_layout.line_count(modules["starbucks"]) == len(
        open(modules["starbucks"], encoding="utf-8").read().splitlines())


def test_bench_layout_counts_only_the_definitions_a_script_reaches(tmp_path):
    """A module keeps its header (docstring, imports) and what the script reaches through it,
    directly or through another definition, each with the comment and blank lines above it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_layout
    files = {
        "run.py": 'import tools as t\nfrom starbucks import paper\n\nt.used()\npaper()\n',  # 5
        "tools.py": ('"""Doc."""\nimport os\n\n\n# why\ndef used():\n    return helper()\n\n\n'
                     'def unused():\n    return 1\n\n\ndef helper():\n    return LIMIT\n\n\n'
                     'LIMIT = 3\n'),  # header 2; used 2+3; helper 4; LIMIT 3
        "starbucks.py": "def paper():\n    return 0\n\n\ndef other():\n    return 1\n",  # 6
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    modules = {name[:-3]: str(tmp_path / name) for name in files}
    assert bench_layout.reached_lines("run", modules) == 5 + 6 + 2 + 5 + 4 + 3
    # starbucks.py cut too: no header, paper's 2 lines
    assert bench_layout.reached_lines("run", modules, whole=()) == 5 + 2 + 2 + 5 + 4 + 3


@pytest.mark.parametrize("name", REFERENCE)
def test_the_reference_imports_the_toolkit_only_inside_functions(name):
    """The reference runs without the toolkit's folders: it imports one only in the function that
    serves a flag asking for it (e.g. `--adaptive` -> `from deploy import funnel`), never at module
    level."""
    toolkit = [m for m in _module_level_imports(_tree(os.path.join(ROOT, f"{name}.py")))
               if m.split(".")[0] in TOOLKIT]
    assert not toolkit, f"{name}.py imports {toolkit} at module level"


def test_pip_install_makes_the_reference_and_the_toolkit_importable_from_any_folder(tmp_path):
    """pyproject.toml: `pip install .` installs the 8 reference modules and the toolkit's
    packages."""
    import shutil
    import subprocess
    import sys
    source, site = tmp_path / "source", tmp_path / "site"  # a copy: building leaves ROOT as it is
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "output", "build"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True,
                   capture_output=True)
    code = ("import starbucks, finetune, pretrain, evaluate, data, metrics, models, training; "
            "from index import corpus_index; from classification import cascade; "
            "print(starbucks.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout
    assert out.strip() == str(site / "starbucks.py")


def test_the_reference_is_eight_top_level_files():
    assert sorted(os.path.basename(p)[:-3]
                  for p in glob.glob(os.path.join(ROOT, "*.py"))) == sorted(REFERENCE)


def _readme():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_the_readme_names_every_reference_file_and_each_exists():
    """'Where things are': one row per top-level file, and every folder it names is a package."""
    section = _readme().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `(\w+)\.py` \|", section, re.M))
    assert named == set(REFERENCE)
    for folder in re.findall(r"`(\w+)/`", section):
        assert os.path.isdir(os.path.join(ROOT, folder)), folder


def test_the_readme_api_example_runs(tmp_path):
    """The README's Python example, run as a user pastes it, from another folder."""
    import subprocess
    import sys
    code = _readme().split("```python\n", 1)[1].split("```", 1)[0]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": ROOT})


def _examples():
    """(where, code) of every Python example a reader copies: the indented blocks of each project
    file's docstring that parse as Python and import something, and the ```python blocks of each
    Markdown file (one session: a later block uses what an earlier one imported)."""
    for relpath, path in _python_files().items():
        doc = ast.get_docstring(_tree(path), clean=False) or ""
        for block in re.findall(r"(?:^    .*\n?)+", doc, re.M):
            try:
                tree = ast.parse(textwrap.dedent(block))
            except SyntaxError:  # a shell command
                continue
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
                yield relpath, tree
    for path in glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "*", "*.md")):
        blocks = re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), re.S)
        if blocks:
            yield os.path.relpath(path, ROOT), ast.parse("\n".join(blocks))


def test_every_python_example_names_what_exists():
    """Each `module.name` an example uses, and each `from module import name`, exists: an example
    goes stale when a function moves (this found index/corpus_index.py's, which used metrics.* and
    models.* without importing them, and docs/pretraining.md's, which used training.*)."""
    missing, checked = [], 0
    for where, tree in _examples():
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update({a.asname or a.name: importlib.import_module(a.name)
                                for a in node.names})
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for a in node.names:
                    found = hasattr(module, a.name) or importlib.util.find_spec(
                        f"{node.module}.{a.name}") is not None
                    missing += [] if found else [f"{where}: from {node.module} import {a.name}"]
                    if found:
                        modules[a.asname or a.name] = getattr(
                            module, a.name, None) or importlib.import_module(
                                f"{node.module}.{a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                module = modules.get(node.value.id)
                if module is not None and hasattr(module, "__file__"):
                    checked += 1
                    if not hasattr(module, node.attr):
                        missing.append(f"{where}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                undefined = node.id not in modules and node.id in ("data", "metrics", "models",
                                                                   "training", "sb", "starbucks")
                missing += [f"{where}: {node.id} is used but not imported"] if undefined else []
    assert not missing, missing
    assert checked > 20
