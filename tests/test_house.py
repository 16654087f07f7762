"""House rules of the package: imports follow the notebook order, lines stay short (the tests' too), every
figure draws from a script."""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / 'tests'
PACKAGE = 'nnunet_lite'
MAX_LINE = 110

_spec = importlib.util.spec_from_file_location('plot_everything', TESTS / 'plot_everything.py')
plot_everything = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_everything)
notebook_modules = plot_everything.notebook_modules   # [(notebook file name, module)] in notebook order


def package_files() -> dict[str, Path]:
    "{module: file} of the package's modules, without the generated `_modidx.py` and `__init__.py`."
    files = sorted(p for p in (ROOT / PACKAGE).rglob('*.py') if p.name not in ('_modidx.py', '__init__.py'))
    return {'.'.join(p.relative_to(ROOT / PACKAGE).with_suffix('').parts): p for p in files}


def package_imports(module: str, path: Path, modules) -> set[tuple[str, int]]:
    "(imported module, line) for every import of a package module anywhere in `path`, in functions too."
    found = set()

    def add(dotted: str, line: int):
        parts = dotted.split('.')
        if parts[0] != PACKAGE: return
        for k in range(len(parts) - 1, 0, -1):          # the longest prefix that names a module
            name = '.'.join(parts[1:k + 1])
            if name in modules:
                if name != module: found.add((name, line))
                return

    here = [PACKAGE, *module.split('.')[:-1]]            # the package this file is in
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names: add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            stem = '.'.join(base + ([node.module] if node.module else []))
            for name in [stem] + [f'{stem}.{alias.name}' for alias in node.names]: add(name, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, 'attr', getattr(node.func, 'id', None))
              in ('import_module', '__import__') and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
    return found


def import_graph() -> dict[str, set[tuple[str, int]]]:
    "{module: {(imported module, line)}} over the package's modules."
    files = package_files()
    return {m: package_imports(m, p, set(files)) for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "The cycles a depth-first search meets, each as [a, b, ..., a], each once."
    cycles, state, path = {}, {}, []

    def visit(node):
        state[node] = 'open'; path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))
                key = tuple(cycle[start:] + cycle[:start])
                cycles.setdefault(key, list(key) + [key[0]])
            elif nxt not in state: visit(nxt)
        state[node] = 'done'; path.pop()

    for node in sorted(graph):
        if node not in state: visit(node)
    return list(cycles.values())


def notebook_number(notebook: str) -> str:
    match = re.match(r'\d+', notebook)
    return match.group(0) if match else notebook


def test_package_imports_have_no_cycle():
    "No chain of imports, top-level or inside functions, leads from a package module back to itself."
    graph = {m: {i for i, _ in imports} for m, imports in import_graph().items()}
    cycles = find_cycles(graph)
    assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(c) for c in cycles)


def test_modules_import_only_modules_of_earlier_notebooks():
    "Each module (one per notebook's `#| default_exp`) imports only modules exported by earlier notebooks."
    order = notebook_modules()
    assert order, f"no `#| default_exp` cell found in {ROOT / 'nbs'}"
    position = {m: k for k, (_, m) in enumerate(order)}
    number = {m: notebook_number(nb) for nb, m in order}
    graph = import_graph()
    problems = [f"{PACKAGE}/{m.replace('.', '/')}.py: no notebook has `#| default_exp {m}`"
                for m in graph if m not in position]
    for module, imports in graph.items():
        for imported, line in sorted(imports):
            if module in position and imported in position and position[imported] >= position[module]:
                problems.append(f"{module} imports {imported} ({number[imported]} after {number[module]}) "
                                f"at {module.replace('.', '/')}.py:{line}")
    assert not problems, 'imports against the notebook order:\n' + '\n'.join(problems)


def _fresh_python(args, **kw) -> subprocess.CompletedProcess:
    "Run the interpreter of this test session on `args` in the repository, with the Agg backend."
    env = {**os.environ, 'MPLBACKEND': 'Agg'}
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        env.setdefault(var, '/tmp/nnunet_lite_unused')
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def test_modules_import_in_notebook_order_in_a_fresh_interpreter():
    "`import nnunet_lite.data; import nnunet_lite.viz; ...` in notebook order succeeds in a new interpreter."
    code = '; '.join(f'import {PACKAGE}.{m}' for _, m in notebook_modules())
    result = _fresh_python(['-c', code])
    failed = result.returncode != 0
    assert not failed, f"python -c {code!r} failed:\n{result.stderr[-4000:]}"


def code_lines(path: Path):
    "(line number, line) of a module, without the `__all__` list nbdev generates (it wraps that at 160)."
    in_all = False
    for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        in_all = in_all or line.startswith('__all__ = [')
        if not in_all: yield i, line
        elif line.rstrip().endswith(']'): in_all = False


def assert_no_long_line(lines_of_files):
    "`lines_of_files`: {file: its (line number, line) pairs}. None of the lines is longer than MAX_LINE."
    long = [(f"{p.relative_to(ROOT)}:{i}", len(line))
            for p, lines in lines_of_files.items() for i, line in lines if len(line) > MAX_LINE]
    assert not long, (f"{len(long)} lines longer than {MAX_LINE} characters (first 20):\n"
                      + '\n'.join(f"{where} ({n} characters)" for where, n in long[:20]))


def test_no_line_longer_than_110_characters():
    "No line of the package's modules (the generated `_modidx.py` and `__all__` aside) is over MAX_LINE long."
    assert_no_long_line({p: code_lines(p) for p in package_files().values()})


def test_no_line_of_the_tests_longer_than_110_characters():
    "Nor of the tests: every tests/*.py, the helpers (cli_runner.py, reference_oracle.py, ...) included."
    files = sorted(TESTS.glob('*.py'))
    assert files
    assert_no_long_line({p: enumerate(p.read_text(encoding='utf-8').splitlines(), 1) for p in files})


def test_every_drawing_function_draws_from_a_plain_script(tmp_path):
    "tests/plot_everything.py, in a fresh interpreter with Agg, draws a PNG with every drawing function."
    result = _fresh_python([str(TESTS / 'plot_everything.py'), str(tmp_path)])
    failed = result.returncode != 0
    assert not failed, f"plot_everything.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    assert list(tmp_path.glob('*.png')), f"plot_everything.py wrote no PNG into {tmp_path}"
