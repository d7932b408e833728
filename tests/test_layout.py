"""The layout a reader relies on: the paper's files flat at the top and short, the harness out of the
method's way (imported only by main()), no import cycles, no re-export shims, an update and a loop
without rank or run-folder bookkeeping. Source inspection only: nothing is run."""
import ast
import glob
import os
import re

from conftest import ROOT

PAPER = ["steptool.py", "rollout.py", "env.py", "policy.py", "reward.py", "ppo.py", "sft.py", "eval.py"]


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def modules():
    """{module name: path} of every module of ours: the paper files and the harness."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "harness", "*.py")))
    return {os.path.relpath(p, ROOT)[:-3].replace(os.sep, "."): p for p in paths}


def imports(path, skip_main):
    """(module imported, line) of every import in the file, function-level ones too; with skip_main,
    not those inside a function named main (an entry point starting the harness)."""
    tree, out = ast.parse(open(path).read()), []

    def visit(node, in_main):
        for child in ast.iter_child_nodes(node):
            inside = in_main or (isinstance(child, ast.FunctionDef) and child.name == "main")
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.extend((f"{child.module}.{a.name}", child.lineno, inside) for a in child.names)
                out.append((child.module, child.lineno, inside))
            visit(child, inside)
    visit(tree, False)
    return [(m, line) for m, line, inside in out if not (skip_main and inside)]


def test_the_paper_files_are_flat_at_the_top_each_short_and_together_under_two_thousand_lines():
    lines = {f: len(source(f).splitlines()) for f in PAPER}
    assert all(n <= 400 for n in lines.values()), lines
    assert sum(lines.values()) <= 2000, (sum(lines.values()), lines)
    top = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert top == set(PAPER), top ^ set(PAPER)   # everything else lives in harness/


def test_the_paper_files_import_the_harness_only_inside_main():
    for f in PAPER:
        outside = [(m, line) for m, line in imports(os.path.join(ROOT, f), skip_main=True) if m.split(".")[0] == "harness"]
        assert not outside, (f, outside)


def test_there_is_no_import_cycle_counting_function_level_imports():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = {m for m, _ in imports(path, skip_main=os.path.dirname(path) == ROOT)}
        graph[name] = {d for d in deps if d in mods and d != name}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(graph[n]):
            assert state.get(d) != "open", " -> ".join(stack + [n, d])
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_no_module_re_exports_what_another_defines():
    for name, path in modules().items():
        assert "noqa: F401" not in open(path).read(), name


def function_lines(file, name, cls=None):
    src = source(file)
    tree = ast.parse(src)
    nodes = tree.body if cls is None else next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == name)
    return src.splitlines()[fn.lineno - 1:fn.end_lineno]


def test_ppo_update_reads_as_one_process():
    body = "\n".join(function_lines("ppo.py", "update"))
    assert not re.search(r"\b(ranks|world|rank|STANDIN|dist|lockstep|all_true)\b", body), body


def test_at_most_a_tenth_of_the_training_loop_is_run_folder_ranks_or_timing():
    """Counted by the mention of the run (folder, resume, checkpoints, logging), ranks or time. on a line
    of steptool.train, signature and docstring included."""
    lines = function_lines("steptool.py", "train")
    infra = [line for line in lines if re.search(r"\brun\.|\branks\b|\btime\.", line)]
    assert len(infra) <= 0.1 * len(lines), (len(infra), len(lines), infra)


def test_the_readme_gives_each_paper_files_line_count_as_it_is():
    readme = source("README.md")
    for f in PAPER:
        row = re.search(rf"^\| \d \| `{re.escape(f)}` \|.*\| (\d+) \|$", readme, re.M)
        assert row and int(row.group(1)) == len(source(f).splitlines()), (f, row and row.group(0))
    total = sum(len(source(f).splitlines()) for f in PAPER)
    assert f"lines): {total} lines." in readme.replace("\n", " ").replace("  ", " ") or f"): {total} lines" in readme, total
