"""Command-line entry of one qwen_vl fine-tune, and the accelerate configs for more GPUs.

Single process::

    python -m kdsl_utils.models.launch --profile paper --data-dir /path/to/mire \\
        --mix joint --seed 0 --out runs/joint-s0

More than one GPU: the same command under ``accelerate launch`` with one of the checked-in
configs of ``recipes/accelerate/`` (the Trainer picks the distributed setup up from the
environment)::

    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m kdsl_utils.models.launch \\
        --profile paper --data-dir /path/to/mire --mix joint --seed 0 --out runs/joint-s0

``fsdp.yaml`` (FSDP full sharding, ``use_orig_params`` so that peft's frozen base and
trainable adapters can share flat parameters) and ``zero3.yaml`` (DeepSpeed ZeRO-3: needs
the ``deepspeed`` package) are written for 8 processes; ``--write-accelerate-config KIND
--num-processes N`` prints a copy for another count. Full fine-tuning of the 7B model
(``finetune="full"``) needs one of them; LoRA and QLoRA fit on one 80 GB GPU. The effective
batch is ``batch_size x grad_accum x num_processes``: keep it equal across the compared runs
(divide ``grad_accum`` by the process count).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from accelerate.commands.config.config_args import ClusterConfig

from ..config import resolve
from ..data.mire import load_mire
from .registry import make_backend

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
ACCELERATE_KINDS = ("fsdp", "zero3")
DISTRIBUTED_TYPE = {"fsdp": "FSDP", "zero3": "DEEPSPEED"}


def accelerate_config_path(kind: str) -> Path:
    """The checked-in YAML of ``kind`` (``fsdp`` or ``zero3``)."""
    if kind not in ACCELERATE_KINDS:
        raise ValueError(f"unknown accelerate config {kind!r}; choose one of {ACCELERATE_KINDS}")
    path = RECIPES / f"{kind}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the accelerate recipes ship with the repository "
                                "(recipes/accelerate/), not with an installed wheel")
    return path


def accelerate_config(kind: str, num_processes: int | None = None,
                      grad_accum: int | None = None) -> dict[str, Any]:
    """The recipe of ``kind`` as a dict, validated, with the process count (and DeepSpeed's
    gradient accumulation) replaced when given."""
    cfg = yaml.safe_load(accelerate_config_path(kind).read_text(encoding="utf-8"))
    if num_processes is not None:
        cfg["num_processes"] = int(num_processes)
    if grad_accum is not None and "deepspeed_config" in cfg:
        cfg["deepspeed_config"]["gradient_accumulation_steps"] = int(grad_accum)
    validate_accelerate_config(cfg, kind)
    return cfg


def validate_accelerate_config(cfg: dict[str, Any], kind: str) -> ClusterConfig:
    """accelerate's own loader accepts ``cfg`` (unknown keys are an error) and it is the
    distributed type ``kind`` names; returns the loaded ClusterConfig."""
    want = DISTRIBUTED_TYPE[kind]
    if cfg.get("distributed_type") != want:
        raise ValueError(f"{kind}: distributed_type is {cfg.get('distributed_type')!r}, not {want}")
    # what ClusterConfig.from_yaml_file does with a file's dict (defaults filled in, unknown
    # keys refused)
    full = ClusterConfig.process_config(copy.deepcopy(cfg))
    extra = sorted(set(full) - set(ClusterConfig.__dataclass_fields__))
    if extra:
        raise ValueError(f"{kind}: unknown accelerate config keys {extra}")
    return ClusterConfig(**full)


def write_accelerate_config(path: Path | str, kind: str = "fsdp", num_processes: int = 8,
                            grad_accum: int | None = None) -> Path:
    """A copy of the recipe of ``kind`` at ``path``, for ``num_processes`` processes."""
    path = Path(path)
    text = yaml.safe_dump(accelerate_config(kind, num_processes, grad_accum), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdsl_utils.models.launch``: one fine-tune of the qwen_vl backend (also
    under ``accelerate launch``), or print an accelerate config."""
    p = argparse.ArgumentParser(prog="python -m kdsl_utils.models.launch",
                                description=main.__doc__)
    p.add_argument("--write-accelerate-config", choices=ACCELERATE_KINDS)
    p.add_argument("--num-processes", type=int, default=8)
    p.add_argument("--profile", default="paper")
    p.add_argument("--data-dir")
    p.add_argument("--mix", default="joint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.write_accelerate_config:
        cfg = accelerate_config(a.write_accelerate_config, a.num_processes)
        sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if not (a.data_dir and a.out):
        p.error("--data-dir and --out are required to train")
    cfg = resolve(a.profile)
    if cfg.backend != "qwen_vl":
        p.error(f"profile {a.profile!r} has no Hugging Face training (backend {cfg.backend!r})")
    data = load_mire(a.data_dir, test_files=[])
    backend = make_backend(cfg)
    log = backend.fit(data.train, mix=a.mix, seed=a.seed, out_dir=Path(a.out) / "trainer")
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: one writer
        backend.save(Path(a.out) / "model")
        print({k: v for k, v in log.to_dict().items() if k not in ("losses", "extra")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
