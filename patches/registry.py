"""The patch registry: declarative, guarded, idempotent, listable and reversible monkey-patches.

A :class:`Patch` names its target as ``"package.module:Attribute.path"``, says how to build the
replacement from the original, why it exists, and when it applies (the target's version range and
an optional behaviour check). :func:`apply` applies every registered patch whose guards hold —
immediately when the target module is already imported, otherwise when it is imported later (a
``wrapt`` post-import hook). A free function replaced in its home module is also re-bound in every
loaded module that holds the original under any name (``from home import f``), and :func:`undo`
restores every one of those bindings.

The package keeps one :class:`Registry` (the module-level functions below act on it); a test builds
its own ``Registry()`` to start from a clean state.
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

# Attributes a replacement carries (`_self_` keeps them on wrapt proxies): which patch made it, and
# what it replaced — so a second copy of the registry (a reloaded module) recognises and can undo it.
_MARK = "_self_mm_plugin_patch"
_ORIGINAL = "_self_mm_plugin_original"


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
    required:  mm_plugin's own model cannot run without it: skipped or undone, it is an error (``doctor``,
               :func:`require`), never a quiet "skipped" line.
    """

    name: str
    target: str
    replace: Callable[[Any], Any]
    reason: str
    versions: dict = dataclasses.field(default_factory=dict)
    guard: Optional[Guard] = None
    required: bool = False

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


class PatchMissingError(RuntimeError):
    """A patch mm_plugin's own model needs is not applied."""


@dataclasses.dataclass
class Record:
    """What happened to one patch: ``status`` is applied, skipped, pending or undone."""

    patch: Patch
    status: str
    detail: str = ""
    owner: Any = None
    original: Any = None
    replacement: Any = None
    inherited: bool = False  # the class attribute came from a base class: undo deletes the override
    rebound: list = dataclasses.field(default_factory=list)  # ["module.name", ...]


# Where a source checkout (no distribution metadata, or metadata of another copy) keeps its version.
_VERSION_MODULES = {"megatron-core": "megatron.core.package_info"}

MEGATRON_CORE = {"megatron-core": ">=0.12,<0.17"}
"""``versions`` of a patch written for every megatron-core line this package supports."""


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


def _module_absent(name: str) -> Optional[str]:
    """Why module ``name`` cannot be imported, when that is known without importing anything."""
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{top} is not installed"
    parent = name.rpartition(".")[0]
    if not parent or parent not in sys.modules:
        return None  # finding it would import its parents: wait for the import instead
    try:  # with the parent loaded, this only searches the parent's __path__
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # the parent is no package
        found = False
    return None if found else f"module {name} does not exist"


def _resolve(patch: Patch, module: types.ModuleType):
    """``(owner, name, current value, inherited)`` for the patch's target."""
    owner: Any = module
    path = patch.attribute.split(".")
    for part in path[:-1]:
        owner = getattr(owner, part)
    name = path[-1]
    if inspect.isclass(owner):
        for klass in inspect.getmro(owner):
            if name in vars(klass):
                return owner, name, vars(klass)[name], klass is not owner
        raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
    return owner, name, getattr(owner, name), False


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


