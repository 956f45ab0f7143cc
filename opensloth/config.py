"""The training harness's configuration: one dataclass whose fields are the command-line flags of `opensloth train`
(`opensloth.cli.train`; `train_scripts/train_configurable.py` in a checkout), with their help text, choices and
validation.

`build_parser()` makes the argparse parser from the fields; `resolve_config(namespace)` fills what the command
line left out from the preset (if any), then from the field defaults (the seed's), and records where every value
came from; `TrainConfig.problems()` lists invalid values as `(flag, message)` pairs, which the command turns into
argparse errors naming the flag: every check of the flags themselves lives there (what the machine or the model
cannot run is checked by `opensloth.cli.train.check_machine`). Nothing here imports torch, transformers or Unsloth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "BACKENDS",
    "CURVE_KEYS",
    "GRADIENT_CHECKPOINTING",
    "INTERVAL_STRATEGIES",
    "PACKING_MODES",
    "REPORT_TO",
    "TrainConfig",
    "build_parser",
    "dataset_problem",
    "looks_like_local_path",
    "resolve_config",
]

BACKENDS = ("auto", "unsloth", "hf")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# The Trainer integrations (transformers 5.17 `report_to` names) and the package each needs.
REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
             "clearml": "clearml", "dvclive": "dvclive", "neptune": "neptune", "swanlab": "swanlab",
             "trackio": "trackio", "azure_ml": "azureml", "codecarbon": "codecarbon", "none": None}
PACKING_MODES = ("none", "padding_free", "packed", "balanced")
INTERVAL_STRATEGIES = ("no", "steps", "epoch")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
DEFAULT_DATASET = "trl-lib/Capybara"
PRESET_DATASET = "synthetic"
ON_ERROR = ("raise", "skip")
# transformers' schedules that need no lr_scheduler_kwargs and no evaluation metric (which the flags do not give)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# The development datasets of the OpenSloth repository (tests and benchmarks read them through
# benchmarks/_shared_data.py). The library does not look them up: named here only to tell a user to pass the file.
DEVELOPMENT_DATASETS = ("alpaca", "gsm8k", "hh_rlhf", "arena_hard")
# Suffixes of the local data files --dataset reads (anything else without a path form is a hub dataset name).
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
# The settings that change a run's loss curve: a run resumes from a checkpoint only when these match the stored
# configuration of the run that wrote it (plus the global batch, per_device_batch_size x grad_accum x world size,
# which may be split differently over another number of processes, and the identity of the data files).
CURVE_KEYS = ("model_name", "preset", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "load_in_4bit",
              "dataset", "prepared_dataset_path", "max_seq_length", "train_samples", "test_samples", "packing",
              "all_tokens", "num_epochs", "max_steps", "learning_rate", "warmup_ratio", "weight_decay",
              "lr_scheduler_type", "seed")


def _path_shaped(spec: str) -> bool:
    """Written as a path, never as a hub name (`namespace/name`)."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def looks_like_local_path(spec: str) -> bool:
    """Whether a --dataset value names a local file or folder rather than a hub dataset (`namespace/name`): it
    starts with `/`, `.` or `~`, has more than one `/` or a backslash, ends with a data-file suffix, or its first
    component is a local folder."""
    if not spec:
        return False
    if _path_shaped(spec):
        return True
    if spec.lower().endswith(DATA_SUFFIXES):
        return True
    return "/" in spec and os.path.isdir(spec.split("/", 1)[0])


def model_problem(spec: str) -> str | None:
    """Why a --model_name value cannot be loaded, or None: a path that does not exist, a file, or a folder without the
    config.json (or a LoRA adapter's adapter_config.json) that from_pretrained reads. Hub names (`namespace/name`)
    are checked when loaded."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json")):
            return None
        return (f"the folder {spec!r} holds no config.json, so it is not a model (a tokenizer or data folder?); give "
                f"the folder save_pretrained wrote, or a hub name")
    if os.path.exists(path):
        return f"{spec!r} is a file; give the model's folder (the one holding config.json) or a hub name"
    if _path_shaped(spec):
        return (f"folder not found: {spec!r} (relative to {os.getcwd()}); give an existing model folder or a hub "
                f"name such as Qwen/Qwen3-0.6B")
    return None


def dataset_problem(spec: str) -> str | None:
    """Why a dataset value cannot be read, or None: a local path that does not exist, or the bare name of one of the
    repository's development datasets (which the library does not look up). Hub names are checked when loaded."""
    if os.path.exists(os.path.expanduser(spec)):
        return None
    if looks_like_local_path(spec):
        return (f"file not found: {spec!r} (relative to {os.getcwd()}); give an existing JSONL/JSON/Parquet/CSV file "
                f"or save_to_disk folder")
    if spec in DEVELOPMENT_DATASETS:
        return (f"{spec!r} is one of the OpenSloth repository's development datasets ({', '.join(DEVELOPMENT_DATASETS)}"
                f"), which the library does not look up by name; pass the path of its records file instead, e.g. "
                f"../shared/data/chat/alpaca_en_demo.jsonl in a checkout that has the development data")
    return None


