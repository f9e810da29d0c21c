"""Supervised fine-tuning of the qwen_vl backend with Hugging Face's ``Trainer``.

One function, :func:`train_sft`, drives the Trainer with the profile's
:class:`~kdsl_utils.config.TrainCfg`, which is the *same* object for every task mix of a
profile: the seesaw compares fine-tunes that differ only in their data. It is seeded
(``transformers.set_seed``, the Trainer's ``seed``/``data_seed``, the LoRA init), logs the
loss every optimizer step (the returned loss curve), checkpoints every ``save_steps`` into
``out_dir`` and, with ``resume=True``, continues from the last checkpoint there (optimizer,
scheduler, RNG states and data order restored, so an interrupted run ends where an
uninterrupted one would: a test compares the weights bit for bit on CPU). Checkpoints are
tied to their run by :func:`run_fingerprint`.

**A finished training is loaded, never continued.** The Trainer resumed from the last
checkpoint of a *finished* run trains one more step (max_steps 8 -> step 9, then 10 on the
next rerun: every rerun a different model). So at the end the trained parameters are written
to ``FINAL_WEIGHTS`` and then ``DONE_FILE`` (fingerprint + the run's result), each atomically;
a later call with the same fingerprint loads those weights into the prepared model and
returns the recorded result without training. A run that crashed has no ``DONE_FILE`` and
resumes from its last checkpoint.

Single process is the default (and what the tests run); multi-GPU runs go through
``accelerate launch`` (:mod:`kdsl_utils.models.launch`), the Trainer picking the
distributed setup up from the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..config import TrainCfg
from ..data.records import Record
from .sft import SFTCollator, sft_dataset

FINGERPRINT_FILE = "kdsl_fingerprint.txt"
DONE_FILE = "kdsl_done.json"  # written last: the run finished (its fingerprint, result)
FINAL_WEIGHTS = "kdsl_final_trainable.safetensors"  # the trained parameters at the end


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


def run_fingerprint(records: Sequence[Record], tcfg: TrainCfg, seed: int, extra: str = "") -> str:
    """Hash of what a checkpoint depends on: the training records (ids, labels, prompts,
    image paths), the hyper-parameters, the seed and ``extra`` (what else decides the
    targets, e.g. dynamic CoT's rationales and threshold; empty for plain SFT)."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(tcfg), seed], sort_keys=True, default=str).encode())
    if extra:
        h.update(extra.encode())
    for r in records:
        h.update(json.dumps([r.id, r.label, r.instruction, [str(p) for p in r.images]]).encode())
    return h.hexdigest()


def resumable_checkpoint(output_dir: str, fingerprint: str) -> str | None:
    """The last checkpoint in ``output_dir`` if it was written by the same run (same
    fingerprint); checkpoints of another run (other data, settings or seed) are deleted
    with a warning rather than silently resumed."""
    stamp = Path(output_dir) / FINGERPRINT_FILE
    ckpt = get_last_checkpoint(output_dir)
    if ckpt and not (stamp.is_file() and stamp.read_text() == fingerprint):
        warnings.warn(f"{output_dir}: checkpoints from a different run (data, settings or seed "
                      "changed); starting afresh", stacklevel=3)
        for d in Path(output_dir).glob("checkpoint-*"):
            shutil.rmtree(d)
        ckpt = None
    return ckpt


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA adapters, or every unfrozen weight), CPU copies."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_finished(output_dir: Path, model, fingerprint: str, result: TrainResult) -> None:
    """Mark ``output_dir`` as a finished run: its trained parameters, then its result."""
    _write_atomic(output_dir / FINAL_WEIGHTS, lambda t: save_file(trainable_state(model), str(t)))
    done = {"fingerprint": fingerprint, "result": dataclasses.asdict(result)}
    _write_atomic(output_dir / DONE_FILE,
                  lambda t: t.write_text(json.dumps(done, default=str), encoding="utf-8"))


