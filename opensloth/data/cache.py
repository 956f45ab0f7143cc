"""Rank-aware dataset cache: global rank 0 builds and saves the processed datasets once, every rank loads them.

Protocol (one cache = one folder `<cache_dir>/<factory name>-<key>`):
- The key is a hash of the *key material*: dataset sizes, columns and a content fingerprint, the tokenizer's
  identity (class, vocabulary hash, special tokens, chat template), the world size, the factory's name and every
  value in `cache_key_params`. `cache_metadata.json` inside the folder records the material and the key.
- Rank 0 takes a file lock (so two jobs sharing a cache folder build once), builds, and writes everything into a
  temporary sibling folder (`<name>.tmp-<pid>-<rand>`): the datasets with `save_to_disk`, then the metadata, then
  the ready flag. Only then is the temporary folder renamed onto the final name (an atomic rename). A builder
  killed at any point leaves at most a `.tmp-` folder, which nothing ever loads and the next builder deletes.
- A folder whose metadata is missing, incomplete or does not match the expected key material is not used: rank 0
  rebuilds it (replacing it by rename) and the other ranks keep waiting for a matching one.
- Other ranks wait: with an initialised torch.distributed process group, on a barrier that rank 0 enters after
  writing (or after failing: then they raise with rank 0's error); without one, by polling for a complete,
  matching folder, logging progress, and raising TimeoutError after `timeout_seconds`.

The cache folder must be on a filesystem that every rank sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensloth.distributed import DistEnv, log_all_ranks, logger, read_dist_env

CACHE_FORMAT_VERSION = 1
ERROR_SUFFIX = ".error.json"
LOCK_SUFFIX = ".lock"
_IMPORT_TIME = time.time()
_ERROR_MARKER_SLACK_S = 5.0  # ranks of one launch start within seconds of each other


def _process_start_time() -> float:
    """Wall-clock start of this process (Linux /proc), else the time this module was imported.

    An error marker older than this (minus a little slack) was left by an earlier run and is ignored.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5); fields after the ")" start at field 3
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return min(_IMPORT_TIME, boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME


@dataclass
class CacheConfig:
    """Where and how the dataset cache is written and waited for (the seed's fields, plus waiting knobs).

    Attributes:
        cache_dir: base folder for caches (each cache is a sub-folder named after the factory and the key).
        timeout_seconds: how long non-zero ranks wait for rank 0 without a process group (and how long rank 0
            waits for another job's build lock) before raising TimeoutError.
        ready_flag_name: file written last inside a cache; a cache without it is incomplete.
        train_subdir / val_subdir: sub-folders holding `save_to_disk` output.
        metadata_file: JSON with the key material, key, row counts and versions.
        enable_validation: compare the metadata with the expected key material before using a cache.
        poll_interval: seconds between checks while waiting.
        log_interval: seconds between "still waiting" log lines.
        content_fingerprint: "sample" (hash ~32 rows spread over each dataset: cheap), "full" (hash every row) or
            "none" (sizes and columns only).
    """

    cache_dir: str = "data/cache"
    timeout_seconds: float = 3600
    ready_flag_name: str = ".ready"
    train_subdir: str = "train_dataset"
    val_subdir: str = "val_dataset"
    metadata_file: str = "cache_metadata.json"
    enable_validation: bool = True
    poll_interval: float = 1.0
    log_interval: float = 30.0
    content_fingerprint: str = "sample"

    def __post_init__(self) -> None:
        if not (self.timeout_seconds > 0):
            raise ValueError(f"timeout_seconds={self.timeout_seconds!r} must be > 0 (seconds to wait for rank 0)")
        if not (self.poll_interval > 0):
            raise ValueError(f"poll_interval={self.poll_interval!r} must be > 0")
        if self.content_fingerprint not in ("sample", "full", "none"):
            raise ValueError(f"content_fingerprint={self.content_fingerprint!r} must be 'sample', 'full' or 'none'")


class CacheBuildError(RuntimeError):
    """Rank 0 failed to build the cache; raised on the ranks that were waiting for it."""


def _check_distributed_environment() -> tuple[int, int, int]:
    """Validate LOCAL_RANK, RANK and WORLD_SIZE (integers, consistent) and return `(local_rank, world_size, rank)`.

    Raises `opensloth.distributed.DistributedEnvironmentError` naming the variable and value otherwise.
    """
    env = read_dist_env()
    return env.local_rank, env.world_size, env.rank


# ----------------------------------------------------------------------------------------------- key material


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(bytes(value)).hexdigest()
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def _jsonable_params(params: Mapping[str, Any], where: str = "cache_key_params") -> dict:
    """JSON-normalised copy of `params`; rejects values whose text form could differ between ranks."""

    def conv(value, path):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [conv(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {str(k): conv(v, f"{path}[{k!r}]") for k, v in value.items()}
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            return value.item()
        raise TypeError(
            f"{path} = {value!r} of type {type(value).__name__} cannot go into the cache key: use a str, number, "
            f"bool, None, list or dict (a repr may differ between processes and ranks would disagree on the key)"
        )

    return {str(k): conv(v, f"{where}[{k!r}]") for k, v in params.items()}


def _normalise(material: Any) -> Any:
    return json.loads(json.dumps(material, sort_keys=True, default=_json_default))


def make_cache_key(material: Mapping[str, Any], length: int = 16) -> str:
    """Hex digest of the canonical JSON of `material` (sorted keys)."""
    blob = json.dumps(_normalise(material), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: what identifies raw data in a cache key (sizes and times do not: `cp -p`, `rsync -a`
    and an edit within the same second keep both)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sample_indices(n: int, k_ends: int = 8, k_spread: int = 16) -> list[int]:
    if n <= 0:
        return []
    idx = set(range(min(k_ends, n))) | set(range(max(0, n - k_ends), n))
    if n > 1:
        idx |= {round(i * (n - 1) / (k_spread - 1)) for i in range(k_spread)}
    return sorted(idx)


def dataset_fingerprint(dataset, mode: str = "sample") -> dict | None:
    """Size, columns and a content hash of a dataset (HF Dataset, dict of them, or a list of records).

    "sample" hashes the first and last 8 rows and 16 evenly spread ones; "full" every row; "none" no content.
    The result is the same in every process for the same data (no random fingerprints, no reprs of objects).
    """
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):  # DatasetDict or a plain dict of splits
        return {"splits": {str(k): dataset_fingerprint(v, mode) for k, v in dataset.items()}}
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(
            f"cannot fingerprint a {type(dataset).__name__} (no len()); the cache needs a datasets.Dataset or a list"
        ) from None
    columns = list(getattr(dataset, "column_names", None) or [])
    out: dict[str, Any] = {"rows": n, "columns": columns}
    if mode == "none" or n == 0:
        return out
    h = hashlib.sha256()
    if mode == "full" and hasattr(dataset, "iter"):
        for batch in dataset.iter(batch_size=1000):
            h.update(json.dumps(batch, sort_keys=True, default=_json_default).encode())
    else:
        indices = range(n) if mode == "full" else _sample_indices(n)
        for i in indices:
            h.update(json.dumps(dataset[int(i)], sort_keys=True, default=_json_default).encode())
            h.update(b"\x00")
    out[f"{mode}_sha256"] = h.hexdigest()
    return out


def tokenizer_identity(tokenizer) -> dict | None:
    """What makes two tokenizers tokenise alike: class, vocabulary (hashed), special tokens, chat template."""
    if tokenizer is None:
        return None
    ident: dict[str, Any] = {"class": type(tokenizer).__name__}
    with contextlib.suppress(Exception):
        ident["len"] = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole fast tokenizer: vocabulary, merges, normaliser, added tokens
        with contextlib.suppress(Exception):
            ident["backend_sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    if "backend_sha256" not in ident:
        vocab = None
        with contextlib.suppress(Exception):
            vocab = tokenizer.get_vocab()
        if isinstance(vocab, Mapping):
            items = sorted(vocab.items(), key=lambda kv: kv[1])
            ident["vocab_sha256"] = hashlib.sha256(
                json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
            ).hexdigest()
    for attr in ("padding_side", "truncation_side"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, str):
            ident[attr] = value
    special = getattr(tokenizer, "special_tokens_map", None)
    if isinstance(special, Mapping):
        ident["special_tokens"] = _normalise(dict(special))
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        ident["chat_template_sha256"] = hashlib.sha256(
            json.dumps(template, sort_keys=True, default=str).encode()
        ).hexdigest()
    return ident


# --------------------------------------------------------------------------------------------- on-disk layout


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("opensloth", "datasets", "transformers", "trl", "torch"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())


def _split_dirs(config: CacheConfig) -> dict[str, str]:
    return {"train": config.train_subdir, "val": config.val_subdir}


def atomic_save_datasets(
    final_dir: str | os.PathLike,
    datasets: Mapping[str, Any],
    metadata: Mapping[str, Any],
    config: CacheConfig | None = None,
    *,
    subdirs: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> Path:
    """Save named datasets (None values skipped) and a metadata JSON into `final_dir`, atomically.

    Everything is written into a temporary sibling, the ready flag last, then renamed onto `final_dir`
    (replacing an existing folder by a second rename). Returns the final path.
    """
    from datasets import Dataset, DatasetDict

    config = config or CacheConfig()
    subdirs = dict(subdirs or _split_dirs(config))
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        splits: dict[str, Any] = {}
        for name, ds in datasets.items():
            if ds is None:
                continue
            if name not in subdirs:
                raise ValueError(f"no sub-folder configured for split {name!r} (known: {sorted(subdirs)})")
            if isinstance(ds, Mapping) and not isinstance(ds, DatasetDict):
                ds = DatasetDict(dict(ds))
            if not isinstance(ds, (Dataset, DatasetDict)):
                raise TypeError(
                    f"split {name!r} is a {type(ds).__name__}; only datasets.Dataset (or a dict of them) can be "
                    f"saved to the cache (an IterableDataset cannot)"
                )
            ds.save_to_disk(str(tmp / subdirs[name]), num_proc=num_proc)
            rows = {k: len(v) for k, v in ds.items()} if isinstance(ds, DatasetDict) else len(ds)
            splits[name] = {"subdir": subdirs[name], "rows": rows, "kind": type(ds).__name__}
        meta = dict(metadata)
        meta.update({"splits": splits, "complete": True, "created_at": time.time(),
                     "created_by_pid": os.getpid(), "versions": _versions()})
        _write_json(tmp / config.metadata_file, meta)
        flag = tmp / config.ready_flag_name
        flag.write_text(f"ready\n{time.time()}\n")
        _fsync_file(flag)
        stale = None
        if final.exists():
            stale = final.parent / f"{final.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, stale)
        os.rename(tmp, final)
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_cache_metadata(
    cache_path: str | os.PathLike, config: CacheConfig | None = None, expected: Mapping | None = None
) -> tuple[dict | None, str]:
    """`(metadata, "")` when `cache_path` holds a complete cache (matching `expected` key material when given),
    else `(None, reason)`."""
    config = config or CacheConfig()
    path = Path(cache_path)
    if not path.is_dir():
        return None, f"{path} does not exist"
    meta_path = path / config.metadata_file
    if not (path / config.ready_flag_name).is_file():
        return None, f"{path} has no ready flag {config.ready_flag_name!r} (an incomplete write)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{meta_path} is unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return None, f"{meta_path} does not mark the cache complete"
    if expected is not None:
        want = _normalise(expected)
        have = meta.get("key_material")
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            return None, f"{meta_path} was built for different inputs (differs in: {', '.join(diff) or 'all'})"
        if meta.get("key") != make_cache_key(want):
            return None, f"{meta_path} records key {meta.get('key')!r}, expected {make_cache_key(want)!r}"
    for name, info in (meta.get("splits") or {}).items():
        if not (path / info.get("subdir", "")).is_dir():
            return None, f"{path} lacks the {name} split folder {info.get('subdir')!r}"
    return meta, ""


def load_cached_datasets(cache_path: str | os.PathLike, metadata: Mapping) -> dict[str, Any]:
    """Load every split recorded in `metadata` from `cache_path` (memory-mapped Arrow files)."""
    from datasets import load_from_disk

    path = Path(cache_path)
    out = {}
    for name, info in (metadata.get("splits") or {}).items():
        out[name] = load_from_disk(str(path / info["subdir"]))
    return out


def load_prepared_dataset(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """Load a folder written by `opensloth precompute`: `(train, val_or_None, metadata)`.

    Raises FileNotFoundError naming the folder when it is not a complete precomputed dataset.
    """
    config = CacheConfig(train_subdir="train", val_subdir="val", metadata_file="metadata.json")
    meta, reason = read_cache_metadata(path, config)
    if meta is None:
        raise FileNotFoundError(
            f"{path} is not a complete precomputed dataset ({reason}); create it with "
            f"`opensloth precompute --data ... --name ...`"
        )
    loaded = load_cached_datasets(path, meta)
    return loaded.get("train"), loaded.get("val"), meta


# ---------------------------------------------------------------------------------------------- coordination


def _process_group_active() -> bool:
    torch = sys.modules.get("torch")  # no torch imported -> no process group can exist; don't import it
    if torch is None:
        return False
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def _error_path(path: Path) -> Path:
    return path.parent / f"{path.name}{ERROR_SUFFIX}"


def _read_error_marker(path: Path, newer_than: float | None) -> dict | None:
    marker = _error_path(path)
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if newer_than is not None and float(data.get("time", 0)) < newer_than:
        return None
    return data


class _BuildLock:
    """An exclusive `fcntl.flock` on `<cache>.lock`, polled so that waiting is bounded (no-op without fcntl)."""

    def __init__(self, path: Path, timeout: float, poll: float):
        self.lock_path = path.parent / f"{path.name}{LOCK_SUFFIX}"
        self.timeout, self.poll, self.fh = timeout, poll, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            return self
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.lock_path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        except OSError as exc:
            raise CacheBuildError(
                f"cannot build the dataset cache: creating its lock {self.lock_path} failed ({exc}). The folder must "
                f"be writable to build a cache there; give a writable cache folder (--cache_dir), or build the cache "
                f"once where it is writable"
            ) from exc
        start = time.monotonic()
        logged = start
        while True:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                now = time.monotonic()
                if now - start > self.timeout:
                    self.fh.close()
                    raise TimeoutError(
                        f"waited {now - start:.0f}s for the build lock {self.lock_path} held by another process "
                        f"(another job building the same cache?); raise timeout_seconds or remove the stale job"
                    ) from None
                if now - logged >= 30:
                    logger.info("waiting for another process to finish building %s", self.lock_path.stem)
                    logged = now
                time.sleep(self.poll)

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def _bounded_barrier(config: CacheConfig, rank: int, what: str) -> None:
    """A process-group barrier that logs while it waits and gives up after ``config.timeout_seconds`` with a message
    (a plain barrier waits for the process group's own timeout, up to 30 minutes, with only c10d warnings)."""
    import torch.distributed as dist

    work = dist.barrier(async_op=True)
    start = last_log = time.monotonic()
    while not work.is_completed():
        elapsed = time.monotonic() - start
        if elapsed > config.timeout_seconds:
            raise TimeoutError(
                f"rank {rank} waited {elapsed:.0f}s (timeout_seconds={config.timeout_seconds:g}) for {what}; a rank "
                f"did not arrive: it may have crashed (see its log) or still be working (raise the timeout)"
            )
        if time.monotonic() - last_log >= config.log_interval:
            log_all_ranks(logging.INFO, f"still waiting for {what} ({elapsed:.0f}s elapsed, timeout "
                                        f"{config.timeout_seconds:g}s)")
            last_log = time.monotonic()
        time.sleep(min(config.poll_interval, 0.05))
    work.wait()


def _remove_debris(path: Path) -> None:
    """Delete temporary/stale siblings of `path` left by killed builders (call with the build lock held)."""
    for prefix in (f"{path.name}.tmp-", f"{path.name}.stale-"):
        for p in path.parent.glob(prefix + "*"):
            logger.info("removing %s left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)


def _wait_for_cache(path: Path, expected: Mapping | None, config: CacheConfig, rank: int) -> dict:
    start = time.monotonic()
    last_log = start
    first_reason = None
    errors_since = _process_start_time() - _ERROR_MARKER_SLACK_S
    while True:
        meta, reason = read_cache_metadata(path, config, expected)
        if meta is not None:
            return meta
        first_reason = first_reason or reason
        error = _read_error_marker(path, newer_than=errors_since)
        if error is not None:
            raise CacheBuildError(
                f"rank 0 failed to build the dataset cache {path}: {error.get('error')} (details in {_error_path(path)}"
                f" and rank 0's log)"
            )
        elapsed = time.monotonic() - start
        if elapsed > config.timeout_seconds:
            stale = _read_error_marker(path, newer_than=None)
            raise TimeoutError(
                f"rank {rank} waited {elapsed:.0f}s (timeout_seconds={config.timeout_seconds:g}) for rank 0 to write "
                f"the dataset cache {path}, and none with matching metadata appeared (last check: {reason}). Rank 0 "
                f"may have crashed (see its log"
                + (f"; an older error is recorded: {stale.get('error')}" if stale else "")
                + "), still be building (raise CacheConfig.timeout_seconds, or timeout_minutes in "
                "simple_cache_dataset_wrapper), or run on another machine without a shared filesystem."
            )
        if time.monotonic() - last_log >= config.log_interval:
            log_all_ranks(logging.INFO, f"still waiting for rank 0 to build {path.name} ({elapsed:.0f}s elapsed, "
                                        f"timeout {config.timeout_seconds:g}s)")
            last_log = time.monotonic()
        time.sleep(min(config.poll_interval, max(0.01, config.timeout_seconds - elapsed)))


def rank_zero_build_and_load(
    cache_path: str | os.PathLike,
    key_material: Mapping[str, Any],
    build_fn: Callable[[], Mapping[str, Any]],
    config: CacheConfig | None = None,
    *,
    extra_metadata: Mapping[str, Any] | None = None,
    env: DistEnv | None = None,
) -> tuple[dict[str, Any], dict, bool]:
    """Build named datasets once on global rank 0, save them atomically, and load them on every rank.

    `build_fn()` runs only on rank 0 and only when no complete, matching cache exists; it returns
    `{"train": Dataset, "val": Dataset | dict | None}`. Returns `(loaded_datasets, metadata, built_here)`.
    Non-zero ranks wait on a barrier when a process group is initialised, else poll with `config.timeout_seconds`.
    """
    config = config or CacheConfig()
    env = env or read_dist_env()
    path = Path(cache_path)
    expected = _normalise(key_material) if config.enable_validation else None
    use_barrier = env.world_size > 1 and _process_group_active()
    built = False

    if env.rank == 0:
        failure: BaseException | None = None
        try:
            # A complete, matching cache is read without the build lock, so it also loads from a read-only folder.
            meta, reason = read_cache_metadata(path, config, expected)
            with contextlib.nullcontext() if meta is not None else _BuildLock(path, config.timeout_seconds,
                                                                               config.poll_interval):
                if meta is None:
                    meta, reason = read_cache_metadata(path, config, expected)  # another job may have built it
                if meta is None:
                    if path.exists():
                        logger.warning("rebuilding the dataset cache: %s", reason)
                    with contextlib.suppress(OSError):
                        _error_path(path).unlink()
                    _remove_debris(path)
                    logger.info("building the dataset cache %s (other ranks wait)", path)
                    t0 = time.monotonic()
                    datasets = build_fn()
                    metadata = {"format": CACHE_FORMAT_VERSION, "key": make_cache_key(key_material),
                                "key_material": _normalise(key_material), **(extra_metadata or {})}
                    atomic_save_datasets(path, datasets, metadata, config)
                    built = True
                    logger.info("dataset cache written to %s in %.1fs", path, time.monotonic() - t0)
        except BaseException as exc:
            failure = exc
            with contextlib.suppress(Exception):
                _write_json(_error_path(path), {"error": f"{type(exc).__name__}: {exc}", "time": time.time(),
                                                "pid": os.getpid()})
        finally:
            if use_barrier:
                _bounded_barrier(config, env.rank, f"the other ranks to load {path.name}")  # whatever the outcome
        if failure is not None:
            raise failure
        meta, reason = read_cache_metadata(path, config, expected)
        if meta is None:  # pragma: no cover - only if someone deletes the folder right after writing
            raise CacheBuildError(f"the dataset cache {path} vanished after it was written: {reason}")
    else:
        if use_barrier:
            log_all_ranks(logging.INFO, f"waiting on a barrier for rank 0 to build {path.name}")
            _bounded_barrier(config, env.rank, f"rank 0 to build {path.name}")
            meta, reason = read_cache_metadata(path, config, expected)
            if meta is None:
                error = _read_error_marker(path, newer_than=None)
                raise CacheBuildError(
                    f"rank 0 did not produce the dataset cache {path} ({reason})"
                    + (f"; it failed with {error.get('error')}" if error else "")
                )
        else:
            meta = _wait_for_cache(path, expected, config, env.rank)

    loaded = load_cached_datasets(path, meta)
    if not built:
        rows = ", ".join(f"{k}: {v.get('rows')} rows" for k, v in meta["splits"].items())
        log_all_ranks(logging.INFO, f"loaded cached datasets from {path} ({rows})")
    return loaded, meta, built


# -------------------------------------------------------------------------------------------------- seed API


def cache_dataset_wrapper(
    cache_config: CacheConfig | None = None,
    cache_key_params: Mapping[str, Any] | None = None,
    validate_cache: bool = True,
) -> Callable:
    """Decorate a trainer factory `f(model, tokenizer, train_dataset, val_dataset, world_size, *args, **kwargs)`
    so that its processed datasets are built once (global rank 0) and loaded from disk by every rank.

    On a cache miss, rank 0 calls the factory with the raw datasets, saves `trainer.train_dataset` and
    `trainer.eval_dataset` (atomically, see the module docstring) and swaps the loaded copies into its trainer;
    every other rank (and every rank on a hit) calls the factory with the cached, processed datasets. The cache
    key covers the dataset sizes and content fingerprints, the tokenizer's identity, the world size, the factory's
    name and every value in `cache_key_params` (JSON-able values only).

    Args:
        cache_config: folders, timeout and polling (CacheConfig()).
        cache_key_params: extra values the processed data depends on (max_seq_length, template, packing, ...).
        validate_cache: compare the cached metadata with the expected key material (rebuild on mismatch).
    """
    config = cache_config or CacheConfig()
    if not validate_cache:
        config = CacheConfig(**{**config.__dict__, "enable_validation": False})
    params = _jsonable_params(cache_key_params or {})

    def decorator(func: Callable) -> Callable:
        qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
        short_name = getattr(func, "__name__", None) or type(func).__name__
        module = getattr(func, "__module__", None) or type(func).__module__

        @functools.wraps(func)
        def wrapper(model, tokenizer, train_dataset, val_dataset, world_size, *args, **kwargs):
            local_rank, env_world_size, rank = _check_distributed_environment()
            if world_size != env_world_size:
                logger.warning("world_size=%s passed to %s differs from WORLD_SIZE=%s; using WORLD_SIZE",
                               world_size, short_name, env_world_size)
                world_size = env_world_size
            material = {
                "factory": f"{module}.{qualname}",
                "world_size": world_size,
                "train": dataset_fingerprint(train_dataset, config.content_fingerprint),
                "val": dataset_fingerprint(val_dataset, config.content_fingerprint),
                "tokenizer": tokenizer_identity(tokenizer),
                "params": params,
                "format": CACHE_FORMAT_VERSION,
            }
            path = Path(config.cache_dir) / f"{short_name}-{make_cache_key(material)}"
            box: dict[str, Any] = {}

            def build():
                trainer = func(model, tokenizer, train_dataset, val_dataset, world_size, *args, **kwargs)
                if not hasattr(trainer, "train_dataset"):
                    raise TypeError(
                        f"{short_name} returned a {type(trainer).__name__} without a train_dataset attribute; "
                        f"cache_dataset_wrapper needs the trainer (e.g. an SFTTrainer) the factory builds"
                    )
                box["trainer"] = trainer
                return {"train": trainer.train_dataset, "val": getattr(trainer, "eval_dataset", None)}

            extra = {"factory_name": short_name,
                     "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None)}
            loaded, _, _ = rank_zero_build_and_load(path, material, build, config, extra_metadata=extra)
            if "trainer" in box:
                trainer = box["trainer"]
                trainer.train_dataset = loaded["train"]
                if hasattr(trainer, "eval_dataset"):
                    trainer.eval_dataset = loaded.get("val")
                return trainer
            return func(model, tokenizer, loaded["train"], loaded.get("val"), world_size, *args, **kwargs)

        return wrapper

    return decorator


def simple_cache_dataset_wrapper(
    cache_dir: str = "data/cache", timeout_minutes: float = 60, **cache_key_params: Any
) -> Callable:
    """`cache_dataset_wrapper` with a cache folder, a wait timeout in minutes and the key params as keywords."""
    return cache_dataset_wrapper(
        cache_config=CacheConfig(cache_dir=cache_dir, timeout_seconds=timeout_minutes * 60),
        cache_key_params=cache_key_params,
    )


__all__ = [
    "CacheBuildError",
    "CacheConfig",
    "atomic_save_datasets",
    "cache_dataset_wrapper",
    "dataset_fingerprint",
    "load_cached_datasets",
    "load_prepared_dataset",
    "make_cache_key",
    "rank_zero_build_and_load",
    "read_cache_metadata",
    "simple_cache_dataset_wrapper",
    "tokenizer_identity",
]
