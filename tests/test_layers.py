"""The package's layers point one way: a module imports only its own layer or lower ones, function-level imports
included (a cycle hidden inside functions is still a cycle). The order is the README's (Development)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    {"mm_plugin", "versions", "console", "safe_io", "device", "patches"},  # the ground every layer stands on
    {"config"},
    {"data", "parallel"},
    {"checkpoint"},  # reading training checkpoints
    {"models"},
    {"convert"},
    {"inference"},
    {"training"},
    {"doctor", "__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(dotted: str) -> str:
    """``mm_plugin.models.llava`` -> ``models``; ``patches.registry`` -> ``patches``; ``mm_plugin`` -> itself."""
    parts = dotted.split(".")
    if parts[0] == "patches":
        return "patches"
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path, module: str):
    """Every ``mm_plugin``/``patches`` module that ``path`` imports, anywhere in it."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from mm_plugin import device" imports the module mm_plugin.device
            targets = [f"{base}.{alias.name}" if base in ("mm_plugin", "patches") else base for alias in node.names]
        else:
            continue
        yield from (target for target in targets if target.split(".")[0] in ("mm_plugin", "patches"))


def _modules():
    for top in ("mm_plugin", "patches"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_unit_has_a_layer():
    units = {_unit(module) for _, module in _modules()}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_down():
    upward = []
    for path, module in _modules():
        source = _unit(module)
        for target in _imports(path, module):
            if RANK.get(_unit(target), -1) > RANK[source]:
                upward.append(f"{path.relative_to(REPO)} ({source}) imports {target} ({_unit(target)})")
    assert not upward, "imports pointing to a higher layer:\n" + "\n".join(upward)


def test_the_walk_sees_function_level_imports(tmp_path):
    """The test itself can fail: an import inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from mm_plugin.training.loop import pretrain\n    from .. import device\n")
    assert list(_imports(sample, "mm_plugin.models.sample")) == ["mm_plugin.training.loop", "mm_plugin.device"]


OTHER_FORMATS = {("mm_plugin/convert/inputs.py", "vision_model.")}
"""Spellings that equal one of ours but name something else: Hugging Face's CLIPModel keeps its tower under
``vision_model.`` too."""


def _spelled(value):
    """Constants of ``config.names`` as they would be spelled out in code (Hugging Face's prefixes are left
    out: legacy Megatron and original LLaVA files use some of the same strings for their own layouts)."""
    from mm_plugin.config import names

    table = {name for part in names.PARTS for name in (part.json_key, part.module_prefix)}
    table |= {names.IMAGE_TOKEN_INDEX, names.IGNORE_INDEX}
    return value in table and not isinstance(value, bool)


def test_the_shared_names_are_spelled_once():
    """The parts' names, the image placeholder and the ignore index live in config/names.py; everything
    else imports them."""
    spelled = []
    for path, module in _modules():
        if module == "mm_plugin.config.names":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            value = None
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
                value = -node.operand.value if isinstance(node.operand.value, int) else None
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                value = node.value
            if value is not None and _spelled(value) and (str(path.relative_to(REPO)), value) not in OTHER_FORMATS:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {value!r}")
    assert not spelled, "use mm_plugin.config.names:\n" + "\n".join(spelled)
