"""The seed's import path `opensloth.utils.dataset_cache`: the cache wrappers and `_check_distributed_environment`,
the same objects as `opensloth.data.cache`'s, importable without loading the training stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_seed_names_are_the_library_objects():
    import opensloth.data.cache as cache
    import opensloth.utils as utils
    from opensloth.utils import dataset_cache

    for name in ("cache_dataset_wrapper", "simple_cache_dataset_wrapper", "_check_distributed_environment",
                 "CacheConfig"):
        assert getattr(dataset_cache, name) is getattr(cache, name), name
    assert utils.simple_cache_dataset_wrapper is dataset_cache.simple_cache_dataset_wrapper


def test_check_distributed_environment_reads_and_validates_torchrun_variables(monkeypatch):
    from opensloth.distributed import DistributedEnvironmentError
    from opensloth.utils.dataset_cache import _check_distributed_environment

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert _check_distributed_environment() == (0, 1, 0)  # (local_rank, world_size, rank) of a plain process
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _check_distributed_environment() == (1, 4, 3)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedEnvironmentError, match="RANK"):
        _check_distributed_environment()


def test_importing_the_seed_path_stays_light():
    code = ("import sys; from opensloth.utils.dataset_cache import cache_dataset_wrapper, "
            "simple_cache_dataset_wrapper, _check_distributed_environment; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers', 'trl', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
