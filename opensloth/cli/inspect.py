"""`opensloth inspect`: HTML pages of the batches a training configuration would train on, without training.

    opensloth inspect --preset tiny --batches 2
    opensloth inspect --preset tiny --packing balanced --per_device_batch_size 2 --pages_dir previews
    torchrun --no-python --nproc_per_node=2 opensloth inspect --preset tiny    # each rank's own batches

Every flag of `opensloth train` means the same here, plus --batches and --pages_dir. The command builds what a
training run builds before its first step (patches, model, tokenizer, the prepared data through the same cache,
collator, balanced sampler) and writes <pages_dir>/<run name>_rank<r>_batch_<k>.html through
`opensloth._debug_dataloader.debug_chat_dataloader_for_training`: trained, masked and padding tokens and the
packed-sample boundaries of each micro-batch. It trains nothing and leaves the output folder alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from opensloth.cli.train import (
    RunError,
    parse_flags,
    print_config,
    run_command,
    setup_run,
    write_debug_pages,
)
from opensloth.config import build_parser

PROG = "opensloth inspect"
DEFAULT_BATCHES = 4
DEFAULT_PAGES_DIR = ".log"


def build_inspect_parser(prog: str = PROG):
    """The train flags (`opensloth.config.build_parser`) plus this command's own."""
    parser = build_parser(prog=prog, description=__doc__)
    group = parser.add_argument_group("inspect")
    group.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                       help=f"micro-batches to render per rank, in the order this rank would train them "
                            f"(default: {DEFAULT_BATCHES})")
    group.add_argument("--pages_dir", default=DEFAULT_PAGES_DIR,
                       help=f"folder the HTML pages are written to (default: {DEFAULT_PAGES_DIR})")
    return parser


def inspect(config, sources, *, batches: int = DEFAULT_BATCHES, pages_dir: str = DEFAULT_PAGES_DIR) -> list[str]:
    """Build the run as `opensloth train` would and write this rank's first `batches` micro-batches as HTML pages;
    returns their paths."""
    from opensloth.distributed import read_dist_env

    # The Trainer creates its output folder when built: remove it again if it was not there and stayed empty.
    output = Path(config.resolved_output_dir(read_dist_env().world_size)).absolute()
    created = [d for d in (output, *output.parents) if not d.exists()]
    try:
        setup = setup_run(config, sources, output=False)
        paths = write_debug_pages(setup.trainer, setup.train_dataset, config, setup.env.rank, setup.env.world_size,
                                  n=batches, out_dir=pages_dir)
    finally:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty, or another rank removed it
                d.rmdir()
    if not paths:
        raise RunError(f"rank {setup.env.rank} has no training micro-batch to show ({len(setup.train_dataset)} "
                       f"training rows or samples over {setup.env.world_size} process(es))")
    return paths


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """`opensloth inspect [train flags] [--batches N] [--pages_dir DIR]`: 0 when the pages are written, 2 for a bad
    flag or a configuration that cannot start (the message says why)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_inspect_parser(prog)
    config, sources, namespace = parse_flags(parser, argv)
    if namespace.batches < 1:
        parser.error(f"argument --batches: must be a positive number of micro-batches, got {namespace.batches}")
    if config.print_config:
        return print_config(config, sources)
    return run_command(prog, lambda: inspect(config, sources, batches=namespace.batches,
                                             pages_dir=namespace.pages_dir))
