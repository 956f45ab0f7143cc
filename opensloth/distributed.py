"""Distributed environment parsing and validation, and the project's rank-0 logging.

Everything here is stdlib-only at import time so that any module (the packer included) can log through it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

LOGGER_NAME = "opensloth"
logger = logging.getLogger(LOGGER_NAME)


class DistributedEnvironmentError(ValueError):
    """The torchrun-style environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a torchrun launch (a plain `python script.py` is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # True when any torchrun variable was set

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_var(env, name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise DistributedEnvironmentError(
            f"{name}={raw!r} is not an integer; torchrun sets it to a whole number "
            f"(launch with `torchrun --nproc_per_node=N script.py`, or unset {name})"
        ) from None
    if value < 0:
        raise DistributedEnvironmentError(f"{name}={value} is negative; it must be >= 0")
    return value


def read_dist_env(env=None) -> DistEnv:
    """Read and validate LOCAL_RANK, RANK, WORLD_SIZE and LOCAL_WORLD_SIZE.

    Raises DistributedEnvironmentError naming the variable and value when one is not an integer, is negative, or is
    inconsistent with the others (RANK >= WORLD_SIZE, LOCAL_RANK >= LOCAL_WORLD_SIZE, WORLD_SIZE < 1).
    """
    env = os.environ if env is None else env
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    given = {n: env.get(n) for n in names if env.get(n) not in (None, "")}
    launched = bool(given)
    world_size = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    local_rank = _int_var(env, "LOCAL_RANK", rank if world_size == 1 else 0)
    # Name what the user set: a stray variable in a plain `python` run, not a torchrun launch.
    if "WORLD_SIZE" not in given and (rank > 0 or local_rank > 0):
        stray = ", ".join(f"{n}={given[n]}" for n in ("RANK", "LOCAL_RANK") if n in given)
        raise DistributedEnvironmentError(
            f"{stray} is set but WORLD_SIZE is not: a single process is rank 0. Launch with "
            f"`torchrun --nproc_per_node=N script.py` (it sets all four variables), or unset "
            f"{' and '.join(n for n in ('RANK', 'LOCAL_RANK') if n in given)}"
        )
    if world_size > 1 and not {"RANK", "LOCAL_RANK"} & set(given):
        raise DistributedEnvironmentError(
            f"WORLD_SIZE={world_size} is set but RANK and LOCAL_RANK are not: a plain `python` run would wait forever "
            f"for {world_size - 1} other process(es). Launch with `torchrun --nproc_per_node={world_size} script.py`, "
            f"or unset WORLD_SIZE"
        )
    if world_size < 1:
        raise DistributedEnvironmentError(f"WORLD_SIZE={world_size} must be at least 1")
    if rank >= world_size:
        raise DistributedEnvironmentError(
            f"RANK={rank} must be below WORLD_SIZE={world_size} (ranks are numbered 0..WORLD_SIZE-1)"
        )
    local_world_size = _int_var(env, "LOCAL_WORLD_SIZE", None)
    if local_world_size is None:
        local_world_size = max(world_size, local_rank + 1) if env.get("WORLD_SIZE") is None else world_size
    if local_world_size < 1 or local_world_size > world_size:
        raise DistributedEnvironmentError(
            f"LOCAL_WORLD_SIZE={local_world_size} must be between 1 and WORLD_SIZE={world_size}"
        )
    if local_rank >= local_world_size:
        raise DistributedEnvironmentError(
            f"LOCAL_RANK={local_rank} must be below the local world size {local_world_size} "
            f"(LOCAL_WORLD_SIZE, or WORLD_SIZE when that is unset)"
        )
    if launched and "RANK" in env and "LOCAL_RANK" not in env and world_size > 1:
        raise DistributedEnvironmentError(
            "RANK is set but LOCAL_RANK is not; launch with torchrun, which sets both"
        )
    return DistEnv(rank, local_rank, world_size, local_world_size, launched)


def get_rank() -> int:
    """Global rank: from an initialised process group when there is one, else from RANK (0 when unset)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency, but the packer must not need it
        pass
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Pass records on global rank 0 only, unless the record sets `all_ranks=True` (via `extra=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            if not getattr(record, "rank_prefixed", False):
                record.msg = f"[rank {get_rank()}] {record.msg}"
                record.rank_prefixed = True
            return True
        return get_rank() == 0


# One logger for the whole library, silent on ranks other than 0 unless a record asks for every rank.
logger.addFilter(RankZeroFilter())


_configured = False


def setup_logging(level: int | str | None = None) -> logging.Logger:
    """Give the `opensloth` logger a stderr handler that speaks on rank 0 only (idempotent).

    The level comes from `level`, else OPENSLOTH_LOG_LEVEL, else INFO. Library code never calls this on import;
    scripts and `ddp_patch()` do.
    """
    global _configured
    if level is None:
        level = os.environ.get("OPENSLOTH_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    logger.setLevel(level)
    if not _configured:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[opensloth %(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _configured = True
    return logger


def log_all_ranks(level: int, msg: str, *args) -> None:
    """Log a message from every rank (prefixed with the rank), e.g. which device each rank pinned."""
    logger.log(level, msg, *args, extra={"all_ranks": True})


def shutdown_process_group(*, wait_for_peers: bool = True) -> None:
    """Tear torch.distributed's process group down at the end of a torchrun script (a no-op without one).

    First the cyclic garbage is collected. A finished Trainer and its DDP wrapper sit in reference cycles, and DDP's
    reducer holds the process group, so without this the group and its gloo threads outlive `destroy_process_group`
    into interpreter shutdown. (At exit of a finished 2-rank CPU run of tests/integration/curve_worker.py, the
    `gloo_tcp_loop` and two `pt_gloo_runloop` threads were alive without the collection and gone with it. That run's
    worker, without it, is the third to abort in CI with "terminate called without an active exception"; the cause
    is not proven. A bare DDP module, outside a Trainer, keeps the threads alive even so.) Then, with
    `wait_for_peers`, every rank waits at a barrier, so that none leaves while another still finishes its last
    steps; a run that failed passes False, since its peers may never reach the barrier. Call it once training is
    over, with the trainer out of reach (`del trainer`, or on return from the function that trained)."""
    if sys.modules.get("torch") is None:  # nothing distributed was ever started; keep a failed parse fast
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        if wait_for_peers and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception as exc:  # noqa: BLE001 - a peer that died must not turn a finished run into a crash
                logger.warning("the final barrier failed (%s: %s); shutting down anyway", type(exc).__name__, exc)
        dist.destroy_process_group()
