"""`python -m opensloth.presets tiny DIR [--seed N] [--records N]`: write the tiny preset's model and tokenizer to
DIR, and with --records also N synthetic chat records to DIR/chat.jsonl."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opensloth.presets", description=__doc__)
    parser.add_argument("preset", choices=("tiny",), help="which preset to write")
    parser.add_argument("output_dir", help="folder to write (from_pretrained-compatible)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--records", type=int, default=0,
                        help="also write this many synthetic chat records to OUTPUT_DIR/chat.jsonl (default 0)")
    args = parser.parse_args(argv)
    if args.records < 0:
        parser.error(f"argument --records: must be >= 0, got {args.records}")
    import json

    from opensloth.presets.synthetic import synthetic_chat_records
    from opensloth.presets.tiny import save_tiny_model_folder

    path = save_tiny_model_folder(args.output_dir, seed=args.seed)
    print(f"wrote the {args.preset} preset's model and tokenizer to {path}")  # noqa: T201 (command-line output)
    if args.records:
        with open(path / "chat.jsonl", "w", encoding="utf-8") as fh:
            for record in synthetic_chat_records(args.records, seed=args.seed):
                fh.write(json.dumps(record) + "\n")
        print(f"wrote {args.records} synthetic chat records to {path / 'chat.jsonl'}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
