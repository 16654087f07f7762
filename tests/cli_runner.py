"""`nnlite` in a subprocess, as a user runs it, for the end-to-end tests (tests/ is on sys.path).

Every test that runs the command goes through here: `nnlite(...)` runs it to the end, `start(...)` starts
it in the background (for a test that kills it), `ok(...)` asserts that a run succeeded. The console script
itself (`nnlite` on PATH) is checked once, in test_cli.py; here the command is this interpreter's
`-m nnunet_lite.cli`."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(*args) -> list[str]:
    "The command line of `nnlite ARGS`, each argument through `str` (paths and numbers may be given as such)."
    return [sys.executable, '-m', 'nnunet_lite.cli', *map(str, args)]


def environment(env: dict | None = None) -> dict:
    "This process's environment with `env` added (or overriding)."
    return {**os.environ, **(env or {})}


def nnlite(*args, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The command in a subprocess from the repository root, its output captured as text; `env`: variables
    added to this process's environment. `timeout` guards against a hang, it times nothing."""
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=REPO, env=environment(env),
                          timeout=timeout)


def start(*args, env: dict | None = None, **popen) -> subprocess.Popen:
    """The command started in the background from the repository root (`popen`: Popen's other arguments, e.g.
    where stdout and stderr go), for a test that waits for a moment to kill it."""
    return subprocess.Popen(command(*args), cwd=REPO, env=environment(env), **popen)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    "The run, asserting it succeeded (its output in the message when not)."
    assert r.returncode == 0, r.stdout + r.stderr
    return r
