"""Shared fixtures: tiny hand-made MIRE directories, the real data location, test tiers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from kdsl_utils.data.mire import load_mire
from kdsl_utils.data.prompts import image_instruction, intent_instruction
from kdsl_utils.data.synth import generate_mire
from kdsl_utils.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
REAL_MIRE = Path(os.environ.get("KDSL_MIRE_DIR", REPO.parent / "shared" / "mire"))


TIERS = ("unit", "smoke", "realdata")


def pytest_collection_modifyitems(items):
    """A test without a tier marker is a unit test (``make test-unit`` / ``-m unit``)."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


def real_mire_dir() -> Path:
    """The real MIRE data, or skip: it is never shipped with the project."""
    if not (REAL_MIRE / "train.json").is_file():
        pytest.skip(f"real MIRE data not found at {REAL_MIRE} (set KDSL_MIRE_DIR); "
                    "the project never ships it")
    return REAL_MIRE


@pytest.fixture
def real_mire() -> Path:
    return real_mire_dir()


def write_image(path: Path, size=(64, 96), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def image_record(rid: str, label: str = "退款页面", n_images: int = 1) -> dict:
    return {"id": rid, "instruction": image_instruction(n_images), "input": "", "output": label,
            "image": [f"{rid}-{k}.jpg" for k in range(n_images)]}


def intent_record(rid: str, label: str = "商品材质", n_images: int = 1) -> dict:
    turns = [("用户", "你好"), ("客服", "您好，请问有什么可以帮您")]
    turns += [("用户", "<image>")] * n_images
    turns += [("用户", "这个杯子是什么材质的"), ("客服", "亲，是不锈钢的哦")]
    return {"id": rid, "instruction": intent_instruction(turns), "input": "", "output": label,
            "image": [f"{rid}-{k}.jpg" for k in range(n_images)]}


def make_mire(root: Path, train: list[dict], tests: dict[str, list[dict]] | None = None,
              images: bool = True) -> Path:
    """Write a MIRE directory with the given raw records (and a valid image for each name)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, recs in {"train": train, **(tests or {})}.items():
        (root / f"{name}.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
        if images:
            for r in recs:
                names = r.get("image") if isinstance(r, dict) else None
                for n in names if isinstance(names, list) else []:
                    if isinstance(n, str) and n and not (root / "images" / n).exists():
                        write_image(root / "images" / n)
    (root / "images").mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one torch thread is faster, and immune to a busy shared CPU (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    with torch_threads(1):
        yield


def synthetic_mire(tmp_path_factory, per_label: int = 1):
    """A loaded synthetic MIRE directory: ``per_label`` train and 1 test1 record per label."""
    root = generate_mire(tmp_path_factory.mktemp("mire") / "syn", seed=0, per_label=per_label,
                         test_per_label=1, test_files=("test1",))
    return load_mire(root)
