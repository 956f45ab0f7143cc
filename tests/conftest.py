"""Shared fixtures: every packing backend, the real data in ../shared/data, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from hypothesis import settings  # noqa: E402

from benchmarks._shared_data import (  # noqa: E402
    SHARED_CHAT_FILES,
    chat_template_token_ids,
    read_shared_chat,
    shared_data_dir,
)
from opensloth.packing import BACKEND_NAMES, backend_error  # noqa: E402

# HYPOTHESIS_PROFILE=ci explores more; =sanitize keeps the ASan/UBSan run short; the default suits development.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=400, deadline=None)
settings.register_profile("sanitize", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SHARED_DATA = shared_data_dir()


def _selected_backends() -> tuple[str, ...]:
    """OPENSLOTH_TEST_BACKENDS=native,numba restricts the backend fixture (the sanitised run uses it)."""
    raw = os.environ.get("OPENSLOTH_TEST_BACKENDS", "")
    if not raw.strip():
        return BACKEND_NAMES
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = set(names) - set(BACKEND_NAMES)
    if unknown:
        raise pytest.UsageError(f"OPENSLOTH_TEST_BACKENDS names unknown backends {sorted(unknown)}")
    return names


@pytest.fixture(params=_selected_backends())
def backend(request) -> str:
    """Each packing backend in turn; a backend that does not load shows as a skip with the reason."""
    error = backend_error(request.param)
    if error is not None:
        pytest.skip(f"{request.param} backend unavailable: {error}")
    return request.param


def require_shared_data() -> Path:
    if not (SHARED_DATA / "chat").is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def qwen3_tokenizer(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_data / "tokenizers" / "qwen3"))


@pytest.fixture(scope="session")
def chat_records(shared_data) -> dict[str, list[dict]]:
    """All shared chat datasets: name -> list of {"id", "messages"} records."""
    return {name: read_shared_chat(name, shared_data / "chat") for name in SHARED_CHAT_FILES}


@pytest.fixture(scope="session")
def shared_token_ids(chat_records, qwen3_tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of every shared record under the Qwen3 chat template: name -> list of id lists (no BOS)."""
    return {name: chat_template_token_ids(records, qwen3_tokenizer) for name, records in chat_records.items()}


@pytest.fixture(scope="session")
def shared_token_lengths(shared_token_ids) -> dict[str, object]:
    """Token counts of every shared record under the Qwen3 chat template: name -> int64 numpy array."""
    import numpy as np

    return {name: np.asarray([len(ids) for ids in seqs], dtype=np.int64) for name, seqs in shared_token_ids.items()}