class Registry:
    """A set of patches and what happened to each."""

    def __init__(self):
        self._lock = threading.RLock()
        self._patches: list[Patch] = []
        self._records: dict[str, Record] = {}
        self._hooked_modules: set[str] = set()

    def register(self, patches: list[Patch]) -> None:
        """Add patches (not applied until :meth:`apply`). Names are unique; registering a patch again
        under the same name, target and reason (its module was reloaded) replaces its definition."""
        with self._lock:
            for patch in patches:
                if ":" not in patch.target:
                    raise ValueError(f"patch {patch.name!r}: target {patch.target!r} must be 'module:attribute'")
                known = next((i for i, p in enumerate(self._patches) if p.name == patch.name), None)
                if known is None:
                    self._patches.append(patch)
                    continue
                previous = self._patches[known]
                if (previous.target, previous.reason) != (patch.target, patch.reason):
                    raise ValueError(f"patch {patch.name!r} is registered twice (targets {previous.target!r} "
                                     f"and {patch.target!r}); give each patch its own name")
                self._patches[known] = patch

    def registered(self) -> list[Patch]:
        return list(self._patches)

    def apply(self) -> list[Record]:
        """Apply every registered patch whose guards hold; patches for modules not yet imported wait for them."""
        with self._lock:
            for patch in self._patches:
                record = self._records.get(patch.name)
                if record is not None and record.status in ("applied", "skipped"):
                    continue  # undone patches fall through and are applied again
                module = sys.modules.get(patch.module)
                if module is not None:
                    self._apply_one(patch, module)
                    continue
                absent = _module_absent(patch.module)
                if absent is not None:
                    self._set(patch, "skipped", absent)
                    continue
                self._set(patch, "pending", f"applies when {patch.module} is imported")
                if patch.module not in self._hooked_modules:
                    self._hooked_modules.add(patch.module)
                    wrapt.register_post_import_hook(self._on_import, patch.module)
            return self.applied()

    def applied(self) -> list[Record]:
        """Every registered patch with its status and the reason (why applied, or why skipped)."""
        with self._lock:
            return [self._records.get(p.name) or Record(patch=p, status="registered") for p in self._patches]

    def require(self, name: str) -> None:
        """Raise ``PatchMissingError`` naming the remedy unless the patch ``name`` is applied."""
        record = next((r for r in self.applied() if r.patch.name == name), None)
        if record is None or record.status != "applied":
            status = "not registered" if record is None else f"{record.status}{': ' + record.detail if record.detail else ''}"
            raise PatchMissingError(
                f"the runtime patch {name!r} is {status}; mm_plugin's model needs it "
                f"({record.patch.reason if record else 'see mm_plugin.patches'}). Import mm_plugin before building "
                "the model and do not undo its patches (mm_plugin.patches.apply_patches() re-applies them), with "
                "megatron-core 0.12.x or 0.16.x; `python -m mm_plugin doctor` shows every patch")

    def undo(self, names: Optional[list[str]] = None) -> list[str]:
        """Restore the originals of the applied patches (all, or those named), newest first.

        Undone patches stay undone when their module is imported again; :meth:`apply` re-applies them.
        """
        undone = []
        with self._lock:
            for patch in reversed(self._patches):
                record = self._records.get(patch.name)
                if names is not None and patch.name not in names:
                    continue
                if record is None or record.status not in ("applied", "pending"):
                    continue
                if record.status == "applied":
                    self._restore(patch, record)
                self._set(patch, "undone", "restored the original")
                undone.append(patch.name)
        return undone

    def _restore(self, patch: Patch, record: Record) -> None:
        owner, name, current, _ = _resolve(patch, sys.modules[patch.module])
        if current is not record.replacement:
            raise RuntimeError(
                f"cannot undo patch {patch.name!r}: {patch.target} was replaced again after it "
                f"(now {current!r}); undo that change first"
            )
        if record.inherited:
            delattr(owner, name)
        else:
            setattr(owner, name, record.original)
        if _is_home_function(owner, record.original):
            _rebind_everywhere(record.replacement, record.original, owner)

    def _apply_one(self, patch: Patch, module: types.ModuleType) -> Record:
        record = self._records.get(patch.name)
        if record is not None and record.status == "applied":
            return record
        try:
            owner, name, original, inherited = _resolve(patch, module)
        except AttributeError as error:
            return self._set(patch, "skipped", f"target missing: {error}")
        if _carries_mark(original, patch.name):
            # Applied by an earlier copy of this registry (module reloaded, or imported twice).
            return self._set(patch, "applied", "already in place", owner=owner, replacement=original,
                             original=getattr(original, _ORIGINAL), inherited=inherited)
        problem = _version_problem(patch)
        if problem is None and patch.guard is not None:
            try:
                problem = patch.guard(original)
            except Exception as error:  # a broken check must never break `import mm_plugin`
                problem = f"guard failed: {type(error).__name__}: {error}"
        if problem is not None:
            return self._set(patch, "skipped", problem)
        replacement = patch.replace(original)
        setattr(replacement, _MARK, patch.name)
        setattr(replacement, _ORIGINAL, original)
        setattr(owner, name, replacement)
        rebound = _rebind_everywhere(original, replacement, owner) if _is_home_function(owner, original) else []
        return self._set(patch, "applied", patch.reason, owner=owner, original=original,
                         replacement=replacement, inherited=inherited, rebound=rebound)

    def _set(self, patch: Patch, status: str, detail: str, **fields) -> Record:
        record = Record(patch=patch, status=status, detail=detail, **fields)
        self._records[patch.name] = record
        return record

    def _on_import(self, module: types.ModuleType) -> None:
        with self._lock:
            for patch in self._patches:
                record = self._records.get(patch.name)
                if patch.module == module.__name__ and record is not None and record.status == "pending":
                    self._apply_one(patch, module)


# The package's registry; `mm_plugin.patches` registers into it and `import mm_plugin` applies it.
REGISTRY = Registry()
register = REGISTRY.register
registered = REGISTRY.registered
apply = REGISTRY.apply
applied = REGISTRY.applied
undo = REGISTRY.undo
require = REGISTRY.require
