"""Store the notebooks' outputs (figures, tables, printed numbers); check they are those of the current code.

    python tools/notebook_outputs.py                 # run every notebook of nbs/ and store its outputs
    python tools/notebook_outputs.py 03_plans 08     # only these (names as `nnlite course` takes them)
    python tools/notebook_outputs.py --check         # exit 1 naming each stale notebook and cell (CI)

Each notebook runs top to bottom in a fresh kernel from nbs/; nothing is stored when a cell fails. A stored
notebook records what its outputs came from:
- each code cell, in its metadata, `source_hash`: a hash of the cell's source when it ran;
- the notebook, in its metadata, `outputs_of`: a hash of each `nnunet_lite` module it imports (and the modules
  those import) when it ran.
`--check` recomputes both. A cell edited, added or moved without a rerun, or a module changed under a
notebook that uses it, makes the check fail and names what to rerun. Figures are drawn at a modest resolution
and stored as palette PNGs; progress bars are left out; a widget keeps the image it carries (the slice
viewer's first frame), so GitHub and a JupyterLab without a kernel show it.
"""
import argparse
import ast
import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nnunet_lite.course import WIDGET_VIEW, cell_text, execute_notebook

ROOT = Path(__file__).resolve().parent.parent
NBS, PACKAGE = ROOT / "nbs", ROOT / "nnunet_lite"
FIGURE_DPI = 72      # inline figures: a 10 x 3.6 inch figure is 720 x 259 pixels
PREAMBLE = f"""
%config InlineBackend.figure_formats = ['png']
import matplotlib
matplotlib.rcParams['figure.dpi'] = {FIGURE_DPI}
"""


def source_hash(cell) -> str:
    return hashlib.sha256(cell_text(cell).encode()).hexdigest()[:16]


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def imported_modules(code: str) -> set:
    "The `nnunet_lite` modules a piece of code imports (absolute or, in a module of the package, relative)."
    found = set()
    try: tree = ast.parse(code)
    except SyntaxError:   # a cell with magics: fall back to the import lines
        lines = [line for line in code.splitlines() if re.match(r"\s*(from|import)\s", line)]
        tree = ast.parse("\n".join(lines) or "pass")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level: module = "nnunet_lite" + ("." + module if module else "")
            if module == "nnunet_lite":
                found.update(f"nnunet_lite.{a.name}" for a in node.names)
            elif module.startswith("nnunet_lite."):
                found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nnunet_lite."))
    return {m for m in found if (PACKAGE / f"{m.split('.', 1)[1]}.py").is_file()}


def module_closure(modules: set) -> dict:
    "{module: hash of its file} for `modules` and every package module they import, recursively."
    todo, seen = sorted(modules), {}
    while todo:
        m = todo.pop()
        if m in seen: continue
        path = PACKAGE / f"{m.split('.', 1)[1]}.py"
        seen[m] = file_hash(path)
        todo += sorted(imported_modules(path.read_text()) - set(seen))
    return dict(sorted(seen.items()))


def notebook_modules(nb) -> dict:
    code = [cell_text(c) for c in nb["cells"] if c["cell_type"] == "code"]
    return module_closure(set().union(*[imported_modules(c) for c in code]) if code else set())


def small_png(b64: str) -> str:
    "A PNG re-encoded with a 256-colour palette (figures of slices and curves lose nothing visible)."
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    if image.mode in ("RGBA", "LA"):   # inline figures are opaque (white face): drop alpha before quantising
        image = image.convert("RGB")
    out = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    small = base64.b64encode(out.getvalue()).decode()
    return small if len(small) < len(b64) else b64


def tidy_outputs(outputs: list) -> list:
    "Outputs as stored: no progress-bar widgets, widgets reduced to the image they carry, palette PNGs."
    kept = []
    for out in outputs:
        data = out.get("data", {})
        if WIDGET_VIEW in data:
            if "image/png" not in data: continue          # a progress bar: nothing to see once it is done
            data.pop(WIDGET_VIEW)
        if "image/png" in data: data["image/png"] = small_png("".join(data["image/png"]).strip())
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            # text progress bars (\r-redrawn) are noise on a stored page
            lines = [l for l in text.split("\n") if "\r" not in l and not re.search(r"\d+%\|", l)]
            if not "".join(lines).strip(): continue
            out["text"] = "\n".join(lines)
        kept.append(out)
    return kept


def cell_errors(nb) -> list:
    errors = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}".splitlines()[0][:300])
    return errors


