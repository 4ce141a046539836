"""The patch registry on toy targets: each test writes a fresh toy package and uses its own Registry."""

import importlib
import sys
import textwrap
import uuid

import pytest

from mm_plugin.patches.registry import Patch, Registry, wrapping
from subprocesses import run_python

pytestmark = pytest.mark.compat  # the registry is the same on both megatron-core lines; the last tests import it

HOME = """
    __version__ = "{version}"

    def double(x):
        return 2 * x

    class Base:
        def greet(self):
            return "base"

    class Child(Base):
        def speak(self):
            return "child"
"""


def _plus_one(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs) + 1


def _shout(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs).upper()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A fresh toy package on sys.path: ``toy.write("mod", source)``; ``toy.name`` is its import name."""

    class Toy:
        name = f"toy_{uuid.uuid4().hex[:8]}"
        root = tmp_path / name

        def write(self, module, source, **fields):
            (self.root / f"{module}.py").write_text(textwrap.dedent(source).format(**fields))
            return f"{self.name}.{module}"

        def target(self, module, attribute):
            return f"{self.name}.{module}:{attribute}"

    toy_package = Toy()
    toy_package.root.mkdir()
    (toy_package.root / "__init__.py").write_text('__version__ = "1.5"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield toy_package
    for name in [n for n in sys.modules if n.split(".")[0] == toy_package.name]:
        del sys.modules[name]


def _patch(name, target, wrapper=_plus_one, **fields):
    return Patch(name=name, target=target, replace=wrapping(wrapper), reason=f"{name} reason", **fields)


def _status(registry, name):
    return next(r for r in registry.applied() if r.patch.name == name)


def test_patch_applies_and_is_listed_with_its_reason(toy):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    registry = Registry()
    registry.register([_patch("toy.double", toy.target("home", "double"))])
    assert home.double(3) == 6
    registry.apply()
    assert home.double(3) == 7
    record = _status(registry, "toy.double")
    assert (record.status, record.detail) == ("applied", "toy.double reason")


def test_applying_twice_applies_nothing_twice(toy):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    patches = [_patch("toy.double", toy.target("home", "double")),
               _patch("toy.speak", toy.target("home", "Child.speak"), _shout)]
    registry = Registry()
    registry.register(patches)
    registry.apply()
    registry.apply()
    # A second copy of the registry (a reloaded module) finds the patches already in place.
    second = Registry()
    second.register(patches)
    records = second.apply()
    assert home.double(3) == 7
    assert home.Child().speak() == "CHILD"
    assert {(r.status, r.detail) for r in records} == {("applied", "already in place")}
    # ... and can still undo them, although it did not apply them itself.
    second.undo()
    assert home.double(3) == 6 and home.Child().speak() == "child"


def test_registering_a_reloaded_patch_replaces_it_and_a_reused_name_is_refused(toy):
    target = toy.target("home", "double")
    registry = Registry()
    registry.register([_patch("toy.double", target)])
    registry.register([_patch("toy.double", target)])  # the same definition, executed again
    assert len(registry.registered()) == 1
    with pytest.raises(ValueError, match="'toy.double' is registered twice"):
        registry.register([_patch("toy.double", toy.target("home", "Base.greet"))])
    with pytest.raises(ValueError, match="must be 'module:attribute'"):
        registry.register([Patch(name="bad", target=f"{toy.name}.home.double", replace=lambda f: f, reason="")])


def test_target_module_imported_later_is_patched_when_it_arrives(toy):
    module_name = toy.write("late", HOME, version="2.0")
    registry = Registry()
    registry.register([_patch("toy.late", toy.target("late", "double"))])
    registry.apply()
    assert _status(registry, "toy.late").status == "pending"
    assert module_name not in sys.modules  # apply() imports nothing
    late = importlib.import_module(module_name)
    assert late.double(3) == 7
    assert _status(registry, "toy.late").status == "applied"


def test_undone_pending_patch_stays_undone_until_applied_again(toy):
    module_name = toy.write("late", HOME, version="2.0")
    registry = Registry()
    registry.register([_patch("toy.late", toy.target("late", "double"))])
    registry.apply()
    assert registry.undo() == ["toy.late"]
    late = importlib.import_module(module_name)
    assert late.double(3) == 6
    registry.apply()
    assert late.double(3) == 7


def test_undo_restores_functions_methods_and_inherited_methods(toy):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    originals = (home.double, home.Child.__dict__["speak"])
    registry = Registry()
    registry.register([_patch("toy.double", toy.target("home", "double")),
                       _patch("toy.speak", toy.target("home", "Child.speak"), _shout),
                       _patch("toy.greet", toy.target("home", "Child.greet"), _shout)])
    registry.apply()
    assert (home.double(1), home.Child().speak(), home.Child().greet()) == (3, "CHILD", "BASE")
    assert home.Base().greet() == "base"  # patched on the subclass only
    assert sorted(registry.undo()) == ["toy.double", "toy.greet", "toy.speak"]
    assert (home.double, home.Child.__dict__["speak"]) == originals
    assert "greet" not in vars(home.Child)  # the override is removed, not replaced by a copy
    assert {r.status for r in registry.applied()} == {"undone"}


def test_home_function_is_rebound_in_modules_that_imported_it(toy):
    home_name = toy.write("home", HOME, version="2.0")
    early_source = "from {home} import double\nfrom {home} import double as twice\n"
    early = importlib.import_module(toy.write("early", early_source, home=home_name))
    home = sys.modules[home_name]
    registry = Registry()
    registry.register([_patch("toy.double", toy.target("home", "double"))])
    registry.apply()
    assert early.double(3) == early.twice(3) == 7
    assert sorted(_status(registry, "toy.double").rebound) == [f"{early.__name__}.double", f"{early.__name__}.twice"]
    after = importlib.import_module(toy.write("after", "from {home} import double\n", home=home_name))
    assert after.double(3) == 7
    registry.undo()
    assert early.double is early.twice is after.double is home.double
    assert home.double(3) == 6


def test_function_patched_where_it_was_imported_is_patched_there_only(toy):
    home_name = toy.write("home", HOME, version="2.0")
    user = importlib.import_module(toy.write("user", "from {home} import double\n", home=home_name))
    registry = Registry()
    registry.register([_patch("toy.user_double", toy.target("user", "double"))])
    registry.apply()
    assert user.double(3) == 7
    assert sys.modules[home_name].double(3) == 6


@pytest.mark.parametrize("fields, target, reason", [
    ({}, "home:missing", "target missing: module '{pkg}.home' has no attribute 'missing'"),
    ({}, "home:Child.missing", "target missing: Child has no attribute 'missing'"),
    ({}, "nowhere:double", "module {pkg}.nowhere does not exist"),
    ({"versions": {"{pkg}.home": ">=3"}}, "home:double", "{pkg}.home 2.0 is outside >=3"),
    ({"versions": {"toy-not-installed": ">=1"}}, "home:double", "toy-not-installed version unknown, needs >=1"),
    ({"guard": lambda original: "behaves already"}, "home:double", "behaves already"),
    ({"guard": lambda original: 1 / 0}, "home:double", "guard failed: ZeroDivisionError: division by zero"),
])
def test_patch_that_cannot_apply_is_skipped_with_a_reason(toy, fields, target, reason):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    fields = {k: {n.format(pkg=toy.name): s for n, s in v.items()} if k == "versions" else v
              for k, v in fields.items()}
    registry = Registry()
    registry.register([_patch("toy.skipped", f"{toy.name}.{target}", **fields),
                       _patch("toy.double", toy.target("home", "Base.greet"), _shout)])
    registry.apply()
    record = _status(registry, "toy.skipped")
    assert (record.status, record.detail) == ("skipped", reason.format(pkg=toy.name))
    assert home.double(3) == 6
    assert home.Base().greet() == "BASE"  # the other patch still applies


def test_version_inside_range_applies(toy):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    registry = Registry()
    registry.register([_patch("toy.double", toy.target("home", "double"), versions={home.__name__: ">=2,<3"})])
    registry.apply()
    assert _status(registry, "toy.double").status == "applied"


def test_uninstalled_package_is_skipped():
    registry = Registry()
    registry.register([_patch("absent", "no_such_package_mm_plugin.sub:f")])
    registry.apply()
    record = _status(registry, "absent")
    assert (record.status, record.detail) == ("skipped", "no_such_package_mm_plugin is not installed")


def test_undo_refuses_when_the_target_was_replaced_again(toy):
    home = importlib.import_module(toy.write("home", HOME, version="2.0"))
    registry = Registry()
    registry.register([_patch("toy.double", toy.target("home", "double"))])
    registry.apply()
    home.double = lambda x: x
    with pytest.raises(RuntimeError, match="was replaced again after it"):
        registry.undo()


# --- the package's own registry, in a fresh interpreter ------------------------------------------

_IMPORT_TWICE = """
import importlib, sys, warnings
warnings.simplefilter("ignore")
import megatron.core.utils, megatron.core.tensor_parallel.random   # targets present before the plugin
import mm_plugin
import mm_plugin as again
importlib.reload(mm_plugin)
patches = sys.modules["mm_plugin.patches"]
patches.__spec__.loader.exec_module(patches)       # the patch package executed a second time
registry = importlib.reload(sys.modules["mm_plugin.patches.registry"])  # a registry that remembers nothing
patches.__spec__.loader.exec_module(patches)       # registers into it,
patches.apply_patches()                            # and applies: every target is found already patched

