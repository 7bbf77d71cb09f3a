"""The reference's size as a reader meets it (issue 23's measures), from the checkout's files.

    python bench/bench_layout.py

- <script>_closure_lines: the lines of every project file a reference script imports at module
  level, directly or through others, itself included (what a reader opens to follow it). Beside it,
  the same with the imports inside functions (the toolkit a flag may load).
- Beside each closure (printed, no goal): its lines if every module it imports kept only what the
  script reaches through it (its docstring and imports stay; starbucks.py, the paper's math, stays
  whole): how far moving today's code between files, without cutting any, could bring it down.
- starbucks_lines, top_level_py_files, long_code_lines_percent (code lines over 100 characters,
  tests included), functions_with_8_or_more_parameters (self and cls not counted).
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOALS = {"finetune": 2000, "pretrain": 2000, "evaluate": 1800}


def project_files():
    """{module name: path} of every project .py file outside tests/."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
    modules = {}
    for path in paths:
        relative = os.path.relpath(path, ROOT)
        if not relative.startswith(("tests", ".")):
            modules[relative[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return modules


def imported(path, modules, module_level):
    """The project modules that a file imports (at module level only, or anywhere)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} & set(modules)
            found |= {f"{node.module}.{a.name}" for a in node.names} & set(modules)
    return found


def closure(script, modules, module_level=True):
    """The script's module and every project module it reaches through imports."""
    seen, todo = set(), [script]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported(modules[name], modules, module_level)
    return seen


def definitions(path):
    """{top-level name: (its node, (first line, last line))} of a module's functions, classes and
    constants; first: the line after the statement before it (its comments and blank lines go with
    it)."""
    body, found = ast.parse(open(path, encoding="utf-8").read()).body, {}
    for before, node in zip([None] + body, body):
        span = (before.end_lineno + 1 if before else 1, node.end_lineno)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = (node, span)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update({t.id: (node, span) for t in targets if isinstance(t, ast.Name)})
    return found


def module_aliases(path, modules):
    """({name: module} of `import m [as name]`, {name: (module, name there)} of `from m import`),
    at module level."""
    aliases, names = {}, {}
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            names.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    return aliases, names


def reached_lines(script, modules, whole=("starbucks",)):
    """The closure if each definition lived only in files of its users: the script's file, the
    `whole` modules (the paper's math stays one file), and in every other module its header (the
    lines before its first definition) and the definitions the script reaches, as written."""
    defs = {m: definitions(modules[m]) for m in closure(script, modules)}
    imports = {m: module_aliases(modules[m], defs) for m in defs}
    seen, todo = set(), [(script, ast.parse(open(modules[script], encoding="utf-8").read()))]
    while todo:
        module, tree = todo.pop()
        aliases, names = imports[module]
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Name):
                key = (module, node.id) if node.id in defs[module] else names.get(node.id)
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in aliases:
                key = (aliases[node.value.id], node.attr)
            if key and key not in seen and key[1] in defs[key[0]]:
                seen.add(key)
                todo.append((key[0], defs[key[0]][key[1]][0]))
    whole = {script, *whole} & set(defs)
    total = sum(line_count(modules[m]) for m in whole)
    for m in set(defs) - whole:
        spans = {defs[m][name][1] for module, name in seen if module == m}
        first = min((span[0] for _, span in defs[m].values()), default=1)
        if spans:
            total += first - 1 + sum(last - start + 1 for start, last in spans)
    return total


def line_count(path):
    return sum(1 for _ in open(path, encoding="utf-8"))


def main():
    modules = project_files()
    lines = []
    for script, goal in GOALS.items():
        size = {level: sum(line_count(modules[m]) for m in closure(script, modules, level))
                for level in (True, False)}
        print(f"{script}.py: {size[True]} lines at module level "
              f"({', '.join(sorted(closure(script, modules)))}); {size[False]} with the imports "
              f"inside functions")
        print(f"{script}.py: {reached_lines(script, modules)} lines if every module kept only "
              f"what the script reaches (starbucks.py whole)")
        lines.append(f"RATIO {script}_closure_lines {size[True]} goal <={goal}")
    code = long = 0
    many = []
    for path in list(modules.values()) + glob.glob(os.path.join(ROOT, "tests", "*.py")):
        for line in open(path, encoding="utf-8"):
            if line.strip() and not line.strip().startswith("#"):
                code, long = code + 1, long + (len(line.rstrip("\n")) > 100)
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                count = len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                count -= bool(a.args and a.args[0].arg in ("self", "cls"))
                if count >= 8:
                    many.append(f"{os.path.relpath(path, ROOT)}:{node.name} ({count})")
    print("functions with 8 or more parameters:", ", ".join(many))
    lines += [f"RATIO starbucks_lines {line_count(modules['starbucks'])} goal <=550",
              f"RATIO top_level_py_files {len(glob.glob(os.path.join(ROOT, '*.py')))} goal <=8",
              f"RATIO long_code_lines_percent {100 * long / code:.1f} goal <=8",
              f"RATIO functions_with_8_or_more_parameters {len(many)} goal <=5"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
