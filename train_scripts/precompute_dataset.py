#!/usr/bin/env python
"""Precompute a dataset from a checkout: the same as `opensloth precompute` (opensloth/cli/precompute.py holds the
code). `--help` lists the flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from opensloth.cli import precompute as _precompute  # noqa: E402


def __getattr__(name: str):  # the script's names (parse_args, load_records, ...) stay importable from here
    return getattr(_precompute, name)


def main(argv=None) -> int:
    return _precompute.main(argv, prog=None)  # argparse names the program after this file, as before


if __name__ == "__main__":
    sys.exit(main())
