"""The patch registry: declarative, guarded, idempotent, listable and reversible monkey-patches.

A :class:`Patch` names its target as ``"package.module:Attribute.path"``, says how to build the
replacement from the original, why it exists, and when it applies (the target's version range and
an optional behaviour check). :func:`apply` applies every registered patch whose guards hold —
immediately when the target module is already imported, otherwise when it is imported later (a
``wrapt`` post-import hook). A free function replaced in its home module is also re-bound in every
loaded module that holds the original under any name (``from home import f``), and :func:`undo`
restores every one of those bindings.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import threading
import types
from typing import Any, Callable, Optional

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# A guard returns None when the patch should apply, or a sentence saying why it is skipped.
Guard = Callable[[Any], Optional[str]]

_MARK = "_self_mm_plugin_patch"  # attribute a replacement carries; `_self_` keeps it on wrapt proxies


@dataclasses.dataclass(frozen=True)
class Patch:
    """One monkey-patch.

    name:      short unique id, shown by ``applied()`` and ``doctor``.
    target:    ``"module:qualified.attribute"``, e.g.
               ``"megatron.core.transformer.utils:get_default_causal_mask"``.
    replace:   builds the replacement from the original object (see :func:`wrapping`).
    reason:    why the patch exists, in one sentence.
    versions:  ``{"distribution or top module": "specifier"}``; the patch is skipped outside it.
    guard:     a behaviour check called with the original object (see ``Guard``).
    """

    name: str
    target: str
    replace: Callable[[Any], Any]
    reason: str
    versions: dict = dataclasses.field(default_factory=dict)
    guard: Optional[Guard] = None

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attribute(self) -> str:
        return self.target.partition(":")[2]


def wrapping(wrapper: Callable) -> Callable[[Any], Any]:
    """A ``Patch.replace`` that wraps the original with a wrapt ``(wrapped, instance, args, kwargs)`` wrapper."""

    def build(original):
        return wrapt.FunctionWrapper(original, wrapper)

    build.__name__ = getattr(wrapper, "__name__", "wrapper")
    return build


@dataclasses.dataclass
class Record:
    """What happened to one patch: ``status`` is applied, skipped, pending or undone."""

    patch: Patch
    status: str
    detail: str = ""
    owner: Any = None
    original: Any = None
    replacement: Any = None
    rebound: list = dataclasses.field(default_factory=list)  # ["module.name", ...]


_lock = threading.RLock()
_records: dict[str, Record] = {}
_hooked_modules: set[str] = set()
_registered: list[Patch] = []


def register(patches: list[Patch]) -> None:
    """Add patches to the registry (not applied until :func:`apply`). Names must be unique."""
    with _lock:
        known = {p.name for p in _registered}
        for patch in patches:
            if ":" not in patch.target:
                raise ValueError(f"patch {patch.name!r}: target {patch.target!r} must be 'module:attribute'")
            if patch.name in known:
                raise ValueError(f"patch {patch.name!r} is registered twice")
            known.add(patch.name)
            _registered.append(patch)


def registered() -> list[Patch]:
    return list(_registered)


# Where a source checkout (no distribution metadata, or metadata of another copy) keeps its version.
_VERSION_MODULES = {"megatron-core": "megatron.core.package_info"}


def installed_version(distribution: str) -> Optional[Version]:
    """Version of what is actually imported: the module's own ``__version__`` first (a Megatron-LM
    checkout on PYTHONPATH shadows a pip-installed megatron-core), then the distribution metadata."""
    module_name = _VERSION_MODULES.get(distribution, distribution.replace("-", "_"))
    try:
        raw = getattr(importlib.import_module(module_name), "__version__", None)
    except ImportError:
        raw = None
    if raw is None:
        try:
            raw = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        return Version(str(raw))
    except InvalidVersion:
        return None


def _version_problem(patch: Patch) -> Optional[str]:
    for name, spec in patch.versions.items():
        version = installed_version(name)
        if version is None:
            return f"{name} version unknown, needs {spec}"
        if version not in SpecifierSet(spec):
            return f"{name} {version} is outside {spec}"
    return None


def _resolve(patch: Patch, module: types.ModuleType):
    owner: Any = module
    path = patch.attribute.split(".")
    for part in path[:-1]:
        owner = getattr(owner, part)
    name = path[-1]
    if inspect.isclass(owner):
        for klass in inspect.getmro(owner):
            if name in vars(klass):
                return owner, name, vars(klass)[name]
        raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
    return owner, name, getattr(owner, name)


def _carries_mark(obj: Any, name: str) -> bool:
    try:
        return getattr(obj, _MARK, None) == name
    except Exception:
        return False


def _rebind_everywhere(old: Any, new: Any, skip: Any) -> list[str]:
    """Replace every module-level binding of ``old`` (by identity) with ``new``."""
    rebound = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module is skip or not isinstance(module, types.ModuleType):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attr, value in list(namespace.items()):
            if value is old:
                setattr(module, attr, new)
                rebound.append(f"{module_name}.{attr}")
    return rebound


def _is_home_function(owner: Any, original: Any) -> bool:
    """A free function patched in the module that defines it: its ``from home import f`` copies are re-bound.
    (A function patched where it was imported to is patched for that module alone.)"""
    return (
        isinstance(owner, types.ModuleType)
        and (inspect.isfunction(original) or isinstance(original, wrapt.FunctionWrapper))
        and getattr(original, "__module__", None) == owner.__name__
    )


def _apply_one(patch: Patch, module: types.ModuleType) -> Record:
    record = _records.get(patch.name)
    if record is not None and record.status == "applied":
        return record
    try:
        owner, name, original = _resolve(patch, module)
    except AttributeError as error:
        return _set(patch, "skipped", f"target missing: {error}")
    if _carries_mark(original, patch.name):
        # Applied by an earlier copy of this registry (module reloaded, or imported twice).
        return _set(patch, "applied", "already in place", owner=owner, replacement=original)
    problem = _version_problem(patch)
    if problem is None and patch.guard is not None:
        try:
            problem = patch.guard(original)
        except Exception as error:  # a broken check must never break `import mm_plugin`
            problem = f"guard failed: {type(error).__name__}: {error}"
    if problem is not None:
        return _set(patch, "skipped", problem)
    replacement = patch.replace(original)
    setattr(replacement, _MARK, patch.name)
    setattr(owner, name, replacement)
    rebound = _rebind_everywhere(original, replacement, owner) if _is_home_function(owner, original) else []
    return _set(patch, "applied", patch.reason, owner=owner, original=original,
                replacement=replacement, rebound=rebound)


def _set(patch: Patch, status: str, detail: str, **fields) -> Record:
    record = Record(patch=patch, status=status, detail=detail, **fields)
    _records[patch.name] = record
    return record


def _on_import(module: types.ModuleType) -> None:
    with _lock:
        for patch in _registered:
            record = _records.get(patch.name)
            if patch.module == module.__name__ and record is not None and record.status == "pending":
                _apply_one(patch, module)


def apply() -> list[Record]:
    """Apply every registered patch whose guards hold; patches for modules not yet imported wait for them."""
    with _lock:
        for patch in _registered:
            record = _records.get(patch.name)
            if record is not None and record.status in ("applied", "skipped"):
                continue  # undone patches fall through and are applied again
            module = sys.modules.get(patch.module)
            if module is not None:
                _apply_one(patch, module)
                continue
            if importlib.util.find_spec(patch.module.partition(".")[0]) is None:
                _set(patch, "skipped", f"{patch.module.partition('.')[0]} is not installed")
                continue
            _set(patch, "pending", f"applies when {patch.module} is imported")
            if patch.module not in _hooked_modules:
                _hooked_modules.add(patch.module)
                wrapt.register_post_import_hook(_on_import, patch.module)
        return applied()


def applied() -> list[Record]:
    """Every registered patch with its status and the reason (why applied, or why skipped)."""
    with _lock:
        return [_records.get(p.name) or Record(patch=p, status="registered") for p in _registered]


def undo(names: Optional[list[str]] = None) -> list[str]:
    """Restore the originals of the applied patches (all, or those named), newest first.

    Undone patches stay undone when their module is imported again; :func:`apply` re-applies them.
    """
    undone = []
    with _lock:
        for patch in reversed(_registered):
            record = _records.get(patch.name)
            if names is not None and patch.name not in names:
                continue
            if record is None or record.status not in ("applied", "pending"):
                continue
            if record.status == "applied" and record.original is not None:
                owner, name, current = _resolve(patch, sys.modules[patch.module])
                if current is not record.replacement:
                    raise RuntimeError(
                        f"cannot undo patch {patch.name!r}: {patch.target} was replaced again after it "
                        f"(now {current!r}); undo that change first"
                    )
                setattr(owner, name, record.original)
                if _is_home_function(owner, record.original):
                    _rebind_everywhere(record.replacement, record.original, owner)
            _set(patch, "undone", "restored the original")
            undone.append(patch.name)
    return undone
