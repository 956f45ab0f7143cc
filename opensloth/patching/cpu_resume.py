"""Resuming a multi-process CPU run: let ``torch.load`` read checkpoints onto ``cpu:N``.

Issue: under torchrun on a CPU, accelerate gives every process the device ``cpu:<local rank>``, and transformers
(5.17, ``Trainer._load_optimizer_and_scheduler``) loads the optimizer state with ``map_location=args.device`` when
the world size is above one. ``torch.load`` (2.13) knows the location tag ``cpu`` but not ``cpu:0``, so every
resume from a checkpoint fails with "don't know how to restore data location of torch.storage.UntypedStorage
(tagged with cpu:0)" (issue 15); one process, mapped to plain ``cpu``, resumes fine.

What: `allow_indexed_cpu_locations` registers, once, a ``torch.serialization`` location deserializer that takes
``cpu:<index>`` to the CPU, which is what an indexed CPU device means (there is one CPU memory). Nothing else
changes: GPU locations and plain ``cpu`` keep torch's own handling, and no library source is touched.

Remove when: torch or transformers map ``cpu:N`` themselves (check with the test in tests/test_cpu_resume.py).
"""

from __future__ import annotations

import re

__all__ = ["allow_indexed_cpu_locations"]

_INDEXED_CPU = re.compile(r"cpu:\d+")
_registered = False


def _tag(obj):  # the tagger of a registered package: this one tags nothing, torch's own tag CPU storages
    return None


def _restore(obj, location: str):
    if isinstance(location, str) and _INDEXED_CPU.fullmatch(location):
        return obj.cpu() if hasattr(obj, "cpu") else obj
    return None  # not ours: torch's other deserializers decide


def allow_indexed_cpu_locations() -> bool:
    """Register the ``cpu:N`` deserializer (idempotent). Returns True when it was registered by this call."""
    global _registered
    if _registered:
        return False
    import torch.serialization

    torch.serialization.register_package(30, _tag, _restore)
    _registered = True
    return True
