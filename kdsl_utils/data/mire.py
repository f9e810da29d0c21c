"""Load and validate a MIRE directory (the challenge's record format).

A MIRE directory holds ``train.json``, any number of ``test*.json`` and ``images/``. Each
file is a JSON list of ``{"id", "instruction", "input", "output", "image"}``. Loading parses
every record into a :class:`~kdsl_utils.data.records.Record` and checks, per record:

* schema (fields present, types), duplicate ids;
* the task, from the instruction (dialogue markers → intent, else image scene);
* the candidate label list (the last JSON array in the instruction) against the exact
  registry, and the label against the candidates — a label that differs only in
  bracket width gets its own problem class, ``wrong_bracket_width``;
* ``<image>`` placeholders equal ``len(image)``; image records have at least one image;
* the dialogue parses into turns (roles 用户/客服) and has at least one customer turn;
* every image name resolves inside the data directory's ``images/`` (no ``..``, absolute
  path or symlink leading out of it), exists, is not a decompression bomb, and decodes.

A missing ``images/`` folder is an error naming the folder. :func:`load_mire` also reports
leakage between train and the test splits (same record id, same image file content).

``strict=True`` (the default) raises :class:`MireValidationError` listing every problem
with its file and record id; ``strict=False`` skips the bad records and reports them in a
:class:`~kdsl_utils.data.records.LoadReport`, so a long run can go on knowingly.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .labels import IMAGE_TASK, INTENT_TASK, LABEL_TO_TASK, LABELS, near_miss
from .prompts import DIALOGUE_END, DIALOGUE_START
from .records import AGENT, IMAGE_TOKEN, USER, LoadReport, Problem, Record, Turn

REQUIRED_FIELDS = {"id": str, "instruction": str, "input": str, "output": str, "image": list}
#: Pillow refuses images above this many pixels (decompression-bomb guard). Real MIRE
#: images are at most 1024 px on the long side; phone screenshots at full size are ~3 Mpx.
MAX_IMAGE_PIXELS = 40_000_000
_CANDIDATES = re.compile(r"\[\s*\"[^\[\]]*\"\s*\]")
_TURN = re.compile(rf"^({USER}|{AGENT})[:：]\s?(.*)$")


class MireError(ValueError):
    """A MIRE file cannot be read at all (missing, not JSON, not a list of records)."""


class MireValidationError(MireError):
    """Records failed validation under ``strict=True``; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[Problem], limit: int = 20):
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        super().__init__(f"{len(self.problems)} invalid MIRE record(s):\n  {shown}{more}\n"
                         "Fix the data, or load with strict=False to skip these records.")


@dataclass
class MireData:
    """A loaded MIRE directory: the train split, the test splits by name, and load reports."""

    root: Path
    train: list[Record]
    tests: dict[str, list[Record]] = field(default_factory=dict)
    reports: dict[str, LoadReport] = field(default_factory=dict)
    #: train/test leakage found on load (kinds ``id_in_train``, ``image_in_train``).
    leaks: list[Problem] = field(default_factory=list)

    def leakage_summary(self) -> str:
        """One line per test split: record ids and image files it shares with train."""
        lines = []
        for split in self.tests:
            ids = sum(p.kind == "id_in_train" for p in self.leaks if p.file == f"{split}.json")
            imgs = sum(p.kind == "image_in_train" for p in self.leaks if p.file == f"{split}.json")
            lines.append(f"leakage {split} vs train: {ids} record id(s) and {imgs} record(s) with an "
                         f"image file identical (same bytes) to a train image"
                         + ("" if ids + imgs else " — none"))
        return "\n".join(lines)

    @property
    def splits(self) -> dict[str, list[Record]]:
        return {"train": self.train, **self.tests}


def parse_candidates(instruction: str) -> tuple[str, ...]:
    """The candidate label list: the last JSON string array in the instruction."""
    found = _CANDIDATES.findall(instruction)
    if not found:
        raise ValueError("no candidate label list (a JSON array of strings) in the instruction")
    labels = json.loads(found[-1])
    if not all(isinstance(x, str) for x in labels):
        raise ValueError("candidate label list holds non-strings")
    return tuple(labels)


def detect_task(instruction: str) -> str:
    """``intent`` when the instruction carries a dialogue, else ``image``."""
    return INTENT_TASK if DIALOGUE_START in instruction else IMAGE_TASK


