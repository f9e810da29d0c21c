"""Supervised fine-tuning of the qwen_vl backend (seesaw runs: image-only, intent-only, joint).

One function, :func:`train_sft`, drives Hugging Face's ``Trainer`` with the profile's
:class:`~kdsl_utils.config.TrainCfg`, which is the *same* object for every task mix of a
profile: the seesaw compares fine-tunes that differ only in their data. It is seeded
(``transformers.set_seed``, the Trainer's ``seed``/``data_seed``, the LoRA init), logs the
loss every optimizer step (the returned loss curve), checkpoints every ``save_steps`` into
``out_dir`` and, with ``resume=True``, continues from the last checkpoint there (optimizer,
scheduler, RNG states and data order restored, so an interrupted run ends where an
uninterrupted one would).

Single process is the default (and what the tests run). For more than one GPU, the same
command runs under ``accelerate launch``; the Trainer picks the distributed setup up from
the environment. Write a config with :func:`write_accelerate_config` (or copy the YAML
below) and run, e.g. on 8 GPUs::

    python -m kdsl_utils.train --write-accelerate-config fsdp --num-processes 8 > fsdp.yaml
    accelerate launch --config_file fsdp.yaml -m kdsl_utils.train \\
        --profile paper --data-dir /path/to/mire --mix joint --seed 0 --out runs/joint-s0

FSDP (full sharding; ``use_orig_params`` so that peft's frozen base and trainable adapters
can share flat parameters)::

    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    mixed_precision: bf16
    num_machines: 1
    num_processes: 8
    fsdp_config:
      fsdp_version: 1
      fsdp_sharding_strategy: FULL_SHARD
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
      fsdp_transformer_layer_cls_to_wrap: Qwen2VLDecoderLayer,Qwen2VLVisionBlock
      fsdp_backward_prefetch: BACKWARD_PRE
      fsdp_state_dict_type: SHARDED_STATE_DICT
      fsdp_use_orig_params: true
      fsdp_cpu_ram_efficient_loading: true
      fsdp_sync_module_states: true
      fsdp_offload_params: false

DeepSpeed ZeRO-3 (parameters, gradients and optimizer state partitioned; needs the
``deepspeed`` package; ``zero3_init_flag: false`` because the LoRA wrapper is applied after
loading)::

    compute_environment: LOCAL_MACHINE
    distributed_type: DEEPSPEED
    mixed_precision: bf16
    num_machines: 1
    num_processes: 8
    deepspeed_config:
      zero_stage: 3
      zero3_init_flag: false
      zero3_save_16bit_model: true
      offload_optimizer_device: none
      offload_param_device: none
      gradient_accumulation_steps: 8
      gradient_clipping: 1.0

Full fine-tuning of the 7B model (``finetune="full"``) needs one of these; LoRA and QLoRA fit
on one 80 GB GPU. The effective batch is ``batch_size x grad_accum x num_processes``: keep
it equal across the compared runs (divide ``grad_accum`` by the process count).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainCfg
from .data.records import Record

ACCELERATE_KINDS = ("fsdp", "zero3")


@dataclass
class TrainResult:
    loss_curve: list[dict[str, float]]  # {"step", "loss", "lr", "epoch"} per optimizer step
    steps: int
    wall_s: float
    n_examples: int  # training examples after dropping over-limit records
    truncation: dict[str, Any]
    checkpoint_dir: str | None
    resumed_from: str | None = None
    trainable_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_fingerprint(records: Sequence[Record], tcfg: TrainCfg, seed: int) -> str:
    """Hash of what a checkpoint depends on: the training records (ids, labels, prompts,
    image paths), the hyper-parameters and the seed."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(tcfg), seed], sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps([r.id, r.label, r.instruction, [str(p) for p in r.images]]).encode())
    return h.hexdigest()


def resumable_checkpoint(output_dir: str, fingerprint: str) -> str | None:
    """The last checkpoint in ``output_dir`` if it was written by the same run (same
    fingerprint); checkpoints of another run (other data, settings or seed) are deleted
    with a warning rather than silently resumed."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = Path(output_dir) / "kdsl_fingerprint.txt"
    ckpt = get_last_checkpoint(output_dir)
    if ckpt and not (stamp.is_file() and stamp.read_text() == fingerprint):
        warnings.warn(f"{output_dir}: checkpoints from a different run (data, settings or seed "
                      "changed); starting afresh", stacklevel=3)
        for d in Path(output_dir).glob("checkpoint-*"):
            shutil.rmtree(d)
        ckpt = None
    return ckpt


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def training_arguments(
    tcfg: TrainCfg,
    *,
    output_dir: str,
    seed: int,
    device: str = "cpu",
    bf16: bool = False,
    save: bool = True,
    progress: bool = True,
):
    """The TrainingArguments every mix of a profile shares (only the seed and paths differ)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.learning_rate,
        num_train_epochs=tcfg.epochs,
        max_steps=tcfg.max_steps,
        warmup_steps=tcfg.warmup_ratio,  # < 1: a fraction of the total steps
        weight_decay=tcfg.weight_decay,
        lr_scheduler_type=tcfg.lr_scheduler,
        max_grad_norm=1.0,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=tcfg.save_steps,
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=device == "cpu",
        bf16=bf16 and device != "cpu",
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        # gradient checkpointing, when asked for, is enabled on the model by prepare_for_finetune
    )


