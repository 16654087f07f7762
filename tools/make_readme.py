"""Generate README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed offline).

    python tools/make_readme.py            # write README.md
    python tools/make_readme.py --check    # exit 1 if README.md is not what index.ipynb generates
    python tools/make_readme.py --command test   # print the README's test command (used by .ci/run)

Markdown cells are copied; code cells become ```python blocks with their text outputs; cells marked
`#| hide` are left out and nbdev directives are stripped. A command block is marked in the notebook
with an HTML comment `<!-- command: NAME -->` on the line before its ```sh fence.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n"


def _source(cell):
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _is_hidden(code):
    return any(re.match(r"#\|\s*hide\s*$", line.strip()) for line in code.splitlines())


def _strip_directives(code):
    return "\n".join(l for l in code.splitlines() if not l.strip().startswith("#|")).strip("\n")


def _text_outputs(cell):
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append("".join(out["text"]))
        elif "data" in out and "text/plain" in out["data"] and "text/html" not in out["data"]:
            parts.append("".join(out["data"]["text/plain"]))
    return "".join(parts).rstrip("\n")


def render(nb_path=ROOT / "nbs" / "index.ipynb"):
    nb = json.loads(Path(nb_path).read_text(encoding="utf-8"))
    blocks = []
    for cell in nb["cells"]:
        text = _source(cell)
        if cell["cell_type"] == "markdown":
            blocks.append(text.strip("\n"))
        elif cell["cell_type"] == "code" and not _is_hidden(text):
            code = _strip_directives(text)
            if code:
                blocks.append(f"```python\n{code}\n```")
            if out := _text_outputs(cell):
                blocks.append(f"```\n{out}\n```")
    return HEADER + "\n\n".join(b for b in blocks if b) + "\n"


def command(name, readme_text):
    m = re.search(rf"<!-- command: {re.escape(name)} -->\s*```(?:sh|bash)\n(.*?)\n```", readme_text, re.S)
    if not m:
        sys.exit(f"make_readme: no command block named {name!r} in README.md")
    return m.group(1).strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    p.add_argument("--command", metavar="NAME", help="print the README command block NAME (demo or test)")
    args = p.parse_args()
    readme = ROOT / "README.md"
    text = render()
    if args.command:
        print(command(args.command, text))
        return 0
    if args.check:
        if not readme.is_file() or readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date: run `python tools/make_readme.py` and commit it", file=sys.stderr)
            return 1
        print("README.md matches nbs/index.ipynb")
        return 0
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
