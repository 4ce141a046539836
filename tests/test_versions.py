"""An unsupported version combination is named at import (one line) and by doctor."""

import warnings

from mm_plugin import versions


def test_supported_here():
    assert all(component.ok for component in versions.components()), versions.components()


def test_unsupported_megatron_is_one_warning_line(monkeypatch):
    real = versions._metadata_version
    monkeypatch.setattr(versions, "_metadata_version",
                        lambda name: "0.14.0" if name == "megatron-core" else real(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.warn_if_unsupported()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "megatron-core 0.14.0 (supported: 0.12.x or 0.16.x)" in message and "\n" not in message
    assert "python -m mm_plugin doctor" in message
