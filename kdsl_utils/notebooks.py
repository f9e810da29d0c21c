"""Execute a numbered notebook with papermill and render it to HTML (used by the Makefile).

    python -m kdsl_utils.notebooks 00_data --out products/mini/synthetic -p PROFILE mini ...

The executed notebook and its HTML rendering are written to ``--out``. Parameters are
given as ``-p NAME VALUE`` (VALUE parsed as JSON when it parses, else kept as a string), so
``-p OVERRIDES '{"train__epochs": 5}'`` arrives in the notebook as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import papermill as pm
from nbconvert import HTMLExporter

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


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="notebook name without .ipynb, e.g. 00_data")
    ap.add_argument("--out", required=True, help="folder for the executed notebook and its HTML")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--no-html", action="store_true")
    args = ap.parse_args(argv)
    run_notebook(args.name, args.out, {k: _value(v) for k, v in args.p}, html=not args.no_html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
