"""Model cards rendered from what a folder records about itself: config.json + dsv3_record.json.

    render_card(folder) -> str       the README.md text (YAML metadata + Markdown), nothing written
    write_card(folder)  -> Path      writes folder/README.md atomically; a README.md we did not write is kept
                                     unless force=True

The variant (one template each) comes from config.json's quantization_config, and from the record for checkpoints
made from scratch; every number and name in the card comes from those two files and the safetensors index, so a
card is a pure function of the folder (`dsv3 push` re-renders it to check that the README.md is current).
"""

import json
import os
import re
from pathlib import Path

from dsv3.convert.checkpoint import INDEX_NAME, SINGLE_NAME, atomic_write_text, read_config
from dsv3.convert.record import RECORD_FILE, origin, read_record, set_card_options

TEMPLATES = Path(__file__).parent / "templates"
CARD_FILE = "README.md"
# Our cards carry this comment; a README.md without it is someone else's and is never overwritten silently.
MARKER = "<!-- dsv3-card: rendered by `dsv3 card` from config.json and dsv3_record.json; re-run it, do not edit -->"
SCRATCH_OPERATIONS = {"tiny": "random", "train-demo-model": "trained"}
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}
# What the Hub accepts as a license id (e.g. mit, apache-2.0, cc-by-4.0, llama3.1, other).
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROMPT = "The quick brown fox"


class CardError(ValueError):
    """A card cannot be rendered or written; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------ the variant
# (quant_method, compressed-tensors format) -> template. pack-quantized is weight-only packed integers: GPTQ, or
# round-to-nearest in the same layout (the gptq template words it from the record).
VARIANTS = {
    ("fp8", None): "fp8",
    ("gptq", None): "gptq",
    ("compressed-tensors", "int-quantized"): "int8",
    ("compressed-tensors", "pack-quantized"): "gptq",
}


def detect_variant(config: dict, record: dict) -> str:
    """bf16 | fp8 | int8 | gptq | scratch: which template describes these weights."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method is None:
        return "scratch" if _first_operation(record)["name"] in SCRATCH_OPERATIONS else "bf16"
    key = (method, quant.get("format") if method == "compressed-tensors" else None)
    if key not in VARIANTS:
        raise CardError(
            f"config.json: quantization_config {key[0]} {key[1] or ''} has no card template".strip()
        )
    return VARIANTS[key]


def _steps(record: dict) -> list[dict]:
    """Every operation that made this folder, oldest first, each with the source it read."""
    return [*record.get("lineage", []), {**record["operation"], "source": record.get("source")}]


def _first_operation(record: dict) -> dict:
    return _steps(record)[0]


# ------------------------------------------------------------------------------------------ facts from files
def _weights(folder: Path) -> dict:
    """Shard count, bytes on disk and tensor names, from the index (or the single file's header)."""
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        names = list(weight_map)
    elif (folder / SINGLE_NAME).is_file():
        shards, names = [SINGLE_NAME], list(_header(folder / SINGLE_NAME))
    else:
        raise CardError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}")
    size = sum((folder / s).stat().st_size for s in shards if (folder / s).is_file())
    return {"shards": len(shards), "bytes": size, "names": names}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _ignored(name: str, ignore: list[str]) -> bool:
    # compressed-tensors semantics: "re:<regex>" is re.match'ed against the module name, anything else is a module
    # name (or a class name, which never equals a dotted module name).
    return any(
        re.match(entry[3:], name) if entry.startswith("re:") else entry in (name, name.rsplit(".", 1)[-1])
        for entry in ignore
    )


# ------------------------------------------------------------------------------------------ metadata
def _license(record: dict, base: dict | None) -> dict:
    """This folder's own choice (`dsv3 card --license`), else the original model's card, else `other`."""
    own = record.get("card", {})
    if own.get("license"):
        return {k: own[k] for k in ("license", "license_name", "license_link") if own.get(k)}
    inherited = (base or {}).get("card") or {}
    if inherited.get("license"):
        return {k: inherited[k] for k in ("license", "license_name", "license_link") if inherited.get(k)}
    return {"license": "other", "license_name": "unspecified"}


