"""The tested version ranges, and the check that ``doctor`` and ``import mm_plugin`` run."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import warnings
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# megatron-core: 0.12.x is the line current MindSpeed supports; 0.16.x the newest for Python 3.11.
SUPPORTED = {
    "python": ("3.10 or newer", [SpecifierSet(">=3.10")]),
    "torch": ("2.6 or newer", [SpecifierSet(">=2.6")]),
    "megatron-core": ("0.12.x or 0.16.x", [SpecifierSet(">=0.12,<0.13"), SpecifierSet(">=0.16,<0.17")]),
    "transformers": ("5.x", [SpecifierSet(">=5,<6")]),
}


@dataclasses.dataclass
class Component:
    name: str
    version: Optional[str]
    supported: str
    ok: bool


def _metadata_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: Optional[str], ranges: list[SpecifierSet]) -> bool:
    if version is None:
        return False
    parsed = Version(version.split("+")[0])
    return any(parsed in spec for spec in ranges)


def components(imported: bool = False) -> list[Component]:
    """Versions of the stack. ``imported=True`` asks the imported modules themselves (slower, but
    right when a Megatron-LM checkout on PYTHONPATH shadows the installed megatron-core)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "transformers"):
        found[name] = _metadata_version(name)
    if imported:
        from mm_plugin.patches.registry import installed_version

        for name in ("torch", "megatron-core", "transformers"):
            version = installed_version(name)
            found[name] = str(version) if version is not None else found[name]
    return [Component(name, found[name], text, _in_range(found[name], ranges))
            for name, (text, ranges) in SUPPORTED.items()]


def warn_if_unsupported() -> None:
    """One warning line at import when an installed version is outside the tested ranges."""
    bad = [f"{c.name} {c.version or 'missing'} (supported: {c.supported})" for c in components() if not c.ok]
    if bad:
        warnings.warn(
            "mm_plugin: untested versions: " + "; ".join(bad) + ". Run `python -m mm_plugin doctor`.",
            stacklevel=3,
        )
