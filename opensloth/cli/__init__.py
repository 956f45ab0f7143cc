"""The `opensloth` command: `opensloth train|precompute|inspect [flags]` (also `python -m opensloth ...`).

    opensloth train --preset tiny                                          # one process
    torchrun --no-python --nproc_per_node=2 opensloth train --preset tiny  # DDP, one process per GPU (or CPU, gloo)
    torchrun --nproc_per_node=2 -m opensloth train --preset tiny           # the same through python -m
    opensloth precompute --data chats.jsonl --tokenizer Qwen/Qwen3-0.6B --name chats
    opensloth inspect --preset tiny --batches 2                            # HTML pages of the batches, no training

Each command is a module of this package with `main(argv, prog=...)` returning the exit status; the subcommand is
imported only when run, and importing this package imports nothing heavy.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("opensloth.cli.train", "fine-tune a model (SFT), one process or many under torchrun"),
    "precompute": ("opensloth.cli.precompute", "tokenise (and pack) a chat dataset once, for runs to load"),
    "inspect": ("opensloth.cli.inspect", "write HTML pages of the batches a training configuration would train on"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: opensloth {" + ",".join(COMMANDS) + "} [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`opensloth COMMAND --help` lists a command's flags; `opensloth --version` prints the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `opensloth COMMAND [flags]`; returns the command's exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv and argv[0] == "--version":
        from opensloth import __version__

        print(f"opensloth {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{usage()}\n\nopensloth: error: {given}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"opensloth {argv[0]}")
