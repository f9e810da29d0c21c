"""Multi-GPU training through `accelerate launch` (issue 12, item 7).

No GPU here: the launch path itself runs single-process on the CPU (``accelerate launch
--num_processes 1 --cpu``, the tiny twin, a few steps), and the checked-in FSDP / DeepSpeed
ZeRO-3 recipes are taken through accelerate's own launcher code up to the environment it
hands the training process (what the Trainer reads to shard), with FSDP's auto-wrap policy
resolved against the model's module classes. Training under ZeRO-3 itself needs the
``deepspeed`` package, which is not a pinned dependency.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.dataclasses import get_module_class_from_name
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from kdsl_utils.config import resolve
from kdsl_utils.models.qwen_vl import load_model
from kdsl_utils.models.tiny import tiny_model_dir

from conftest import image_record, make_mire

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "accelerate"
TRAIN = ["-m", "kdsl_utils.models.launch", "--profile", "tiny", "--mix", "image", "--seed", "0"]


def _launcher_args(config: Path, n: int = 2):
    """What `accelerate launch --config_file config --num_processes n -m ...` resolves."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "--num_processes", str(n), *TRAIN])
    return _validate_launch_command(args)


def test_launch_single_process_on_cpu(tmp_path):
    data = make_mire(tmp_path / "mire", [image_record(f"img{i:02d}" * 3) for i in range(4)])
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *TRAIN, "--data-dir", str(data), "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta = json.loads((out / "model" / "kdsl_qwen_vl.json").read_text())
    assert meta["fit"]["mix"] == "image" and meta["fit"]["n_train"] == 4
    assert meta["fit"]["steps"] == resolve("tiny").train.max_steps  # the profile's cap
    assert len(meta["fit"]["losses"]) == meta["fit"]["steps"]
    assert (out / "model" / "adapter").is_dir()  # LoRA: the adapter is what is saved


def test_fsdp_recipe_reaches_the_training_process():
    args, _, _ = _launcher_args(RECIPES / "fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 2 and not args.cpu
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # peft: frozen base + trainable adapters
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # the plugin the Trainer builds from that environment wraps the model's real layers
    cfg = resolve("tiny")
    model = load_model(tiny_model_dir(min_pixels=cfg.model.min_pixels,
                                      max_pixels=cfg.model.max_pixels), cfg.model)
    # (FullyShardedDataParallelPlugin.set_auto_wrap_policy resolves each name so, and fails
    # on one the model lacks; the plugin itself cannot be built without an accelerator)
    names = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    classes = {n: get_module_class_from_name(model, n) for n in names}
    assert set(names) == {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"}
    assert all(c is not None and c.__name__ == n for n, c in classes.items()), classes


def test_zero3_recipe_reaches_the_training_process():
    args, defaults, mp_from_config = _launcher_args(RECIPES / "zero3.yaml", n=4)
    assert args.use_deepspeed and args.zero_stage == 3 and args.num_processes == 4
    # as accelerate's launch_command does before starting DeepSpeed's launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "8"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"  # LoRA is applied after loading
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "1.0"
    assert args.module and args.training_script == "kdsl_utils.models.launch"
