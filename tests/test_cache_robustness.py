"""The dataset cache on a read-only filesystem and with a peer that never arrives (issue 15)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from opensloth.data import cache as cache_mod
from opensloth.data.cache import CacheBuildError, CacheConfig, rank_zero_build_and_load
from opensloth.distributed import DistEnv

MATERIAL = {"data": "x", "n": 3}


def _build():
    from datasets import Dataset

    return {"train": Dataset.from_dict({"input_ids": [[1, 2], [3]]}), "val": None}


def _read_only_lock(monkeypatch):
    """Root ignores file permissions, so a read-only folder is simulated where the cache writes: the build lock."""
    def refuse(self):
        raise CacheBuildError(f"cannot build the dataset cache: creating its lock {self.lock_path} failed "
                              f"([Errno 30] Read-only file system)")

    monkeypatch.setattr(cache_mod._BuildLock, "__enter__", refuse)


def test_a_complete_cache_loads_without_the_build_lock(tmp_path, monkeypatch):
    path = tmp_path / "prepared"
    loaded, _, built = rank_zero_build_and_load(path, MATERIAL, _build, env=DistEnv())
    assert built and loaded["train"]["input_ids"] == [[1, 2], [3]]
    _read_only_lock(monkeypatch)
    loaded, _, built = rank_zero_build_and_load(path, MATERIAL, _build, env=DistEnv())
    assert not built and loaded["train"]["input_ids"] == [[1, 2], [3]]


def test_a_missing_cache_on_a_read_only_folder_says_so(tmp_path, monkeypatch):
    _read_only_lock(monkeypatch)
    with pytest.raises(CacheBuildError, match="Read-only file system"):
        rank_zero_build_and_load(tmp_path / "prepared", MATERIAL, _build, env=DistEnv())


def test_the_lock_error_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(cache_mod.LOCK_SUFFIX):
            raise OSError(30, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    lock = cache_mod._BuildLock(tmp_path / "prepared", timeout=1, poll=0.01)
    with pytest.raises(CacheBuildError, match=r"prepared\.lock failed .*Read-only.*--cache_dir"):
        lock.__enter__()


def _barrier_worker(rank: int, store_dir: str, out_dir: str) -> None:
    store = dist.FileStore(os.path.join(store_dir, "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    if rank == 0:
        config = CacheConfig(timeout_seconds=1.5, poll_interval=0.05, log_interval=0.5)
        start = time.monotonic()
        try:
            cache_mod._bounded_barrier(config, 0, "rank 1 to arrive")
            message = "no error"
        except TimeoutError as exc:
            message = f"{time.monotonic() - start:.1f} {exc}"
        Path(out_dir, "rank0.txt").write_text(message)
        Path(out_dir, "rank0.done").touch()
    else:
        while not Path(out_dir, "rank0.done").exists():  # never reaches the barrier while rank 0 waits
            time.sleep(0.05)
        dist.barrier()  # now release rank 0's pending barrier so both exit cleanly
    dist.destroy_process_group()


def test_a_barrier_whose_peer_never_comes_gives_up_with_a_message(tmp_path):
    mp.start_processes(_barrier_worker, args=(str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    elapsed, message = Path(tmp_path, "rank0.txt").read_text().split(" ", 1)
    assert 1.5 <= float(elapsed) < 10
    assert "rank 0 waited" in message and "rank 1 to arrive" in message and "crashed" in message