def _f(default: Any, help: str, *, choices: tuple | None = None, group: str = "training", flag: str | None = None,
       action: str | None = None, metavar: str | None = None) -> Any:
    meta = {"help": help, "choices": choices, "group": group, "flag": flag, "action": action, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run (the flags of `opensloth train`, same names as the seed's
    train_configurable.py)."""

    # model
    model_name: str = _f("unsloth/Qwen3-0.6B-bnb-4bit", "model to fine-tune: a Hugging Face hub name or a local "
                         "folder (from_pretrained)", group="model")
    preset: str | None = _f(None, "embedded offline default: 'tiny' builds a tiny random Qwen3-architecture model, "
                            "the project's own tokenizer and a synthetic chat dataset (no network; trains on a CPU "
                            "in under two minutes); its defaults (among them --backend hf, --lora_r 0) apply to "
                            "the flags you do not give",
                            choices=("tiny",), group="model")
    backend: str = _f("auto", "training stack: 'unsloth' (FastLanguageModel, CUDA only), 'hf' (transformers + "
                      "peft, CPU or GPU), or 'auto' (Unsloth when it imports and CUDA is there, else hf)",
                      choices=BACKENDS, group="model")
    lora_r: int = _f(8, "LoRA rank; 0 trains every weight (full fine-tuning)", group="model")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r)", group="model")
    lora_dropout: float = _f(0.0, "LoRA dropout", group="model")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names that get LoRA adapters",
                           group="model")
    load_in_4bit: bool = _f(True, "load the base weights in 4 bits (bitsandbytes; Unsloth on CUDA). "
                            "--no-load_in_4bit loads 16-bit weights", group="model", action="bool")
    gradient_checkpointing: str = _f("auto", "activation checkpointing: 'auto' = Unsloth's offloaded checkpointing "
                                     "(use_gradient_checkpointing='unsloth') on the unsloth backend, off on hf; "
                                     "'on' or 'off' to choose", choices=GRADIENT_CHECKPOINTING, group="model")
    attn_implementation: str = _f("sdpa", "attention kernel for the hf backend; flash_attention_2 needs the "
                                  "flash-attn package and a GPU, flex_attention a GPU; Unsloth picks its own",
                                  choices=ATTN_IMPLEMENTATIONS, group="model")

    # data
    dataset: str | None = _f(None, f"training data: a JSONL/JSON (or Parquet/CSV) file of chat records, a "
                             f"save_to_disk folder, '{PRESET_DATASET}' (the generated chat data), or a hub dataset "
                             f"name (default {DEFAULT_DATASET}; '{PRESET_DATASET}' with --preset)", group="data")
    max_seq_length: int = _f(4096, "longest sample in tokens (longer ones are truncated); also the packed row "
                             "capacity", group="data")
    train_samples: int = _f(1000, "training records to use (the first N)", group="data")
    test_samples: int = _f(10, "evaluation records, taken after the training ones (0: no evaluation)", group="data")
    packing: str = _f("padding_free", "batch layout: 'none' (padded samples), 'padding_free' (samples end to end, "
                      "no padding), 'packed' (fixed-capacity rows of whole samples, best-fit decreasing), "
                      "'balanced' (packed rows plus the rank-balanced batch sampler)", choices=PACKING_MODES,
                      group="data")
    all_tokens: bool = _f(False, "train on every token (default: assistant turns only)", group="data",
                          action="store_true")
    skip_prepare: bool = _f(False, "load a dataset written by `opensloth precompute` instead of preparing one "
                            "(needs --prepared_dataset_path)", group="data", action="store_true")
    prepared_dataset_path: str | None = _f(None, "folder written by `opensloth precompute` "
                                           "(data/precomputed/<name>); implies --skip_prepare", group="data")
    on_error: str = _f("raise", "a malformed record (a line that is not JSON, no conversation, no assistant turn, "
                       "...) stops the run naming its file:line (raise), or is dropped and counted (skip)",
                       choices=ON_ERROR, group="data")
    dataset_num_proc: int | None = _f(None, "worker processes for tokenisation (default: in-process)", group="data")
    cache_dir: str = _f("data/cache", "where rank 0 saves the prepared datasets that every rank loads",
                        group="data")

    # optimisation
    num_epochs: float = _f(5.0, "training epochs")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run --num_epochs)")
    learning_rate: float = _f(2e-4, "peak learning rate")
    per_device_batch_size: int = _f(8, "micro-batch size per process: samples (none, padding_free) or packed rows "
                                    "(packed, balanced)")
    grad_accum: int = _f(4, "gradient accumulation steps (micro-batches per optimizer step per process)")
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming the learning rate up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("linear", "learning-rate schedule (transformers' name)", choices=LR_SCHEDULERS)
    seed: int = _f(42, "seed for weights (LoRA init), data order and dropout")

    ddp_backend: str = _f("auto", "torch.distributed backend under torchrun: 'auto' (nccl on CUDA, gloo on CPU), or "
                          "force one; gloo lets several ranks share one GPU (NCCL refuses two ranks on one device)",
                          choices=("auto", "nccl", "gloo"))

    # DDP patches
    use_patches: bool = _f(True, "apply the OpenSloth patches (default): ddp_patch (device pinning, the out-of-place "
                           "loss-scaling fix, find_unused_parameters=False) and the gradient-accumulation window "
                           "repack", group="patches", action="store_true")
    no_patches: bool = _f(False, "run plain transformers/TRL DDP, without the patches (the run name gets "
                          "'_nopatches')", group="patches", action="store_true")

    # run, logging, checkpoints
    experiment_name: str = _f("opensloth_sanity", "experiment name; the run name is "
                              "<experiment_name>_ws<world size>[_nopatches]", group="run")
    output_dir: str | None = _f(None, "checkpoints, TensorBoard events and run_summary.json (default "
                                "outputs/<run name>)", group="run")
    resume_from_checkpoint: str | None = _f(None, "continue from a checkpoint folder, or 'latest' (the newest "
                                            "checkpoint-N in --output_dir); the settings that change the loss curve "
                                            "must match the stored run_config.json of the run that wrote it",
                                            group="run")
    overwrite_output_dir: bool = _f(False, "replace the run already in the output folder (its checkpoints, "
                                    "TensorBoard events, summary and final model are deleted first); without it a new "
                                    "run refuses a folder that holds one", group="run", action="store_true")
    save_strategy: str = _f("epoch", "when to save checkpoints", choices=INTERVAL_STRATEGIES, group="run")
    save_steps: int = _f(500, "save every N steps (with --save_strategy steps)", group="run")
    save_total_limit: int = _f(2, "keep at most N checkpoints (0: keep all)", group="run")
    eval_strategy: str = _f("epoch", "when to evaluate (needs --test_samples > 0)", choices=INTERVAL_STRATEGIES,
                            group="run")
    eval_steps: int | None = _f(None, "evaluate every N steps (with --eval_strategy steps; default --save_steps)",
                                group="run")
    logging_steps: int = _f(1, "log the loss and the per-step figures every N optimizer steps", group="run")
    report_to: str = _f("tensorboard", "where the Trainer reports: " + ", ".join(REPORT_TO) + " (the integration's "
                        "package must be installed), or several separated by commas", group="run")
    debug_dataloader: int = _f(0, "write HTML previews of the first N training batches (trained, masked and padding "
                               "tokens, packed-sample boundaries; opensloth._debug_dataloader) to .log/ before "
                               "training (0: off)", group="run")
    print_config: bool = _f(False, "print the resolved configuration and exit without training", group="run",
                            action="store_true")

    # ------------------------------------------------------------------------------------------------------------

    def curve_settings(self, world_size: int) -> dict[str, Any]:
        """The settings that change the loss curve (`CURVE_KEYS`) and the global batch per optimizer step."""
        out = {k: getattr(self, k) for k in CURVE_KEYS}
        out["global_batch"] = self.per_device_batch_size * self.grad_accum * world_size
        return out

    @property
    def patches(self) -> bool:
        """Whether the OpenSloth patches are applied (on unless --no_patches)."""
        return not self.no_patches

    def run_name(self, world_size: int) -> str:
        """`<experiment_name>_ws<world_size>`, plus `_nopatches` when the patches are off."""
        return f"{self.experiment_name}_ws{world_size}" + ("" if self.patches else "_nopatches")

    def resolved_output_dir(self, world_size: int) -> str:
        return self.output_dir or os.path.join("outputs", self.run_name(world_size))

    def problems(self, sources: dict[str, str] | None = None) -> list[tuple[str, str]]:
        """Invalid values as (flag, message) pairs; empty when the configuration is usable. ``sources`` (from
        `resolve_config`) tells which values the command line gave, for combinations that only a given flag makes
        wrong."""
        out: list[tuple[str, str]] = []
        given = {k for k, v in (sources or {}).items() if v == "flag"}
        if self.preset is not None and "model_name" in given:
            out.append(("--model_name", f"conflicts with --preset {self.preset}, which builds its own model; give one "
                                        f"of them"))

        def need(cond: bool, name: str, message: str) -> None:
            if not cond:
                out.append((f"--{name}", message))

        model_issue = model_problem(self.model_name) if self.preset is None and self.model_name else None
        if model_issue is not None:
            out.append(("--model_name", model_issue))

        for name in ("max_seq_length", "train_samples", "per_device_batch_size", "grad_accum", "save_steps",
                     "logging_steps"):
            value = getattr(self, name)
            need(value >= 1, name, f"must be a positive integer, got {value}")
        need(self.test_samples >= 0, "test_samples", f"must be >= 0 (0: no evaluation), got {self.test_samples}")
        need(self.num_epochs > 0, "num_epochs", f"must be positive, got {self.num_epochs}")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps",
             f"must be a positive number of optimizer steps or -1 (use --num_epochs), got {self.max_steps}")
        need(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.lora_r >= 0, "lora_r", f"must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        need(self.lora_alpha >= 1, "lora_alpha", f"must be a positive integer, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        need(bool([t for t in self.lora_targets.split(",") if t.strip()]), "lora_targets",
             "must name at least one module, e.g. q_proj,k_proj,v_proj,o_proj")
        need(self.save_total_limit >= 0, "save_total_limit", f"must be >= 0 (0: keep all), got {self.save_total_limit}")
        if self.eval_steps is not None:
            need(self.eval_steps >= 1, "eval_steps", f"must be a positive integer, got {self.eval_steps}")
        if self.dataset_num_proc is not None:
            need(self.dataset_num_proc >= 1, "dataset_num_proc", f"must be >= 1, got {self.dataset_num_proc}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(self.debug_dataloader >= 0, "debug_dataloader", f"must be >= 0 (0: off), got {self.debug_dataloader}")
        need(bool(self.experiment_name.strip()) and "/" not in self.experiment_name, "experiment_name",
             f"must be a non-empty name without '/', got {self.experiment_name!r}")
        need(self.max_seq_length < 1 or self.max_seq_length >= 4, "max_seq_length",
             f"must be at least 4 tokens (the packed-attention check's probe row), got {self.max_seq_length}")
        if self.lora_r == 0:
            out += [(f"--{name}", "only applies to LoRA; --lora_r 0 is full fine-tuning")
                    for name in ("lora_alpha", "lora_dropout", "lora_targets") if name in given]
        if self.skip_prepare:
            out += [(f"--{name}", "prepares raw data, but --prepared_dataset_path trains data already prepared by "
                                  "`opensloth precompute` (give it there, or drop --prepared_dataset_path)")
                    for name in ("dataset", "all_tokens", "on_error", "dataset_num_proc") if name in given]
        if self.skip_prepare and not self.prepared_dataset_path:
            out.append(("--prepared_dataset_path", "is required with --skip_prepare (a folder written by "
                                                   "`opensloth precompute`)"))
        if self.prepared_dataset_path and not os.path.isdir(self.prepared_dataset_path):
            out.append(("--prepared_dataset_path", f"{self.prepared_dataset_path!r} is not a folder; create it with "
                                                   f"`opensloth precompute ... --name NAME` "
                                                   f"(it writes data/precomputed/NAME)"))
        if self.dataset and dataset_problem(self.dataset) is not None:
            out.append(("--dataset", dataset_problem(self.dataset)))
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            out.append(("--resume_from_checkpoint", f"{self.resume_from_checkpoint!r} is not a checkpoint folder "
                                                    f"(give a path such as outputs/<run>/checkpoint-100, or 'latest')"))
        if self.use_patches_given and self.no_patches:
            out.append(("--no_patches", "contradicts --use_patches; give one of them"))
        bad_targets = [t for t in (t.strip() for t in self.lora_targets.split(",")) if t and not t.isidentifier()]
        need(not bad_targets, "lora_targets", f"{bad_targets} are not module names (comma-separated names such as "
                                              f"q_proj,k_proj,v_proj,o_proj)")
        out += _report_to_problems(self.report_to)
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            need(importlib.util.find_spec("flash_attn") is not None, "attn_implementation",
                 "flash_attention_2 needs the flash-attn package, which is not installed; use sdpa (PyTorch's own "
                 "kernels, FlashAttention included on GPUs) or install flash-attn")
        if self.eval_strategy != "no" and self.test_samples == 0 and {"eval_strategy", "eval_steps"} & given:
            out.append(("--eval_strategy", f"{self.eval_strategy} needs evaluation data, but --test_samples is 0; "
                                           f"give --test_samples N, or --eval_strategy no"))
        if "eval_steps" in given and self.eval_strategy != "steps":
            out.append(("--eval_steps", f"only applies with --eval_strategy steps (it is {self.eval_strategy})"))
        if "save_steps" in given and self.save_strategy != "steps":
            out.append(("--save_steps", f"only applies with --save_strategy steps (it is {self.save_strategy})"))
        return out

    use_patches_given: bool = field(default=False, repr=False, metadata={"internal": True})


_INTERNAL = {"use_patches_given"}


def _report_to_problems(report_to: str) -> list[tuple[str, str]]:
    import importlib.util

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if not names:
        return [("--report_to", "is empty; give none, tensorboard, or another integration")]
    out = []
    for name in names:
        if name not in REPORT_TO:
            close = [k for k in REPORT_TO if k[:3] == name[:3]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(("--report_to", f"{name!r} is not an integration{hint}; choose from {', '.join(REPORT_TO)}"))
        elif REPORT_TO[name] and importlib.util.find_spec(REPORT_TO[name]) is None:
            out.append(("--report_to", f"{name} needs the {REPORT_TO[name]} package, which is not installed "
                                       f"(python -m pip install {REPORT_TO[name]}), or use --report_to none"))
    if "none" in names and len(names) > 1:
        out.append(("--report_to", "none cannot be combined with other integrations"))
    return out


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in _INTERNAL]


def _type_of(f: dataclasses.Field):
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if name.startswith("int"):
        return int
    if name.startswith("float"):
        return float
    return str


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser for `TrainConfig` (defaults are applied by `resolve_config`, not by argparse)."""
    # allow_abbrev=False: an abbreviation must never stand for another flag (--lr is not --lr_scheduler_type).
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    groups: dict[str, Any] = {}
    for f in _fields():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = default is not None and meta["action"] != "store_true"
        help_text = meta["help"] + (f" (default: {default})" if shown else "")
        flag = "--" + f.name
        if meta["action"] == "store_true":
            group.add_argument(flag, action="store_true", help=meta["help"])
        elif meta["action"] == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, type=_type_of(f), choices=meta["choices"], help=help_text,
                               metavar=meta["metavar"])
    return parser


