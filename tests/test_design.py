"""Design rules of the package's data flow: a configuration is resolved in one place, prediction has one loop,
no private name crosses a module boundary, and a rule's number is defined once."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'nnunet_lite'


def modules() -> dict[str, ast.Module]:
    "{module name: its syntax tree} of the package, without the generated `_modidx.py` and `__init__.py`."
    return {p.stem: ast.parse(p.read_text(encoding='utf-8'), str(p))
            for p in sorted(PACKAGE.glob('*.py')) if p.name not in ('_modidx.py', '__init__.py')}


def calls_of(tree: ast.Module, name: str) -> list[int]:
    "Lines where `name(...)` or `x.name(...)` is called."
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == name]


def test_no_private_name_is_imported_from_another_module():
    "`from .module import _name` nowhere: what another module needs is public (documented) where it lives."
    def ours(node) -> bool:
        if not isinstance(node, ast.ImportFrom): return False
        return bool(node.level) or (node.module or '').startswith('nnunet_lite')
    found = [f"nnunet_lite/{module}.py:{node.lineno} imports {alias.name} from {node.module}"
             for module, tree in modules().items() for node in ast.walk(tree) if ours(node)
             for alias in node.names if alias.name.startswith('_')]
    assert not found, '\n'.join(found)


def test_only_the_plans_resolve_a_configuration():
    """The plans' inheritance (`inherits_from`) and resampling entries are read in plans.py alone; every other
    module gets a `Configuration`."""
    def plan_key(node) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and (node.value == 'inherits_from' or node.value.startswith('resampling_fn_')))
    readers = [f"nnunet_lite/{module}.py:{node.lineno}" for module, tree in modules().items()
               if module != 'plans' for node in ast.walk(tree) if plan_key(node)]
    assert not readers, 'plan entries read outside plans.py:\n' + '\n'.join(readers)
    def entry(node) -> bool:   # plans['configurations'][name]
        return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Subscript)
                and isinstance(node.value.slice, ast.Constant) and node.value.slice.value == 'configurations')
    entries = [f"nnunet_lite/{module}.py:{node.lineno}" for module, tree in modules().items()
               if module != 'plans' for node in ast.walk(tree) if entry(node)]
    assert not entries, "plans['configurations'][name] read outside plans.py:\n" + '\n'.join(entries)


def test_the_sliding_window_runs_in_one_place():
    "Fold ensembles, fold validation, uncertainty members and a cascade's first stage all predict through it."
    callers = [f"{module}:{line}" for module, tree in modules().items()
               for line in calls_of(tree, 'sliding_window_predict')]
    assert len(callers) == 1 and callers[0].startswith('inference:'), callers


def test_the_anisotropy_threshold_is_defined_once():
    "ANISOTROPY_THRESHOLD (3) is assigned in plans.py only; nothing else spells the number out as a default."
    assigned = [module for module, tree in modules().items() for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'ANISOTROPY_THRESHOLD'
                                                        for t in node.targets)]
    assert assigned == ['plans'], assigned
    spelled = [f"{p.name}:{i}" for p in PACKAGE.glob('*.py') if p.name != '_modidx.py'
               for i, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1)
               if re.search(r'anisotropy_threshold: float = 3', line)]
    assert not spelled, spelled