def train_sft(
    model,
    encoder,
    records: Sequence[Record],
    tcfg: TrainCfg,
    *,
    seed: int,
    out_dir: Path | str | None = None,
    resume: bool = True,
    device: str = "cpu",
    bf16: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` (already prepared: LoRA / QLoRA / full) on ``records``.

    ``out_dir`` None trains without checkpoints (in a temporary directory).
    """
    from transformers import Trainer, set_seed

    from .models.sft import SFTCollator, SFTDataset

    t0 = time.perf_counter()
    set_seed(seed)
    dataset = SFTDataset(records, encoder)
    if len(dataset) == 0:
        raise ValueError("no training example fits max_length (see the truncation report)")
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="kdsl-train-")
        output_dir = tmp
    else:
        output_dir = str(Path(out_dir))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    try:
        args = training_arguments(
            tcfg,
            output_dir=output_dir,
            seed=seed,
            device=device,
            bf16=bf16,
            save=out_dir is not None,
            progress=progress,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=SFTCollator(encoder, padding_side="right"),
        )
        ckpt = None
        if out_dir is not None:
            fp = run_fingerprint(records, tcfg, seed)
            ckpt = resumable_checkpoint(output_dir, fp) if resume else None
            (Path(output_dir) / "kdsl_fingerprint.txt").write_text(fp)
        trainer.train(resume_from_checkpoint=ckpt)
        if out_dir is not None:
            trainer.save_state()
        curve = [
            {
                "step": int(h["step"]),
                "loss": float(h["loss"]),
                "lr": float(h.get("learning_rate", float("nan"))),
                "epoch": float(h.get("epoch", 0.0)),
            }
            for h in trainer.state.log_history
            if "loss" in h
        ]
        trainable, _ = count_trainable(model)
        return TrainResult(
            loss_curve=curve,
            steps=int(trainer.state.global_step),
            wall_s=time.perf_counter() - t0,
            n_examples=len(dataset),
            truncation=dataset.report.as_dict(),
            checkpoint_dir=output_dir if out_dir else None,
            resumed_from=ckpt,
            trainable_params=trainable,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def evaluate_loss(model, encoder, records: Sequence[Record], *, batch_size: int = 4) -> float:
    """Mean answer-token negative log-likelihood (the training objective) over ``records``,
    in eval mode (no dropout), summed over tokens and divided once (not a mean of batch means)."""
    import torch

    from .models.sft import SFTCollator, SFTDataset

    ds = SFTDataset(records, encoder)
    collate = SFTCollator(encoder, padding_side="right")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            feats = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
            b = {k: v.to(dev) for k, v in collate(feats).items()}
            labels = b.pop("labels")
            logits = model(**b).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = labels[:, 1:]
            m = tgt != -100
            total -= lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[m].sum().item()
            n += int(m.sum())
    model.train(was_training)
    return total / max(n, 1)


def accelerate_config(kind: str, num_processes: int = 8, grad_accum: int = 8) -> str:
    """YAML for ``accelerate launch --config_file`` (see the module docstring)."""
    if kind not in ACCELERATE_KINDS:
        raise ValueError(f"unknown accelerate config {kind!r}; choose one of {ACCELERATE_KINDS}")
    head = (
        "compute_environment: LOCAL_MACHINE\n"
        f"distributed_type: {'FSDP' if kind == 'fsdp' else 'DEEPSPEED'}\n"
        "mixed_precision: bf16\nnum_machines: 1\nmachine_rank: 0\n"
        f"num_processes: {num_processes}\nmain_training_function: main\nuse_cpu: false\n"
    )
    if kind == "fsdp":
        return head + (
            "fsdp_config:\n"
            "  fsdp_version: 1\n"
            "  fsdp_sharding_strategy: FULL_SHARD\n"
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
            "  fsdp_transformer_layer_cls_to_wrap: Qwen2VLDecoderLayer,Qwen2VLVisionBlock\n"
            "  fsdp_backward_prefetch: BACKWARD_PRE\n"
            "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
            "  fsdp_use_orig_params: true\n"
            "  fsdp_cpu_ram_efficient_loading: true\n"
            "  fsdp_sync_module_states: true\n"
            "  fsdp_offload_params: false\n"
        )
    return head + (
        "deepspeed_config:\n"
        "  zero_stage: 3\n"
        "  zero3_init_flag: false\n"
        "  zero3_save_16bit_model: true\n"
        "  offload_optimizer_device: none\n"
        "  offload_param_device: none\n"
        f"  gradient_accumulation_steps: {grad_accum}\n"
        "  gradient_clipping: 1.0\n"
    )


def write_accelerate_config(
    path: Path | str, kind: str = "fsdp", num_processes: int = 8, grad_accum: int = 8
) -> Path:
    path = Path(path)
    path.write_text(accelerate_config(kind, num_processes, grad_accum), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdsl_utils.train``: one fine-tune of the qwen_vl backend (also under
    ``accelerate launch``), or print an accelerate config."""
    p = argparse.ArgumentParser(prog="python -m kdsl_utils.train", description=main.__doc__)
    p.add_argument("--write-accelerate-config", choices=ACCELERATE_KINDS)
    p.add_argument("--num-processes", type=int, default=8)
    p.add_argument("--profile", default="paper")
    p.add_argument("--data-dir")
    p.add_argument("--mix", default="joint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.write_accelerate_config:
        sys.stdout.write(accelerate_config(a.write_accelerate_config, a.num_processes))
        return 0
    if not (a.data_dir and a.out):
        p.error("--data-dir and --out are required to train")
    from .config import resolve
    from .data.mire import load_mire
    from .models.qwen_vl import QwenVLBackend

    cfg = resolve(a.profile)
    data = load_mire(a.data_dir, test_files=[])
    backend = QwenVLBackend(cfg)
    info = backend.fit(data.train, mix=a.mix, seed=a.seed, out_dir=Path(a.out) / "trainer")
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: one writer
        backend.save(Path(a.out) / "model")
        print({k: v for k, v in info.items() if k != "loss_curve"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