def _metric_rows(evaluation: dict) -> list[dict]:
    """A record's evaluation -> one row per task and metric. Metric keys are `<metric>` or `<metric>,<filter>`
    (`dsv3 eval` drops lm-eval's "none" filter) with the standard error under `<key>_stderr`; lm-eval's raw
    spelling `<metric>_stderr,<filter>` is read too."""
    rows = []
    for task, results in sorted((evaluation.get("results") or {}).items()):
        for key, value in results.items():
            name, _, filt = key.partition(",")
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or "_stderr" in key or key in ("num_fewshot", "samples"):
                continue
            stderr = results.get(f"{key}_stderr", results.get(f"{name}_stderr,{filt}") if filt else None)
            rows.append(
                {
                    "task": task,
                    "metric": name,
                    "filter": filt if filt not in ("", "none") else None,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, int | float) else None,
                    "num_fewshot": results.get("num_fewshot"),
                    "samples": results.get("samples"),
                    "limit": evaluation.get("limit"),
                    "tool": evaluation.get("tool"),
                    "time": evaluation.get("time"),
                }
            )
    return rows


def _eval_results(rows: list[dict]):
    """model-index entries for the latest full-set result of each task/metric (a --limit run is a smoke test and
    is shown in the table only)."""
    from huggingface_hub import EvalResult

    latest: dict[tuple, dict] = {}
    for row in rows:
        if row["limit"] is None:
            latest[(row["task"], row["metric"], row["filter"])] = row
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=row["task"],
            dataset_name=row["task"],
            metric_type=row["metric"],
            metric_name=f"{row['metric']} ({row['filter']})" if row["filter"] else row["metric"],
            metric_value=row["value"],
            dataset_args={"num_few_shot": row["num_fewshot"]} if row["num_fewshot"] is not None else None,
        )
        for row in latest.values()
    ]


# ------------------------------------------------------------------------------------------ rendering
def card_context(folder: str | os.PathLike) -> dict:
    """Everything a template shows, computed from the folder's files."""
    folder = Path(folder)
    config = read_config(folder)
    record = read_record(folder)
    if record is None:
        raise CardError(
            f"{folder / RECORD_FILE}: not found; cards are rendered from the record that dsv3's tools write "
            "(tiny, convert, quantize)"
        )
    variant = detect_variant(config, record)
    options = record.get("card", {})
    repo_id = options.get("repo_id")
    base = origin(record)
    base_repo = (base or {}).get("repo_id")
    steps = _steps(record)
    first = steps[0]
    scratch = SCRATCH_OPERATIONS.get(first["name"])
    quant = config.get("quantization_config") or {}
    weights = _weights(folder)
    n_layers = config["num_hidden_layers"]
    n_mtp = config.get("num_nextn_predict_layers") or 0
    dropped_mtp = any(step.get("params", {}).get("drop_mtp") for step in steps)
    ignore = list(quant.get("ignore") or [])
    kv_b = "model.layers.0.self_attn.kv_b_proj"  # every layer has one; the ignore list treats them alike
    rows = [row for evaluation in record.get("evaluations", []) for row in _metric_rows(evaluation)]
    op = record["operation"]
    return {
        "variant": variant,
        "title": repo_id.split("/")[-1] if repo_id else folder.resolve().name,
        "model_id": repo_id or ".",
        "repo_id": repo_id,
        "marker": MARKER,
        "config": config,
        "quant": quant,
        "dtype": DTYPE_NAMES.get(str(config.get("torch_dtype")), str(config.get("torch_dtype"))),
        "base": base,
        "base_repo": base_repo,
        "scratch": scratch,
        "steps": steps,
        "operation": op,
        "params": op.get("params", {}),
        "results": op.get("results", {}),
        "tool": record.get("tool", {}),
        "weights": weights,
        "size": human_bytes(weights["bytes"]),
        "n_layers": n_layers,
        "n_mtp": n_mtp,
        "mtp_layers": list(range(n_layers, n_layers + n_mtp)),
        "dropped_mtp": dropped_mtp,
        "ignore": ignore,
        "kv_b_quantized": variant in ("fp8", "int8", "gptq") and not (ignore and _ignored(kv_b, ignore)),
        "n_fp8": sum(name.endswith("_scale_inv") for name in weights["names"]),
        **dict(zip(("bits", "group_size"), _weight_scheme(quant), strict=True)),
        "eval_rows": rows,
        "license": _license(record, base),
        "prompt": PROMPT,
    }