def parse_dialogue(instruction: str) -> tuple[Turn, ...]:
    """Turns between the dialogue markers; ``<image>`` placeholders numbered in order.

    A line that does not start with a speaker prefix continues the previous turn (some
    agent messages span lines). Raises ValueError when the markers are missing or a
    continuation line precedes any turn.
    """
    start, end = instruction.find(DIALOGUE_START), instruction.find(DIALOGUE_END)
    if start < 0 or end < start:
        raise ValueError("dialogue markers missing or out of order")
    body = instruction[start + len(DIALOGUE_START):end].strip("\n")
    turns: list[list] = []  # [role, text]
    for line in body.split("\n") if body else []:
        m = _TURN.match(line)
        if m:
            turns.append([m.group(1), m.group(2)])
        elif turns:
            turns[-1][1] += "\n" + line
        elif line.strip():
            raise ValueError(f"dialogue line without a speaker prefix: {line[:40]!r}")
    out, k = [], 0
    for role, text in turns:
        n = text.count(IMAGE_TOKEN)
        out.append(Turn(role=role, text=text, images=tuple(range(k, k + n))))
        k += n
    return tuple(out)


def check_image(path: Path, decode: bool = True) -> str | None:
    """None if the image is usable, else a short problem description (never raises)."""
    if not path.is_file():
        return "missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"decompression bomb: {w}x{h} px exceeds {MAX_IMAGE_PIXELS} px"
                if decode:
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # fast JPEG decode
                    im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb: {e}"
    except Exception as e:  # Pillow raises many types for corrupt data
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def _validate(raw: object, source: str, images_dir: Path, seen: set[str],
              decode_images: bool) -> tuple[Record | None, list[Problem]]:
    """Parse one raw record; return (record or None, problems)."""
    rid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None

    def bad(kind: str, msg: str) -> tuple[None, list[Problem]]:
        return None, [Problem(source, rid, kind, msg)]

    if not isinstance(raw, dict):
        return bad("not_an_object", f"record is a {type(raw).__name__}, expected an object")
    for name, typ in REQUIRED_FIELDS.items():
        if name not in raw:
            return bad("missing_field", f"field {name!r} is missing")
        if not isinstance(raw[name], typ):
            return bad("wrong_type", f"field {name!r} is {type(raw[name]).__name__}, expected {typ.__name__}")
    if not raw["id"]:
        return bad("missing_field", "empty id")
    if rid in seen:
        return bad("duplicate_id", "id occurs more than once")
    seen.add(rid)
    instruction, images = raw["instruction"], raw["image"]
    if not all(isinstance(x, str) and x for x in images):
        return bad("wrong_type", "'image' must list non-empty file names")

    task = detect_task(instruction)
    try:
        candidates = parse_candidates(instruction)
    except ValueError as e:
        return bad("bad_candidates", str(e))
    unknown = [c for c in candidates if c not in LABELS[task]]
    if unknown:
        return bad("unknown_candidate", f"candidates not in the {task} label registry: {unknown[:3]}")

    label = raw["output"].strip() or None
    if label is not None and label not in candidates:
        hint = near_miss(label)
        if hint is not None:
            return bad("wrong_bracket_width", f"label {label!r} differs from {hint!r} only in "
                       "character width (e.g. ASCII vs full-width brackets); labels must match exactly")
        if label in LABEL_TO_TASK:
            return bad("label_not_in_candidates", f"label {label!r} is a {LABEL_TO_TASK[label]} label, "
                       f"not among this {task} record's candidates")
        return bad("unknown_label", f"label {label!r} is not in the label registry")

    n_placeholders = instruction.count(IMAGE_TOKEN)
    if n_placeholders != len(images):
        return bad("placeholder_mismatch", f"{n_placeholders} <image> placeholder(s) but "
                   f"{len(images)} image file(s)")
    turns: tuple[Turn, ...] = ()
    if task == IMAGE_TASK:
        if not images:
            return bad("no_image", "image-scene record without an image")
    else:
        try:
            turns = parse_dialogue(instruction)
        except ValueError as e:
            return bad("bad_dialogue", str(e))
        if not any(t.role == USER and t.text.strip() for t in turns):
            return bad("empty_dialogue", "dialogue has no customer (用户) turn")

    paths = tuple(images_dir / name for name in images)
    for name, p in zip(images, paths):
        # Data stays in its directory: '..', absolute names and symlinks must not lead out of
        # images/ (a valid image elsewhere on the machine would otherwise be read silently).
        try:
            resolved = p.resolve()
            p.stat()
        except FileNotFoundError:
            pass  # reported as missing below, once the name is known to stay inside
        except (OSError, ValueError, RuntimeError) as e:  # NUL byte, name too long, symlink loop
            return bad("bad_image_name", f"image {name[:80]!r}: unusable file name ({type(e).__name__}: {e})"[:300])
        if not resolved.is_relative_to(images_dir):
            return bad("image_outside_data", f"image {name!r} resolves to {resolved}, outside "
                       f"the data directory's images folder {images_dir}")
        problem = check_image(p, decode=decode_images)
        if problem:
            kind = ("missing_image" if problem == "missing" else
                    "decompression_bomb" if problem.startswith("decompression") else "corrupt_image")
            return bad(kind, f"image {name!r} ({p}): {problem}")
    rec = Record(id=rid, task=task, instruction=instruction, label=label, images=paths,
                 candidates=candidates, turns=turns, source=source, input=raw["input"])
    return rec, []


