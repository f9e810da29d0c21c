"""The parameter stamp of a results folder, and paths as users type them (used by the Makefile).

    python -m kdsl_utils.stamp results/mini/synthetic/seed0/params.json -p PROFILE mini ...

Writes the parameters (``-p NAME VALUE``, VALUE parsed as JSON when it parses, else kept as a
string; ``OVERRIDES`` included) and a content fingerprint of the data files they name to
FILE, only when they differ from FILE's content, so FILE's time changes exactly when a
result-changing parameter or a data file does (the Makefile makes every run.json depend on
it). Every make call that may run a notebook refreshes the stamp, so this module stays light:
it imports neither papermill nor the models (that is why it is not part of
:mod:`kdsl_utils.notebooks`, which loads papermill and nbconvert at import).

Path parameters (``DATA_DIR``, ``RESULTS_DIR``, ``FIGURES_DIR``, ``README`` and json paths
in ``TEST_FILES``) may be relative to the current folder, start with ``~`` or hold spaces:
:func:`absolute_params` makes them absolute (the notebooks run in ``notebooks/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data.mire import test_file_paths
from .hashing import files_digest, sha256_text
from .results import atomic_write

PATH_PARAMS = ("DATA_DIR", "RESULTS_DIR", "FIGURES_DIR", "README")


def parse_value(text: str):
    """A ``-p`` value: JSON when it parses (numbers, booleans, lists, the OVERRIDES dict), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def user_path(p: str) -> str:
    """A path as a user typed it (relative to the current folder, ``~``, spaces) made absolute
    (symlinks kept, as the data tag is the directory's own name)."""
    return os.path.abspath(os.path.expanduser(p)) if p else p


def absolute_params(params: dict) -> dict:
    """``params`` with its path parameters made absolute (see the module docstring)."""
    out = dict(params)
    for k in PATH_PARAMS:
        if isinstance(out.get(k), str):
            out[k] = user_path(out[k])
    tf = out.get("TEST_FILES")
    if isinstance(tf, str):
        tf = [tf] if tf else []
    if isinstance(tf, list):
        out["TEST_FILES"] = [user_path(t) if isinstance(t, str) and t.endswith(".json") else t for t in tf]
    return out


def write_stamp(path: Path | str, params: dict) -> bool:
    """Write ``params`` (RESULTS_DIR left out: it is the stamp's own place) and a fingerprint
    of the data files they name to ``path`` if that changes its content; True if written."""
    params = {k: v for k, v in sorted(params.items())
              if k != "RESULTS_DIR" and not (k in ("TEST_FILES", "OVERRIDES") and not v)}
    doc: dict = {"params": params}
    if params.get("DATA_DIR"):
        root = Path(params["DATA_DIR"])
        files = [root / "train.json", *test_file_paths(root, params.get("TEST_FILES") or None)]
        doc["data_files"] = {str(f): (files_digest([f]) if f.is_file() else "missing") for f in files}
        # Images by name, size and modification time (hashing every image on each make call
        # would cost seconds; a replaced image changes its size or time).
        lines = []
        for img in sorted((root / "images").rglob("*")) if (root / "images").is_dir() else []:
            st = img.stat()
            lines.append(f"{img.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n")
        doc["images"] = sha256_text("".join(lines))[:16]
    text = json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    atomic_write(path, text)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stamp", help="the params.json to write")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = ap.parse_args(argv)
    params = absolute_params({k: parse_value(v) for k, v in args.p})
    try:
        write_stamp(user_path(args.stamp), params)
    except OSError as e:
        print(f"[kdsl] cannot write the parameter stamp {args.stamp}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
