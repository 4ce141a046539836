"""The package imports and works the same from a source checkout, a wheel and an editable install.

``patches/`` sits at the top of the repository yet must be ``mm_plugin.patches`` in all three. Each
test runs a fresh interpreter outside the repository and checks where ``mm_plugin.patches`` came
from and that the registry applies a patch when megatron-core arrives.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, mm_plugin
from mm_plugin import patches
import megatron.core.models.common.embeddings.language_model_embedding  # a patch target arrives
status = {r.patch.name: r.status for r in patches.applied()}
print(json.dumps({"patches": patches.__file__, "package": mm_plugin.__file__,
                  "injection": status["multimodal.embedding_injection"]}))
"""


def _probe(tmp_path: Path, env_extra: dict, prelude: str = "", flags: tuple = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    result = subprocess.run([sys.executable, *flags, "-c", prelude + PROBE], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _copy_sources(tmp_path: Path) -> Path:
    """Build from a copy, so the test leaves no build/ or egg-info in the repository."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("mm_plugin", "patches"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def _pip(*args: str, cwd: Path) -> None:
    """Install into a folder of its own; --ignore-installed keeps pip from first uninstalling the mm_plugin
    of the environment running the tests (it did: every run of the suite removed the developer's install)."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--ignore-installed", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_source_checkout(tmp_path):
    found = _probe(tmp_path, {"PYTHONPATH": str(REPO)})
    assert Path(found["patches"]).parent == REPO / "patches"
    assert found["injection"] == "applied"


def test_wheel_install(tmp_path):
    source = _copy_sources(tmp_path)
    site = tmp_path / "site"
    _pip("--target", str(site), str(source), cwd=tmp_path)
    shutil.rmtree(source)  # the installed copy must not lean on the sources
    found = _probe(tmp_path, {"PYTHONPATH": str(site)})
    assert Path(found["patches"]).parent == site / "mm_plugin" / "patches"
    assert found["injection"] == "applied"


def test_editable_install(tmp_path):
    source = _copy_sources(tmp_path)
    prefix = tmp_path / "prefix"
    _pip("--prefix", str(prefix), "-e", str(source), cwd=tmp_path)
    site_dirs = list(prefix.glob("lib/python*/site-packages"))
    assert site_dirs, f"no site-packages under {prefix}"
    # .pth files (how editable installs hook in) are read only from site directories. Without `site` (-S) the
    # environment's own site-packages is a plain path: its packages import, its .pth files (an editable
    # mm_plugin of its own) do not run; the prefix's do.
    # The prefix first: its .pth imports a finder module named like the environment's own.
    prelude = (f"import site, sys; site.addsitedir({str(site_dirs[0])!r}); "
               f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n")
    found = _probe(tmp_path, {}, prelude=prelude, flags=("-S",))
    assert Path(found["patches"]).parent == source / "patches"
    assert Path(found["package"]).parent == source / "mm_plugin"
    assert found["injection"] == "applied"


def test_doctor_reports_versions_device_and_patches():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MM_PLUGIN_CPU_LINEAR", None)
    result = subprocess.run([sys.executable, "-m", "mm_plugin", "doctor"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("megatron-core", "transformers", "torch", "device", "distributed", "gloo",
                     "multimodal.embedding_injection", "Supported combination: yes",
                     "image resize   C extension, checked equal to Pillow",
                     "JPEG decode    simplejpeg, checked equal to Pillow",
                     "CPU linear     oneDNN, weights packed once"):
        assert expected in result.stdout
