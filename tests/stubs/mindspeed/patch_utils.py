"""Stand-in for MindSpeed's patch manager: register by dotted path, apply all at once.

Behaviour reproduced: a new function whose ``__name__`` ends in "wrapper" or "decorator" is stacked as a
decorator factory on the original, any other replaces it; applying sets the attribute on its module or
class and re-binds every module-level copy of the original (found by identity) in ``sys.modules``;
applying again does nothing.
"""

import importlib
import sys


class _Patch:
    def __init__(self, dotted: str):
        self.dotted = dotted
        self.replacement = None
        self.decorators = []
        self.applied = False

    def add(self, new) -> None:
        if new.__name__.endswith(("wrapper", "decorator")):
            self.decorators.append(new)
        elif self.replacement is not None:
            raise RuntimeError(f"the patch of {self.dotted} exists")
        else:
            self.replacement = new
        self.applied = False

    def apply(self) -> None:
        if self.applied:
            return
        owner, name = _owner_of(self.dotted)
        original = getattr(owner, name)
        patched = self.replacement or original
        for decorator in self.decorators:
            patched = decorator(patched)
        setattr(owner, name, patched)
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is original:
                setattr(module, name, patched)
        self.applied = True


def _owner_of(dotted: str):
    """The module or class holding the last component: import the longest importable prefix, then getattr."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:-1]:
            owner = getattr(owner, part)
        return owner, parts[-1]
    raise ModuleNotFoundError(dotted)


class MindSpeedPatchesManager:
    patches_info = {}

    @staticmethod
    def register_patch(orig_func_name, new_func):
        patch = MindSpeedPatchesManager.patches_info.setdefault(orig_func_name, _Patch(orig_func_name))
        patch.add(new_func)

    @staticmethod
    def apply_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.apply()
