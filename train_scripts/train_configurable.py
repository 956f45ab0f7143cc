#!/usr/bin/env python
"""OpenSloth training from a checkout: the same as `opensloth train` (opensloth/cli/train.py holds the code).

    python train_scripts/train_configurable.py --preset tiny
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --preset tiny

Every flag is listed by --help and in TRAINING_README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from opensloth.cli import train as _train  # noqa: E402


def __getattr__(name: str):  # the seed script's names (parse_args, RunError, ...) stay importable from here
    return getattr(_train, name)


def main(argv=None) -> int:
    return _train.main(argv, prog="train_configurable.py")


if __name__ == "__main__":
    sys.exit(main())
