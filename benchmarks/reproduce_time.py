"""Time ``make reproduce`` end to end and per notebook, with the feature stages (issue 10).

    python benchmarks/reproduce_time.py --data ../shared/mire --cache cold --readme
    python benchmarks/reproduce_time.py --data ../shared/mire --cache /path/to/warm/cache --readme

Runs ``make reproduce DATA_DIR=... PROFILE=mini`` into a fresh results folder, with the
feature cache ``$KDSL_FEATURE_CACHE`` set to an empty folder (``--cache cold``) or to the one
given (warm: every feature already there). Prints the wall time of the whole command, then
per notebook its start and end (seconds from the command's start, from each ``run.json``'s
``started`` and ``wall_time_s``) and what it extracted (computed / cached items and seconds
per extractor, OCR detection and recognition summed over workers). Notebooks run
``JOBS`` at a time (the profile's ``notebook_jobs``), so their times overlap.

Time it on an idle machine: anything beside it inflates every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from readme_sections import write_section

REPO = Path(__file__).resolve().parents[1]


def load_avg() -> float:
    return os.getloadavg()[0]


def notebook_rows(run_root: Path, t0: float) -> list[dict]:
    rows = []
    for rj in sorted(run_root.glob("*/run.json")):
        doc = json.loads(rj.read_text(encoding="utf-8"))
        start = datetime.strptime(doc["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp() - t0
        ext = doc.get("feature_extraction", {})
        parts = []
        for kind, v in ext.items():
            if v.get("computed") or v.get("seconds", 0) > 0.5:
                extra = (f", det {v['det_s']:.0f} + rec {v['rec_s']:.0f} s" if "det_s" in v else "")
                parts.append(f"{kind} {v['computed']}/{v['computed'] + v['cached']} in "
                             f"{v['seconds']:.0f} s{extra}")
        rows.append({"notebook": doc["experiment"], "start": start,
                     "end": start + doc["wall_time_s"], "wall": doc["wall_time_s"],
                     "computed": "; ".join(parts) or "all cached"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="MIRE directory")
    ap.add_argument("--cache", default="cold", help="'cold' (an empty cache) or a cache folder")
    ap.add_argument("--jobs", type=int, default=0, help="JOBS for make (0: the profile's)")
    ap.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kdsl-reproduce-time-"))
    cache = tmp / "cache" if args.cache == "cold" else Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    readme = tmp / "README.md"  # the report's README section, kept out of the repository's
    readme.write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    cmd = ["make", "reproduce", f"DATA_DIR={Path(args.data).resolve()}", "PROFILE=mini",
           f"RESULTS_ROOT={tmp / 'results'}", f"PRODUCTS_ROOT={tmp / 'products'}",
           f"FIGURES_DIR={tmp / 'figures'}", f"REPORT_README={readme}"]
    cmd += [f"JOBS={args.jobs}"] if args.jobs else []
    load0 = load_avg()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "KDSL_FEATURE_CACHE": str(cache)},
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"make reproduce failed (rc {proc.returncode}); results in {tmp}", file=sys.stderr)
        return 1
    run_root = next((tmp / "results" / "mini").glob("*/seed0"))
    rows = notebook_rows(run_root, t0)
    kind = "cold (empty feature cache)" if args.cache == "cold" else "warm (every feature cached)"
    lines = [f"### `make reproduce DATA_DIR={args.data} PROFILE=mini`, {kind}"
             f"{f', JOBS={args.jobs}' if args.jobs else ''}",
             "",
             f"{os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs, load average "
             f"{load0:.1f} at the start; `python benchmarks/reproduce_time.py --data {args.data} "
             f"--cache {'cold' if args.cache == 'cold' else '<warm cache>'}"
             f"{f' --jobs {args.jobs}' if args.jobs else ''}`.",
             "",
             f"**Whole command: {wall:.0f} s ({int(wall // 60)} min {wall % 60:.0f} s).** Times in s "
             "from the command's start; notebooks run side by side where their inputs allow.",
             "",
             "| notebook | start | end | wall | features computed / all (extractor seconds) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['start']:.0f} | {r['end']:.0f} | {r['wall']:.0f} | {r['computed']} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        write_section(f"reproduce_time:{'cold' if args.cache == 'cold' else 'warm'}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
