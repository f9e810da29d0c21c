"""Execute a numbered notebook with papermill and render it to HTML (used by the Makefile).

    python -m kdsl_utils.notebooks 00_data --out products/mini/synthetic/seed0 -p PROFILE mini ...
    python -m kdsl_utils.notebooks --stamp results/mini/synthetic/seed0/params.json -p PROFILE mini ...

The executed notebook and its HTML rendering are written to ``--out``. Parameters are
given as ``-p NAME VALUE`` (VALUE parsed as JSON when it parses, else kept as a string).
Path parameters (``DATA_DIR``, ``RESULTS_DIR``, ``FIGURES_DIR``, ``README`` and json paths in
``TEST_FILES``) may be relative to the current folder, start with ``~`` or hold spaces: they
are made absolute here, because the notebook runs in ``notebooks/``.

``--stamp FILE`` executes nothing: it writes the parameters and a content fingerprint of
the data files they name to FILE, only when they differ from FILE's content, so FILE's time
changes exactly when a result-changing parameter or a data file does (the Makefile makes
every run.json depend on it).

A failure prints one line saying what and where (``[kdsl] ...``) and exits 1; the full
traceback is in the executed notebook.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .data.mire import test_file_paths
from .results import atomic_write, fingerprint

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PATH_PARAMS = ("DATA_DIR", "RESULTS_DIR", "FIGURES_DIR", "README")


def run_notebook(name: str, out_dir: Path | str, parameters: dict, *, html: bool = True,
                 cwd: Path | str | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters`` into ``out_dir/<name>.ipynb``."""
    import papermill as pm

    src = NOTEBOOK_DIR / f"{name}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"no notebook {src}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.ipynb"
    t0 = time.time()
    pm.execute_notebook(str(src), str(dst), parameters=parameters, cwd=str(cwd or NOTEBOOK_DIR),
                        progress_bar=False, log_output=False, kernel_name="python3")
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_filename(str(dst))
        dst.with_suffix(".html").write_text(body, encoding="utf-8")
    print(f"[kdsl] {name}: executed in {time.time() - t0:.0f}s -> {dst}", flush=True)
    return dst


def _value(text: str):
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


def writable(folder: Path | str, what: str) -> str | None:
    """None if files can be created in ``folder`` (made if missing), else a one-line reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"cannot write {what} to {folder}: {e.strerror or e}"
    return None


def write_stamp(path: Path | str, params: dict) -> bool:
    """Write ``params`` (RESULTS_DIR left out: it is the stamp's own place) and a fingerprint
    of the data files they name to ``path`` if that changes its content; True if written."""
    params = {k: v for k, v in sorted(params.items()) if k != "RESULTS_DIR" and not (k == "TEST_FILES" and not v)}
    doc: dict = {"params": params}
    if params.get("DATA_DIR"):
        root = Path(params["DATA_DIR"])
        files = [root / "train.json", *test_file_paths(root, params.get("TEST_FILES") or None)]
        doc["data_files"] = {str(f): (fingerprint([f]) if f.is_file() else "missing") for f in files}
        # Images by name, size and modification time (hashing every image on each make call
        # would cost seconds; a replaced image changes its size or time).
        h = hashlib.sha256()
        for img in sorted((root / "images").rglob("*")) if (root / "images").is_dir() else []:
            st = img.stat()
            h.update(f"{img.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        doc["images"] = h.hexdigest()[:16]
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
    ap.add_argument("name", nargs="?", help="notebook name without .ipynb, e.g. 00_data")
    ap.add_argument("--out", help="folder for the executed notebook and its HTML")
    ap.add_argument("--stamp", help="write the parameter stamp file instead of executing")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--no-html", action="store_true")
    args = ap.parse_args(argv)
    params = absolute_params({k: _value(v) for k, v in args.p})
    if args.stamp:
        try:
            write_stamp(user_path(args.stamp), params)
        except OSError as e:
            print(f"[kdsl] cannot write the parameter stamp {args.stamp}: {e.strerror or e}", file=sys.stderr)
            return 1
        return 0
    if not args.name or not args.out:
        ap.error("give a notebook name and --out (or --stamp)")
    # Environment errors first, in one line each, before a kernel starts.
    for folder, what in ((user_path(args.out), "the executed notebook"),
                         (params.get("RESULTS_DIR"), "results (RESULTS_DIR)"),
                         (params.get("FIGURES_DIR"), "figures (FIGURES_DIR)")):
        problem = folder and writable(folder, what)
        if problem:
            print(f"[kdsl] {args.name}: {problem}", file=sys.stderr)
            return 1
    # papermill loads only when a notebook runs (as in run_notebook): every make call runs
    # --stamp, which must stay light.
    from papermill.exceptions import PapermillExecutionError

    out = user_path(args.out)
    try:
        run_notebook(args.name, out, params, html=not args.no_html)
    except PapermillExecutionError as e:
        # What and where first, in one line; the end of the traceback (colour codes removed) after.
        tail = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(e.traceback or [])).strip().splitlines()[-12:]
        print(f"[kdsl] notebook {args.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}", file=sys.stderr)
        print("\n".join(["    " + line for line in tail]
                        + [f"[kdsl] full traceback: {Path(out) / (args.name + '.ipynb')}"]), file=sys.stderr)
        return 1
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"[kdsl] notebook {args.name}: {type(e).__name__}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
