"""``python -m mm_plugin doctor``: is this machine's stack one mm_plugin supports, and what will run?

Prints the versions (Python, torch, megatron-core, transformers; torch_npu, MindSpeed, apex,
TransformerEngine and a Megatron-LM checkout where present), whether they form a supported
combination, the device and distributed backend, and every runtime patch with its status and reason.
Exits 1 when something is unsupported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys

from mm_plugin import device, patches, versions


def _optional_version(distribution: str, module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(module), "__version__", "source checkout")


def torch_npu_mismatch() -> str | None:
    """torch_npu is built against one torch release; any other one fails in obscure ways."""
    npu = _optional_version("torch_npu", "torch_npu")
    if npu is None:
        return None
    import torch

    torch_release = torch.__version__.split("+")[0]
    npu_release = npu.split(".post")[0].split("+")[0]
    if torch_release != npu_release:
        return (f"torch_npu {npu} is built for torch {npu_release}, but torch {torch.__version__} is installed; "
                f"install the torch_npu release made for torch {torch_release} (or that torch)")
    return None


def megatron_lm_checkout() -> str | None:
    """A Megatron-LM checkout on PYTHONPATH provides megatron.training (the stock pretrain())."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.training") is None:
        return None
    return str(importlib.util.find_spec("megatron.training").submodule_search_locations[0])


def _import_patch_targets() -> None:
    """Patches wait for their target modules; import those so every status is final."""
    for patch in patches.registered():
        try:
            importlib.import_module(patch.module)
        except ImportError:
            pass


def _image_routes() -> list[str]:
    """Whether image preprocessing runs its fast routes here (both are bit-equal to Pillow; without them
    Pillow does the same work, slower)."""
    from mm_plugin.data import fast_image

    resize = ("C extension, checked equal to Pillow" if fast_image.resample_route_agrees() else
              "Pillow (the C extension " + ("differs from this Pillow" if fast_image._resample else
                                            "was not built: reinstall with a C compiler") + ")")
    jpeg = ("simplejpeg, checked equal to Pillow" if fast_image.jpeg_route_agrees() else
            "Pillow (simplejpeg " + ("differs from this Pillow" if fast_image.simplejpeg else "not installed") + ")")
    return [f"  image resize   {resize}", f"  JPEG decode    {jpeg}"]


def _cpu_linear_route() -> str:
    """Which route generation's CPU matrix products take (see mm_plugin/inference/cpu_linear.py)."""
    from mm_plugin.inference import cpu_linear

    try:
        route = ("oneDNN, weights packed once" if cpu_linear.enabled() else
                 "torch F.linear (" + ("MM_PLUGIN_CPU_LINEAR=torch" if cpu_linear.has_onednn()
                                       else "this torch has no oneDNN") + ")")
    except ValueError as error:
        route = f"invalid setting: {error}"
    return f"  CPU linear     {route}"


def report() -> tuple[str, bool]:
    lines, ok = [], True
    components = versions.components(imported=True)
    lines.append("Versions")
    for component in components:
        mark = "ok" if component.ok else "UNSUPPORTED"
        lines.append(f"  {component.name:<14} {component.version or 'missing':<22} {mark} (tested: {component.supported})")
        ok &= component.ok
    for label, distribution, module in (("torch_npu", "torch_npu", "torch_npu"), ("MindSpeed", "mindspeed", "mindspeed"),
                                        ("apex", "apex", "apex"),
                                        ("TransformerEngine", "transformer_engine", "transformer_engine")):
        found = _optional_version(distribution, module)
        lines.append(f"  {label:<14} {found or 'not installed'}")
    mismatch = torch_npu_mismatch()
    if mismatch:
        lines.append(f"  UNSUPPORTED: {mismatch}")
        ok = False
    checkout = megatron_lm_checkout()
    lines.append(f"  Megatron-LM    {'checkout at ' + checkout + ' (launch/pretrain.py uses its pretrain())' if checkout else 'not on PYTHONPATH (the package’s own pretrain loop is used)'}")
    lines.append("")
    lines.append("Runtime")
    lines.append(f"  device         {device.current()} ({device.kind()})")
    lines.append(f"  distributed    {device.distributed_backend()}")
    lines.extend(_image_routes())
    lines.append(_cpu_linear_route())
    lines.append("")
    _import_patch_targets()
    lines.append("Patches")
    lines.append(patches.describe())
    if patches.missing_required():
        ok = False
    lines.append("")
    lines.append("Supported combination: " + ("yes" if ok else "NO — see the lines marked UNSUPPORTED or ERROR"))
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    text, ok = report()
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
