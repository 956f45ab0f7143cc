"""`python -m opensloth COMMAND [flags]`: the `opensloth` command (see `opensloth.cli`)."""

import sys

from opensloth.cli import main

if __name__ == "__main__":
    sys.exit(main())
