"""`python -m opensloth.presets tiny DIR [--seed N]`: write the tiny preset's model and tokenizer to DIR."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opensloth.presets", description=__doc__)
    parser.add_argument("preset", choices=("tiny",), help="which preset to write")
    parser.add_argument("output_dir", help="folder to write (from_pretrained-compatible)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    args = parser.parse_args(argv)
    from opensloth.presets.tiny import save_tiny_model_folder

    path = save_tiny_model_folder(args.output_dir, seed=args.seed)
    print(f"wrote the {args.preset} preset's model and tokenizer to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
