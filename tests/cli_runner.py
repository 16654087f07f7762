"""`nnlite` in a subprocess, as a user runs it, for the end-to-end tests (imported by them: tests/ is on sys.path)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def nnlite(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    "The command in a subprocess from the repository root; `timeout` guards against a hang, it times nothing."
    return subprocess.run([sys.executable, '-m', 'nnunet_lite.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=os.environ.copy(), timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    "The run, asserting it succeeded (its output in the message when not)."
    assert r.returncode == 0, r.stdout + r.stderr
    return r