mark = registry._MARK
applied = [r for r in registry.applied() if r.status == "applied"]
assert applied, "no patch applied"
for record in applied:
    current = registry._resolve(record.patch, sys.modules[record.patch.module])[2]
    assert getattr(current, mark, None) == record.patch.name, record.patch.name
    inner = getattr(current, "__wrapped__", None)
    assert getattr(inner, mark, None) != record.patch.name, f"{record.patch.name} applied twice"
print(" ".join(r.patch.name for r in applied))
"""


def test_importing_and_reloading_mm_plugin_applies_nothing_twice():
    applied = run_python(_IMPORT_TWICE).split()
    assert {"device.torch@utils", "device.torch@tensor_parallel.random", "device.rng_get", "device.rng_set"} \
        <= set(applied)


def test_every_registered_target_exists_on_the_installed_megatron_core():
    """Run in both CI environments (0.16.x and 0.12.1): a release that renames a target shows up here, not as
    a silently skipped patch. Targets in packages that are not installed (MindSpeed) are not checked."""
    import importlib

    from packaging.specifiers import SpecifierSet

    from mm_plugin import patches
    from mm_plugin.patches.registry import installed_version

    checked, missing = [], []
    for patch in patches.registered():
        top = patch.module.partition(".")[0]
        if importlib.util.find_spec(top) is None:
            continue
        if any(installed_version(name) not in SpecifierSet(spec) for name, spec in patch.versions.items()):
            continue  # written for another release line
        try:
            target = importlib.import_module(patch.module)
        except ImportError:  # an optional dependency of the module is missing (0.12's tensor_aware_state_dict
            continue  # needs nvidia_resiliency_ext): nothing can import it, so its patch waits, as intended
        for part in patch.attribute.split("."):
            target = getattr(target, part, None)
        (checked if target is not None else missing).append(patch.target)
    assert not missing, missing
    assert len(checked) >= 30  # the device, compatibility and injection patches, not none by accident


def test_a_required_patch_that_is_missing_stops_the_build_and_is_an_error_in_doctor(megatron_single):
    """Building the model after ``undo()`` (or with a megatron-core that renamed the target) used to die in the
    first forward with a TypeError from megatron's embedding."""
    from mm_plugin import doctor, patches
    from mm_plugin.config.model import load_model_config
    from mm_plugin.models.llava import LlavaModel

    assert all(patch.required == (patch.name == "multimodal.embedding_injection") for patch in patches.registered())
    patches.undo(["multimodal.embedding_injection"])
    try:
        with pytest.raises(patches.PatchMissingError, match=r"'multimodal.embedding_injection' is undone.*"
                                                             r"apply_patches\(\) re-applies them"):
            LlavaModel(load_model_config("tiny"))
        text, ok = doctor.report()
        assert not ok and "ERROR    multimodal.embedding_injection" in text
    finally:
        patches.apply_patches()
    assert not patches.missing_required()
    LlavaModel(load_model_config("tiny"))
