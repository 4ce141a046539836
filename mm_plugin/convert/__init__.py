"""One-step weight conversion between what users download and our part files, and back (``mm-convert``).

Every conversion plans its outputs first (names, shapes and dtypes, checked against the target
dimensions), then streams tensor by tensor into ``.pt`` or ``.safetensors`` files written atomically.
See ``docs/convert.md``.
"""

from mm_plugin.convert.commands import (convert_clip, convert_llm, convert_projector, converted_llava, export_hf,
                                        export_peft, import_llava_hf, import_llava_lora, read_llava_hf)
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.pipeline import Summary, WrittenFile

__all__ = ["convert_clip", "convert_llm", "convert_projector", "import_llava_hf", "export_hf", "export_peft",
           "import_llava_lora", "read_llava_hf", "converted_llava", "ConversionError", "Summary", "WrittenFile"]