def resolve_config(namespace: argparse.Namespace) -> tuple[TrainConfig, dict[str, str]]:
    """A `TrainConfig` from parsed flags: given flags, then the preset's defaults, then the field defaults.

    Returns `(config, sources)`, `sources[name]` being "flag", "preset" or "default".
    """
    given = {k: v for k, v in vars(namespace).items()}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    preset_defaults: dict[str, Any] = {}
    preset = given.get("preset")
    if preset is not None:
        from opensloth.presets import get_preset

        preset_defaults = dict(get_preset(preset).defaults)
        preset_defaults.setdefault("dataset", PRESET_DATASET)
        preset_defaults.setdefault("experiment_name", preset)
    for f in _fields():
        if f.name in given:
            values[f.name], sources[f.name] = given[f.name], "flag"
        elif f.name in preset_defaults:
            values[f.name], sources[f.name] = preset_defaults[f.name], "preset"
        else:
            sources[f.name] = "default"
    if values.get("dataset") is None and "dataset" not in values:
        values["dataset"] = DEFAULT_DATASET
    if values.get("prepared_dataset_path") and not values.get("skip_prepare"):
        values["skip_prepare"], sources["skip_prepare"] = True, "implied by --prepared_dataset_path"
    values["use_patches_given"] = bool(given.get("use_patches"))
    values.pop("use_patches", None)
    config = TrainConfig(**values)
    return config, sources
