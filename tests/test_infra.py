"""Project infrastructure: the hashing recipes (keys on disk depend on them), overrides in
results paths, the notebook dependency walker and notebook 00's package functions."""

from __future__ import annotations

import hashlib
import json
import zlib

import pandas as pd
import pytest
from conftest import REPO, image_record, intent_record, make_mire

from kdsl_utils import hashing
from kdsl_utils.config import ConfigError, overrides_tag, parse_overrides, results_profile
from kdsl_utils.data.labels import IMAGE_LABELS, INTENT_LABELS
from kdsl_utils.data.mire import load_split
from kdsl_utils.data.stats import DATASET_METRICS, dataset_metric_rows, gallery_sample
from kdsl_utils.deps import module_closure, notebook_deps


def test_hash_recipes_are_the_ones_keys_on_disk_were_made_with(tmp_path):
    # The feature cache and rule ids were keyed with these exact recipes before hashing.py.
    obj = {"b": [1, "二"], "a": 0.5}
    assert hashing.json_digest(obj, 10) == hashlib.sha256(
        json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]
    assert hashing.sha1_text("规则", 10) == hashlib.sha1("规则".encode()).hexdigest()[:10]
    assert hashing.stable_int("rec-1") == zlib.crc32(b"rec-1")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("[1]")
    b.write_text("[2]")
    old = hashlib.sha256()
    for p in (a, b):
        old.update(p.name.encode())
        old.update(hashlib.sha256(p.read_bytes()).digest())
    assert hashing.files_digest([b, a]) == old.hexdigest()[:16]  # order-independent
    assert hashing.sha256_file(a) == hashlib.sha256(b"[1]").hexdigest()


def test_overrides_tag_the_results_path_and_are_validated():
    assert results_profile("mini") == "mini" and overrides_tag({}) == ""
    tag = results_profile("mini", {"train__epochs": 5})
    assert tag.startswith("mini-ov") and len(tag) == len("mini-ov") + 8
    assert tag == results_profile("mini", parse_overrides('{"train__epochs": 5}'))
    assert tag != results_profile("mini", {"train__epochs": 6})
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        results_profile("mini", {"train__epoch": 5})
    with pytest.raises(ConfigError, match="JSON object"):
        parse_overrides("[1, 2]")


def test_deps_follow_imports_transitively():
    files, upstream = notebook_deps(REPO / "notebooks" / "03_collaborative.ipynb")
    names = {f.relative_to(REPO).as_posix() for f in files}
    # report -> metrics -> data.labels: reached through report, not imported by the notebook.
    assert {"kdsl_utils/report.py", "kdsl_utils/metrics.py", "kdsl_utils/data/labels.py",
            "kdsl_utils/__init__.py"} <= names
    assert "kdsl_utils/plots.py" not in names  # 03 draws nothing
    assert upstream == ["01_seesaw", "02_mcts_rules"]
    # Importing a submodule runs its package's __init__ (and what that imports).
    rules = {f.name for f in module_closure({"kdsl_utils.rules.schema"})}
    assert {"__init__.py", "engine.py", "mcts.py"} <= rules


def test_dataset_rows_and_gallery_sample(tmp_path):
    raw = [image_record(f"img{i}", label=IMAGE_LABELS[i % 3]) for i in range(10)]
    raw += [intent_record(f"{i:030x}", label=INTENT_LABELS[i % 2]) for i in range(6)]
    recs = load_split(make_mire(tmp_path / "d", raw) / "train.json")[0]
    lengths = pd.DataFrame([{"split": "train", "task": r.task, "label": r.label,
                             "n_images": len(r.images), "text_tokens": 10, "visual_tokens": 4}
                            for r in recs])
    rows = dataset_metric_rows(lengths, seed=3)
    assert len(rows) == 2 * len(DATASET_METRICS)
    got = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert got[("image", "n_records")] == 10 and got[("intent", "n_labels_used")] == 2
    assert got[("image", "p95_total_tokens")] == 14.0
    items, dialogues = gallery_sample(recs, seed=0, n_scene=4, n_dialogue=2)
    assert len(items) == 6 and len(dialogues) == 2 and items[4][1].startswith("[对话] ")
    assert gallery_sample(recs, seed=0, n_scene=4, n_dialogue=2)[0] == items
    assert gallery_sample(recs, seed=1, n_scene=4, n_dialogue=2)[0] != items