def resolve(names) -> list:
    "Notebook paths for names such as `03_plans`, `03`, `03_plans.ipynb` or a path (all of nbs/ for none)."
    every = sorted(NBS.glob("*.ipynb"))
    if not names: return every
    found = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        hits = [p for p in every if p.stem == stem] or [p for p in every if p.stem.split("_")[0] == stem]
        if len(hits) != 1: sys.exit(f"{name}: no single notebook of that name in {NBS}")
        found += hits
    return found


def store_outputs(path: Path, timeout: int = 1800) -> tuple:
    "Run one notebook and write it back with its outputs and their provenance; (path, seconds, errors)."
    t0 = time.perf_counter()
    nb = json.loads(path.read_text(encoding="utf-8"))
    runnable = json.loads(json.dumps(nb))
    for cell in runnable["cells"]:   # cells marked `#| eval: false` are not run (as nbdev_test does not run them)
        if cell["cell_type"] == "code" and re.search(r"^#\|\s*eval:\s*false", cell_text(cell), re.M):
            cell["source"] = ""
    executed = execute_notebook(runnable, NBS, timeout=timeout, preamble=PREAMBLE)
    errors = cell_errors(executed)
    if errors: return path, time.perf_counter() - t0, errors
    for cell, ran in zip(nb["cells"], executed["cells"]):
        if cell["cell_type"] != "code": continue
        cell["outputs"] = tidy_outputs(ran.get("outputs", []))   # execution counts: nbdev_clean, below
        cell["metadata"] = {**{k: v for k, v in cell.get("metadata", {}).items() if k != "source_hash"},
                            "source_hash": source_hash(cell)}
    nb["metadata"].pop("widgets", None)
    nb["metadata"]["outputs_of"] = notebook_modules(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path, time.perf_counter() - t0, []


def stale(nb) -> list:
    "Why a notebook's stored outputs are not those of its current cells and modules ([] when they are)."
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code": continue
        recorded = cell.get("metadata", {}).get("source_hash")
        if recorded is None: problems.append(f"cell {i} has never run")
        elif recorded != source_hash(cell): problems.append(f"cell {i} changed after it ran")
    recorded = nb.get("metadata", {}).get("outputs_of")
    if recorded is None: return problems + ["no record of the modules its outputs came from"]
    now = notebook_modules(nb)
    changed = sorted(m for m in set(now) | set(recorded) if now.get(m) != recorded.get(m))
    if changed: problems.append(f"{', '.join(changed)} changed after it ran")
    return problems


def check(paths) -> int:
    bad = 0
    for path in paths:
        problems = stale(json.loads(path.read_text(encoding="utf-8")))
        if problems:
            bad += 1
            shown = problems[:5] + ([f"... {len(problems) - 5} more"] if len(problems) > 5 else [])
            print(f"{path.relative_to(ROOT)}: stored outputs are stale: {'; '.join(shown)}")
    if bad:
        print(f"{bad} notebook(s) to rerun: python tools/notebook_outputs.py NAME ...")
        return 1
    print(f"stored outputs of {len(paths)} notebooks are those of the current cells and modules")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks (default: all of nbs/)")
    parser.add_argument("--check", action="store_true", help="only check that the stored outputs are current")
    parser.add_argument("--stale", action="store_true", help="run only the notebooks --check finds stale")
    parser.add_argument("-n", "--workers", type=int, default=2, help="notebooks run at once (default 2)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    args = parser.parse_args(argv)
    paths = resolve(args.names)
    if args.check: return check(paths)
    if args.stale: paths = [p for p in paths if stale(json.loads(p.read_text(encoding="utf-8")))]
    # long notebooks first, so two workers finish together
    paths.sort(key=lambda p: -p.stat().st_size)
    # one kernel's torch takes every core: with several kernels at once, share the cores (oversubscribed
    # OpenMP threads spin and make a training notebook several times slower)
    threads = max(1, (os.cpu_count() or 1) // max(1, min(args.workers, len(paths))))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    failed = 0
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        for path, seconds, errors in pool.map(lambda p: store_outputs(p, args.timeout), paths):
            status = "stored" if not errors else "NOT stored: " + "; ".join(errors[:3])
            print(f"{path.name}: {seconds:.0f} s, {status}", flush=True)
            failed += bool(errors)
            if not errors:   # the form CI's nbdev_clean check expects
                subprocess.run(["nbdev_clean", "--fname", str(path)], check=True, cwd=ROOT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