def read_json_list(path: Path) -> list:
    """The JSON list in ``path``, or MireError naming the file (and line/column if malformed)."""
    path = Path(path)
    if not path.is_file():
        raise MireError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise MireError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise MireError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise MireError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_split(path: Path | str, images_dir: Path | str | None = None, *, strict: bool = True,
               decode_images: bool = True, require_labels: bool = False) -> tuple[list[Record], LoadReport]:
    """Parse and validate one MIRE json file; images are looked up in ``images_dir``
    (default: ``images/`` beside the file). ``require_labels`` (train): a record with an
    empty ``output`` is a problem (``missing_label``), not an unlabelled record."""
    path = Path(path)
    images_dir = Path(images_dir) if images_dir is not None else path.parent / "images"
    raw = read_json_list(path)
    if not images_dir.is_dir() and any(isinstance(r, dict) and r.get("image") for r in raw):
        raise MireError(f"{path}: its records name images, but the images folder {images_dir} "
                        f"{'is not a folder' if images_dir.exists() else 'does not exist'} "
                        "(a MIRE directory holds train.json, test*.json and images/)")
    report, records, seen = LoadReport(n_read=len(raw)), [], set()
    for item in raw:
        rec, problems = _validate(item, path.name, images_dir.resolve(), seen, decode_images)
        if rec is not None and rec.label is None and require_labels:
            rec, problems = None, [Problem(path.name, rec.id, "missing_label",
                                           "empty 'output': a training record needs its label")]
        report.problems += problems
        if rec is not None:
            records.append(rec)
    report.n_kept = len(records)
    if strict and report.problems:
        raise MireValidationError(report.problems)
    return records, report


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_leakage(train: Sequence[Record], tests: dict[str, Sequence[Record]]) -> list[Problem]:
    """Test records that share a record id, or an image file's content (sha256 of its bytes),
    with a train record: a score on them measures memory, not generalisation."""
    digests: dict[Path, str] = {}

    def digest(p: Path) -> str:
        if p not in digests:
            digests[p] = _file_digest(p)
        return digests[p]

    train_ids = {r.id for r in train}
    train_imgs = {digest(p): (r.id, p.name) for r in train for p in r.images}
    out = []
    for split, recs in tests.items():
        for r in recs:
            if r.id in train_ids:
                out.append(Problem(f"{split}.json", r.id, "id_in_train",
                                   "record id also occurs in train.json"))
            for p in r.images:
                hit = train_imgs.get(digest(p))
                if hit is not None:
                    out.append(Problem(f"{split}.json", r.id, "image_in_train",
                                       f"image {p.name} has the same bytes as {hit[1]} of train record {hit[0]!r}"))
                    break
    return out


def find_test_files(root: Path) -> list[str]:
    """Names (without .json) of the test splits in a MIRE directory, sorted."""
    return sorted(p.stem for p in Path(root).glob("test*.json"))


def test_file_paths(root: Path | str, test_files: Sequence[str | Path] | None = None) -> list[Path]:
    """The json files of the test splits: ``test_files`` are split names (``"test1"`` →
    ``root/test1.json``) or paths to json files (``~`` expanded; relative to the current
    folder); None: every ``test*.json`` in ``root``."""
    root = Path(root)
    if test_files is None:
        return [root / f"{t}.json" for t in find_test_files(root)]
    out = []
    for t in test_files:
        p = Path(t).expanduser()
        out.append(p.absolute() if p.suffix == ".json" else root / f"{t}.json")
    return out


def load_mire(root: Path | str, *, test_files: Sequence[str | Path] | None = None,
              strict: bool = True, decode_images: bool = True) -> MireData:
    """Load ``train.json`` and the test splits of a MIRE directory.

    ``test_files`` names test splits (``"test1"``) in ``root`` or paths to json files
    elsewhere (their images are looked up beside them, then in ``root/images``); default:
    every ``test*.json`` in ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise MireError(f"{root}: MIRE directory not found (expected train.json, test*.json, images/)")
    train, rep = load_split(root / "train.json", root / "images", strict=strict,
                            decode_images=decode_images, require_labels=True)
    data = MireData(root=root, train=train, reports={"train": rep})
    for p in test_file_paths(root, test_files):
        images = p.parent / "images" if (p.parent / "images").is_dir() else root / "images"
        recs, rep = load_split(p, images, strict=strict, decode_images=decode_images)
        data.tests[p.stem] = recs
        data.reports[p.stem] = rep
    data.leaks = find_leakage(data.train, data.tests)
    if data.leaks:
        warnings.warn(f"{root}: train/test leakage, {len(data.leaks)} test record(s):\n  "
                      + "\n  ".join(str(p) for p in data.leaks[:10])
                      + ("\n  ..." if len(data.leaks) > 10 else ""), stacklevel=2)
    return data
