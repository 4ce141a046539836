"""Run snippets in fresh interpreters (for import-order and import-time behaviour)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_python(code: str, *paths: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``code`` with ``paths`` and the repository first on sys.path and ``env`` added to the environment."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([*paths, REPO, os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def finish(process: subprocess.Popen, timeout: int = 180) -> str:
    """The stdout of a started snippet; fails showing its output when it failed."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"subprocess failed:\n{stdout}\n{stderr}"
    return stdout


def run_python(code: str, *paths: str, env: dict | None = None) -> str:
    return finish(start_python(code, *paths, env=env))
