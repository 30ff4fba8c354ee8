"""The metadata record every checkpoint writer leaves beside the weights: `dsv3_record.json`.

One schema, read and written only here. A record says what the folder is and how it was made, so a model card
can be rendered from it without guessing:

    {
      "schema": "dsv3-record/1",
      "tool": {"name": "dsv3", "version": "0.1.0"},
      "source": {"path": "/abs/src", "repo_id": "deepseek-ai/DeepSeek-V3" | null, "revision": "<sha>" | null,
                 "files": {"config.json": {"bytes": 1234, "sha256": "..."}, ...}},   # hashes where cheap
      "lineage": [ ...the source's own operations (each with its source), oldest first... ],
      "operation": {"name": "quantize-gptq", "params": {...}, "results": {...},
                    "started": "2026-11-23T10:00:00+00:00", "finished": "..."},
      "evaluations": [ {"time": "...", "tool": "lm-eval 0.4.13", "suite": "deepseek-v3-base" | null,
                        "limit": null | N, "model_args": "...",
                        "results": {"<task>": {"<metric>": value, "<metric>_stderr": value, "num_fewshot": k,
                                               "samples": n}}} ],
      "card": {"repo_id": "me/DeepSeek-V3-int8", "license": "mit", ...}     # optional, set by `dsv3 card`
    }

`source.card` (when the source folder has a README.md with YAML front matter) keeps the source card's license and
language, so a derived folder's card inherits them. The top-level `card` holds this folder's own card options
(`dsv3 card DIR --repo-id ... --license ...`); it is not carried to derived folders.

`lineage` carries the source folder's record forward (e.g. FP8 release -> BF16 -> GPTQ), so a card can name the
original model and every step. Files written atomically; unknown keys in an existing record are kept.
"""

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from .checkpoint import atomic_write_json

RECORD_FILE = "dsv3_record.json"
SCHEMA = "dsv3-record/1"
HASH_LIMIT = 64 * 2**20  # files up to this size are hashed; bigger ones (weight shards) get their size only


class RecordError(ValueError):
    pass


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("dsv3")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path, hash_limit: int = HASH_LIMIT) -> dict:
    size = path.stat().st_size
    return {"bytes": size, **({"sha256": sha256_file(path)} if size <= hash_limit else {})}


def _hub_origin(folder: Path) -> tuple[str | None, str | None]:
    """(repo_id, revision) for a folder inside a huggingface_hub cache (`models--org--name/snapshots/<sha>`)."""
    parts = folder.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/"), parts[i + 2]
    return None, None


def describe_source(src: str | os.PathLike, hash_limit: int = HASH_LIMIT) -> dict:
    """Where a job read from: path, Hub repo id + revision when it is a Hub snapshot, and its files (sizes;
    sha256 of the small ones: config, index, tokenizer, small shards)."""
    src = Path(src)
    repo_id, revision = _hub_origin(src)
    files = {
        p.name: file_digest(p, hash_limit)
        for p in sorted(src.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != RECORD_FILE
    }
    source = {"path": str(src.resolve()), "repo_id": repo_id, "revision": revision, "files": files}
    card = source_card_metadata(src)
    return {**source, "card": card} if card else source


CARD_KEYS = ("license", "license_name", "license_link", "language")


def source_card_metadata(folder: Path) -> dict:
    """The license and language from `folder`/README.md's YAML front matter ({} when there is none). A card we
    cannot parse is recorded as nothing: it must not stop a conversion, and a card never guesses a license."""
    import yaml

    try:
        text = (folder / "README.md").read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return {}
    head, sep, _ = text.removeprefix("---\n").partition("\n---") if text.startswith("---\n") else ("", "", "")
    try:
        meta = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return {k: meta[k] for k in CARD_KEYS if isinstance(meta, dict) and isinstance(meta.get(k), (str, list))}


def read_record(folder: str | os.PathLike) -> dict | None:
    """The folder's record, None when it has none; a record that is not ours is an error naming the file."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable record ({err})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"{path}: schema is {found!r}, expected {SCHEMA!r}")
    return record


def new_record(
    src: str | os.PathLike | None,
    operation: str,
    params: dict,
    results: dict | None = None,
    started: str | None = None,
) -> dict:
    """A record for a folder written by `operation` from `src` (None: made from scratch, e.g. `dsv3 tiny`)."""
    lineage: list[dict] = []
    source = None
    if src is not None:
        source = describe_source(src)
        previous = read_record(src)
        if previous is not None:
            lineage = [*previous.get("lineage", []), {**previous["operation"], "source": previous["source"]}]
    return {
        "schema": SCHEMA,
        "tool": {"name": "dsv3", "version": tool_version()},
        "source": source,
        "lineage": lineage,
        "operation": {
            "name": operation,
            "params": params,
            "results": results or {},
            "started": started or now(),
            "finished": now(),
        },
        "evaluations": [],
    }


def write_record(folder: str | os.PathLike, record: dict) -> Path:
    if record.get("schema") != SCHEMA or "operation" not in record:
        raise RecordError(f"{Path(folder) / RECORD_FILE}: not a {SCHEMA} record")
    path = Path(folder) / RECORD_FILE
    atomic_write_json(path, record)
    return path


def add_evaluation(folder: str | os.PathLike, evaluation: dict) -> Path:
    """Append one evaluation (e.g. lm-eval results) to the folder's record; a folder without a record gets one
    with operation "external" (a checkpoint someone else wrote), so results are never dropped."""
    folder = Path(folder)
    record = read_record(folder) or {
        "schema": SCHEMA,
        "tool": {"name": "dsv3", "version": tool_version()},
        "source": None,
        "lineage": [],
        "operation": {"name": "external", "params": {}, "results": {}, "started": None, "finished": None},
        "evaluations": [],
    }
    record.setdefault("evaluations", []).append({"time": now(), **evaluation})
    return write_record(folder, record)


def origin(record: dict) -> dict | None:
    """The first source in the chain (the original model a card should name as base_model)."""
    for op in record.get("lineage", []):
        if op.get("source"):
            return op["source"]
    return record.get("source")


def set_card_options(folder: str | os.PathLike, options: dict) -> Path:
    """Merge `options` (repo_id, license, ...) into the record's `card` section; None values leave a key as is."""
    record = read_record(folder)
    if record is None:
        raise RecordError(f"{Path(folder) / RECORD_FILE}: not found (only folders dsv3 wrote have a record)")
    card = {**record.get("card", {}), **{k: v for k, v in options.items() if v is not None}}
    return write_record(folder, {**record, "card": card})
