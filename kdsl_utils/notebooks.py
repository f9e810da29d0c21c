"""Execute a numbered notebook with papermill and render it to HTML (used by the Makefile).

    python -m kdsl_utils.notebooks 00_data --out products/mini/synthetic/seed0 -p PROFILE mini ...

The executed notebook and its HTML rendering are written to ``--out``. Parameters are
given as ``-p NAME VALUE`` (VALUE parsed as JSON when it parses, else kept as a string), so
``-p OVERRIDES '{"train__epochs": 5}'`` arrives in the notebook as a dict. Path parameters
(relative, ``~``, spaces) are made absolute (:func:`kdsl_utils.stamp.absolute_params`),
because the notebook runs in ``notebooks/``. The parameter stamp the Makefile's targets
depend on is written by :mod:`kdsl_utils.stamp` (light: no papermill).

A failure prints one line saying what and where (``[kdsl] ...``) and exits 1; the full
traceback is in the executed notebook.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import papermill as pm
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError

from .stamp import absolute_params, parse_value, user_path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, out_dir: Path | str, parameters: dict, *, html: bool = True,
                 cwd: Path | str | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters`` into ``out_dir/<name>.ipynb``."""
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
        body, _ = HTMLExporter().from_filename(str(dst))
        dst.with_suffix(".html").write_text(body, encoding="utf-8")
    print(f"[kdsl] {name}: executed in {time.time() - t0:.0f}s -> {dst}", flush=True)
    return dst


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="notebook name without .ipynb, e.g. 00_data")
    ap.add_argument("--out", required=True, help="folder for the executed notebook and its HTML")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--no-html", action="store_true")
    args = ap.parse_args(argv)
    params = absolute_params({k: parse_value(v) for k, v in args.p})
    # Environment errors first, in one line each, before a kernel starts.
    for folder, what in ((user_path(args.out), "the executed notebook"),
                         (params.get("RESULTS_DIR"), "results (RESULTS_DIR)"),
                         (params.get("FIGURES_DIR"), "figures (FIGURES_DIR)")):
        problem = folder and writable(folder, what)
        if problem:
            print(f"[kdsl] {args.name}: {problem}", file=sys.stderr)
            return 1
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
