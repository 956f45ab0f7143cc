"""GPU tier: tests that need CUDA and Unsloth; everything here is skipped without them.

Run them on their own (``pytest tests/gpu``), so that Unsloth is imported before transformers, trl and peft, as it
asks: this conftest imports it when CUDA is available. The shared data (``OPENSLOTH_SHARED_DATA``, default
``../shared/data``) provides the real Qwen3 tokenizer and chat records.
"""

from __future__ import annotations

import pytest

try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a dependency
    CUDA = False

UNSLOTH_ERROR: str | None = "CUDA is not available"
if CUDA:
    try:
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)

        UNSLOTH_ERROR = None
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip with the reason
        UNSLOTH_ERROR = f"unsloth does not import: {type(exc).__name__}: {exc}"


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if UNSLOTH_ERROR is not None:
                item.add_marker(pytest.mark.skip(reason=UNSLOTH_ERROR))
