"""The console shows what a user can act on: known third-party warnings are summarised in one line."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import warnings
from mm_plugin.console import quiet_third_party_warnings
quiet_third_party_warnings()
quiet_third_party_warnings()  # twice, as an entry point and its logging set-up both call it
import megatron.core.optimizer  # warns that TransformerEngine and apex are missing (none installed here)
warnings.warn("something the user should read")
"""


def _run(**env_extra) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_known_warnings_are_one_summary_line_and_others_still_show():
    quiet = _run()
    assert "Transformer Engine" not in quiet and "something the user should read" in quiet
    summaries = [line for line in quiet.splitlines() if line.startswith("mm_plugin: hid known third-party")]
    assert len(summaries) == 1 and "TransformerEngine/apex fallbacks" in summaries[0]
    verbose = _run(MM_PLUGIN_VERBOSE="1")
    assert "Transformer Engine" in verbose and "hid known" not in verbose


def test_every_console_script_quiets_the_warnings_before_megatron_is_imported():
    """A console script's module imports megatron-core at import time; setup.py's entry points are the
    functions of mm_plugin.console, which quiet the warnings first."""
    import re

    scripts = dict(re.findall(r'"(mm-[a-z]+)=([\w.:]+)"', (REPO / "setup.py").read_text()))
    assert set(scripts) == {"mm-convert", "mm-data", "mm-pretrain", "mm-infer", "mm-plot"}
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == "mm_plugin.console", (name, target)
        code = f"import sys; sys.argv = [{name!r}, '--help']\nfrom {module} import {function}\n{function}()"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr[-2000:])
        assert "Transformer Engine" not in result.stderr and "Apex" not in result.stderr, (name, result.stderr)
