#!/usr/bin/env python
"""Run the README recipe (examples/qwen_sft.py) unchanged on a test machine and write what it trained to JSON.

    python tests/gpu/recipe_driver.py OUT_JSON                               # one process
    torchrun --nnodes 2 --node_rank I --nproc_per_node 1 ... tests/gpu/recipe_driver.py OUT_JSON

The recipe reads its model, data and step count from the environment (MODEL_NAME, DATASET, MAX_SEQ_LENGTH,
MAX_STEPS, TRAIN_SAMPLES; WORLD_SIZE from torchrun). This driver only changes what a test machine cannot do as the
recipe states, by replacing ``trl.SFTConfig`` with a subclass that overrides a few keyword arguments (see
`config_overrides`) before the recipe imports it, and it wraps ``transformers.Trainer.train`` so that after training
every rank writes a report: rank 0 to OUT_JSON, rank r > 0 to ``OUT_JSON.rank{r}``. A report holds the Trainer's
``log_history`` (the full float losses, not the rounded console strings), world size, rank, the model's device,
``global_step``, the sampler in use, the squared norms of the trained parameters and the arguments the overrides
touched.

Environment of the driver itself:

- ``RECIPE_OUTPUT_DIR``: the trainer's ``output_dir`` (else the recipe's ``outputs/qwen_sft_ws{N}`` under the cwd).
- ``RECIPE_DDP_BACKEND``: the trainer's ``ddp_backend`` (gloo for two ranks sharing one GPU; NCCL refuses that).
- ``RECIPE_SCRIPT``: the script to run instead of examples/qwen_sft.py (the CPU test's stand-in).
- ``RECIPE_UNSLOTH=0``: do not import Unsloth first (the one switch for CPU machines, where Unsloth cannot import).
  Otherwise Unsloth is imported before anything imports transformers, trl or peft, as it asks and as the recipe does.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "qwen_sft.py"


def config_overrides(environ=os.environ) -> dict:
    """The SFTConfig keyword arguments the driver forces over the recipe's, each for a reason of the test machine."""
    overrides = {
        # The recipe logs to TensorBoard, which the GPU machine may not have (the Trainer refuses a missing
        # integration); the losses come from trainer.state.log_history instead.
        "report_to": "none",
        # The recipe saves a checkpoint at the epoch end; the test reads the report, and two ranks sharing one GPU
        # need not write adapters to disk.
        "save_strategy": "no",
    }
    if environ.get("RECIPE_OUTPUT_DIR"):  # a temporary folder instead of outputs/ under the cwd
        overrides["output_dir"] = environ["RECIPE_OUTPUT_DIR"]
    if environ.get("RECIPE_DDP_BACKEND"):  # gloo: NCCL refuses two ranks on one device
        overrides["ddp_backend"] = environ["RECIPE_DDP_BACKEND"]
    return overrides


def report_path(out_json: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` writes its report: OUT_JSON for rank 0, ``OUT_JSON.rank{r}`` for the others."""
    out = Path(out_json)
    return out if rank == 0 else out.with_name(f"{out.name}.rank{rank}")


def read_reports(out_json: str | os.PathLike, world_size: int) -> list[dict]:
    """Every rank's report of a run (rank 0 first)."""
    return [json.loads(report_path(out_json, r).read_text()) for r in range(world_size)]


def step_losses(report: dict, steps: int) -> list[float]:
    """The training loss logged at each optimizer step 1..steps (a report's log_history, logging_steps=1)."""
    losses = {int(h["step"]): float(h["loss"]) for h in report["log_history"] if "loss" in h}
    assert sorted(losses) == list(range(1, steps + 1)), f"logged steps {sorted(losses)}, expected 1..{steps}"
    return [losses[s] for s in range(1, steps + 1)]


def launch(workdir: Path, env: dict, name: str, world_size: int, *, timeout: float,
           **extra: str) -> tuple[list[dict], str]:
    """Run this driver (the recipe, or RECIPE_SCRIPT) as one process or as two single-process torchrun nodes, from
    ``workdir``, with its output folder ``workdir/name`` and ``extra`` added to ``env``; returns every rank's report
    (rank 0 first) and the runs' stdout + stderr."""
    from tests.integration.shared_launch import run_one_process, run_two_nodes

    out_json = Path(workdir) / f"{name}.json"
    env = {**env, "RECIPE_OUTPUT_DIR": str(Path(workdir) / name), **extra}
    driver = Path(__file__).resolve()
    if world_size == 1:
        procs = [run_one_process([str(out_json)], workdir, env, timeout=timeout, script=driver)]
    else:
        procs = run_two_nodes([str(out_json)], workdir, env, timeout=timeout, script=driver)
    return read_reports(out_json, world_size), "".join(p.stderr + p.stdout for p in procs)


def _patch_sft_config(overrides: dict) -> None:
    import trl

    base = trl.SFTConfig  # Unsloth's UnslothSFTConfig when Unsloth was imported first

    class RecipeSFTConfig(base):
        def __init__(self, *args, **kwargs):
            kwargs.update(overrides)
            super().__init__(*args, **kwargs)

    name = f"Recipe{base.__name__}"
    RecipeSFTConfig.__name__ = RecipeSFTConfig.__qualname__ = name
    RecipeSFTConfig.__module__ = __name__
    setattr(sys.modules[__name__], name, RecipeSFTConfig)  # findable by name, so pickle (and dill) can refer to it
    trl.SFTConfig = RecipeSFTConfig


def _write_report(trainer, out_json: Path) -> None:
    from opensloth.patching.state import trainer_state

    args = trainer.args
    state = trainer_state(trainer, create=False)
    sampler = getattr(state, "sampler", None) if state is not None else None
    rank = int(args.process_index)
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    lora_b = [p for n, p in trainable if "lora_B" in n]
    report = {
        "rank": rank,
        "world_size": int(args.world_size),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "device": str(next(trainer.model.parameters()).device),
        "global_step": int(trainer.state.global_step),
        "log_history": trainer.state.log_history,
        "sampler": type(sampler).__name__ if sampler is not None else None,
        # LoRA's B matrices start at zero: a positive norm shows this rank's adapters trained, and DDP keeps the
        # ranks' copies equal
        "trainable_sq_norm": sum(float(p.detach().float().pow(2).sum()) for _, p in trainable),
        "lora_b_sq_norm": sum(float(p.detach().float().pow(2).sum()) for p in lora_b) if lora_b else None,
        "args": {k: getattr(args, k, None) for k in (
            "output_dir", "report_to", "save_strategy", "eval_strategy", "ddp_backend",
            "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "seed")},
        "config_class": type(args).__name__,
    }
    path = report_path(out_json, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _patch_train(out_json: Path) -> None:
    from transformers import Trainer

    train = Trainer.train

    @functools.wraps(train)
    def train_and_report(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        _write_report(self, out_json)
        return result

    Trainer.train = train_and_report


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} OUT_JSON (got {len(argv) - 1} arguments)")
    out_json = Path(argv[1]).resolve()
    script = Path(os.environ.get("RECIPE_SCRIPT") or RECIPE).resolve()
    if not script.is_file():
        raise SystemExit(f"RECIPE_SCRIPT={script} is not a file")
    if os.environ.get("RECIPE_UNSLOTH", "1").strip() != "0":
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft; the recipe imports it first too)
    _patch_sft_config(config_overrides())
    _patch_train(out_json)
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