def card_data(ctx: dict):
    from huggingface_hub import ModelCardData

    quantized = ctx["variant"] in ("fp8", "int8", "gptq")
    tags = ["deepseek_v3", "dsv3", "custom_code"]
    if ctx["variant"] == "fp8":
        tags.append("fp8")
    elif ctx["variant"] == "int8":
        tags += ["int8", "compressed-tensors"]
    elif ctx["variant"] == "gptq":
        if ctx["operation"]["name"] == "quantize-gptq" and ctx["params"].get("method", "gptq") == "gptq":
            tags.append("gptq")
        if ctx["quant"].get("quant_method") == "compressed-tensors":
            tags.append("compressed-tensors")
        if ctx["bits"]:
            tags.append(f"{ctx['bits']}-bit")
    results = _eval_results(ctx["eval_rows"])
    language = ((ctx["base"] or {}).get("card") or {}).get("language")
    return ModelCardData(
        base_model=ctx["base_repo"],
        # "quantized" only where it is true: a BF16 copy of an FP8 release is the same model, not a quantization.
        base_model_relation="quantized" if quantized and ctx["base_repo"] else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        language=language,
        tags=tags,
        eval_results=results or None,
        model_name=ctx["title"] if results else None,
        **ctx["license"],
    )


def _weight_scheme(quant: dict) -> tuple[int | None, int | None]:
    """(bits, group size) of an integer quantization_config; None where its groups disagree or do not say."""
    if quant.get("quant_method") == "gptq":
        return quant.get("bits"), quant.get("group_size")
    weights = [g["weights"] for g in (quant.get("config_groups") or {}).values() if g.get("weights")]
    bits, groups = {w.get("num_bits") for w in weights}, {w.get("group_size") for w in weights}
    return (bits.pop() if len(bits) == 1 else None), (groups.pop() if len(groups) == 1 else None)


def _environment():
    try:
        import jinja2
    except ImportError:
        raise CardError("model cards need jinja2: pip install jinja2") from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["bytes"] = human_bytes
    env.filters["value"] = lambda v: (
        (f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}") if isinstance(v, float) else str(v)
    )
    env.filters["params"] = _format_params
    env.globals["step_source"] = _source_label
    return env


def _source_label(source: dict | None) -> str:
    if source is None:
        return "- (from scratch)"
    if source.get("repo_id"):
        rev = f" @ `{source['revision'][:12]}`" if source.get("revision") else ""
        return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}){rev}"
    return f"local folder `{Path(source.get('path') or '?').name}`"


def _format_params(params: dict) -> str:
    def show(v) -> str:
        if isinstance(v, str):  # hashes are shortened here; the record keeps them whole
            return f"{v[:12]}..." if re.fullmatch(r"[0-9a-f]{40,}", v) else v
        return json.dumps(v)

    return ", ".join(f"{k}={show(v)}" for k, v in params.items()) or "-"


def render_card(folder: str | os.PathLike) -> str:
    """The README.md dsv3 writes for `folder`: YAML metadata built with huggingface_hub's ModelCardData, the body
    from the variant's template, parsed back by ModelCard (which fails on invalid metadata)."""
    from huggingface_hub import ModelCard

    ctx = card_context(folder)
    data = card_data(ctx)
    text = _environment().get_template(f"{ctx['variant']}.md").render(card_data=data.to_yaml(), **ctx)
    card = ModelCard(text)  # raises on metadata huggingface_hub cannot parse (e.g. a malformed model-index)
    return str(card)


def is_our_card(path: Path) -> bool:
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_card(
    folder: str | os.PathLike,
    force: bool = False,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write folder/README.md (atomically). `repo_id` (the usage snippet loads from it) and `license` are saved
    in the record's `card` section, so later renders (after `dsv3 eval`, or by `dsv3 push`'s check) keep them."""
    folder = Path(folder)
    path = folder / CARD_FILE
    if repo_id is not None and not REPO_ID.match(repo_id):
        raise CardError(f"--repo-id: {repo_id!r} is not a Hub repo id (namespace/name)")
    if license is not None and not LICENSE_ID.match(license):
        raise CardError(f"--license: {license!r} is not a Hub license id (e.g. mit, apache-2.0, other)")
    if path.exists() and not force and not is_our_card(path):
        raise CardError(f"{path}: exists and was not written by dsv3 card (use --force to replace it)")
    render_card(folder)  # fails before the record is touched if the folder cannot have a card
    if repo_id is not None or license is not None:
        set_card_options(folder, {"repo_id": repo_id, "license": license})
    atomic_write_text(path, render_card(folder))
    return path