def load_finished(output_dir: Path, model, fingerprint: str) -> TrainResult | None:
    """The result of the finished run in ``output_dir`` with its trained parameters loaded
    into ``model``, or None when there is none (a finished run of another fingerprint is
    removed)."""
    done, weights = output_dir / DONE_FILE, output_dir / FINAL_WEIGHTS
    if not done.is_file():
        return None
    info = json.loads(done.read_text(encoding="utf-8"))
    if info.get("fingerprint") != fingerprint or not weights.is_file():
        done.unlink()
        weights.unlink(missing_ok=True)
        return None
    state = load_file(str(weights))
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(want) or any(state[n].shape != want[n].shape for n in want):
        raise ValueError(f"{weights}: the finished run's parameters do not match this model's "
                         "trainable ones (another fine-tuning mode?)")
    with torch.no_grad():
        for n, p in want.items():
            p.copy_(state[n].to(p.device))
    return TrainResult(**info["result"])


def with_step_budget(tcfg: TrainCfg, steps: int | None) -> TrainCfg:
    """``tcfg`` for a fit of exactly ``steps`` optimizer steps; None: ``tcfg`` unchanged
    (``epochs``, capped by its ``max_steps`` where > 0). The Trainer's ``max_steps`` > 0
    overrides ``num_train_epochs``: it passes over the data as often as needed and stops at
    that step, the learning-rate schedule (warm-up ratio, cosine) spanning the budget. The
    budget is part of the TrainCfg, hence of :func:`run_fingerprint`, so a checkpoint of
    another budget is never resumed."""
    if steps is None:
        return tcfg
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    return dataclasses.replace(tcfg, max_steps=steps)


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
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
) -> TrainingArguments:
    """The TrainingArguments every mix of a profile shares (only the seed and paths differ)."""
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
    callbacks: Sequence[TrainerCallback] = (),
    targets: Mapping[str, str] | None = None,
    fingerprint_extra: str = "",
) -> TrainResult:
    """Fine-tune ``model`` (already prepared: LoRA / QLoRA / full) on ``records``.

    ``out_dir`` None trains without checkpoints (in a temporary directory). ``callbacks``
    go to the Trainer (the tests interrupt a run with one). ``targets`` (record id -> answer
    text, read at every access) replaces the label as the trained answer of the records it
    holds (chain-of-thought targets, :mod:`kdsl_utils.dynamic_cot`); ``fingerprint_extra``
    must then say what decides it, so checkpoints of other targets are not resumed.
    """
    t0 = time.perf_counter()
    fp = run_fingerprint(records, tcfg, seed, fingerprint_extra)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if not resume:  # train afresh: a previous finished result is not this run's
            (Path(out_dir) / DONE_FILE).unlink(missing_ok=True)
        finished = load_finished(Path(out_dir), model, fp)
        if finished is not None:
            finished.wall_s = time.perf_counter() - t0
            finished.extra = {**finished.extra, "loaded_finished": str(Path(out_dir) / FINAL_WEIGHTS)}
            return finished
    set_seed(seed)
    dataset, report = sft_dataset(records, encoder, targets=targets)
    if len(dataset) == 0:
        raise ValueError("no training example fits max_length (see the truncation report)")
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="kdsl-train-")
        output_dir = tmp
    else:
        output_dir = str(Path(out_dir))
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
            callbacks=list(callbacks),
        )
        ckpt = None
        if out_dir is not None:
            ckpt = resumable_checkpoint(output_dir, fp) if resume else None
            (Path(output_dir) / FINGERPRINT_FILE).write_text(fp)
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
        result = TrainResult(
            loss_curve=curve,
            steps=int(trainer.state.global_step),
            wall_s=time.perf_counter() - t0,
            n_examples=len(dataset),
            truncation=report.as_dict(),
            checkpoint_dir=output_dir if out_dir else None,
            resumed_from=ckpt,
            trainable_params=trainable,
            extra={"epochs": float(trainer.state.epoch or 0.0)},  # passes over the data
        )
        if out_dir is not None:
            save_finished(Path(output_dir), model, fp, result)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
