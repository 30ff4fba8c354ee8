"""`dsv3 eval`: lm-eval's simple_evaluate on a checkpoint, lm-eval's files unchanged, a report and a record.

    run_eval(model, tasks=[...]) | run_eval(model, suite="deepseek-v3-base")
      -> check the folder and options -> load the tasks (their data) -> load the model once
      -> simple_evaluate (one call for --tasks, one per row for a suite, since shots differ per row)
      -> lm-eval's results/samples files -> report (markdown + PNG) -> record beside the checkpoint

Settings not given follow the stock CLI (`lm_eval --model hf`): batch size 1, seeds 0/1234/1234/1234, the
task's own shots, cuda:0 when there is a GPU. Tasks are loaded before the model, so a missing dataset or a bad
name costs no model load.
"""

import datetime as _dt
import glob
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import require
from .local_tasks import LOCAL_TASKS, TASKS_DIR
from .report import ReportRow, leaf_names, render_markdown, rows_for_results, suite_rows, write_chart
from .suites import LM_EVAL_TASK_DIRS, SuiteRow, get_suite

BACKENDS = ("hf", "vllm")
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"  # the `evaluate` library's code_eval metric refuses to run without it


@dataclass
class EvalRun:
    results: list[dict]  # lm-eval's results, one dict per simple_evaluate call
    rows: list[ReportRow]
    markdown: str
    files: list[Path] = field(default_factory=list)  # what was written under --output
    record: Path | None = None  # the checkpoint's dsv3_record.json, when results were recorded


def vllm_model_args(
    pretrained: str,
    *,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    strip_thinking: bool = False,
    extra: dict | None = None,
) -> dict:
    """lm-eval's `vllm` model arguments for our options. vLLM runs its own DeepSeek-V3 implementation (FP8
    block, BF16, compressed-tensors INT8/W4A16, GPTQ), not our remote code; its think_end_token keeps the text
    after `</think>` (an unclosed block is scored as is, unlike the hf backend's strip_thinking)."""
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError("--tensor-parallel-size and --data-parallel-size: must be at least 1")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization: a fraction in (0, 1], got {gpu_memory_utilization}")
    args: dict = {
        "pretrained": pretrained,
        "trust_remote_code": True,
        "tensor_parallel_size": tensor_parallel_size,
        "data_parallel_size": data_parallel_size,
    }
    optional = {
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "dtype": dtype,
        "think_end_token": "</think>" if strip_thinking else None,
    }
    args.update({k: v for k, v in optional.items() if v is not None})
    return {**args, **(extra or {})}


def hf_model_args(
    pretrained: str, *, dtype: str | None = None, strip_thinking: bool = False, extra: dict | None = None
):
    args: dict = {"pretrained": pretrained, "trust_remote_code": True}
    if dtype:
        args["dtype"] = dtype
    if strip_thinking:
        args["strip_thinking"] = True
    return {**args, **(extra or {})}


def _check_options(
    tasks, suite, num_fewshot, limit, backend, batch_size, apply_chat_template, fewshot_as_multiturn
):
    if bool(tasks) == bool(suite):
        raise ValueError("give either --tasks or --suite")
    if suite and num_fewshot is not None:
        raise ValueError("--num-fewshot: a suite fixes the shots of each row; use --tasks to choose them")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot: must be 0 or more, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit: must be positive (a count, or a fraction below 1), got {limit}")
    if backend not in BACKENDS:
        raise ValueError(f"--backend: choose from {', '.join(BACKENDS)}, got {backend!r}")
    if fewshot_as_multiturn and not apply_chat_template:
        raise ValueError("--fewshot-as-multiturn needs --apply-chat-template")
    size = str(batch_size)
    if not (size.isdigit() and int(size) > 0) and not (size == "auto" or size.startswith("auto:")):
        raise ValueError(f"--batch-size: a positive integer or auto, got {batch_size!r}")


def _resolve_model(model: str) -> Path:
    """A local folder, or a Hub repo id resolved to its snapshot (offline-aware), checked for the files."""
    from dsv3.convert.checkpoint import resolve_model_path

    from dsv3.generate import check_model_folder

    path = resolve_model_path(model)
    check_model_folder(path)
    return path


def _check_chat_template(path: Path) -> None:
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(path).chat_template:
        raise ValueError(f"--apply-chat-template: {path} has a tokenizer without a chat template")


def _task_manager(specs: Sequence[str], include_path: Sequence[Path], metadata: dict, lm_eval_dirs=None):
    """lm-eval's TaskManager over its tasks and ours (+ --include-path). Indexing all of lm-eval's ~14k task
    files takes seconds, so a suite indexes only its rows' folders (`lm_eval_dirs`), and a --tasks run that
    names only our tasks or --include-path ones indexes only those."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_path)]
    if lm_eval_dirs is not None:
        root = Path(lm_eval.tasks.__file__).parent
        dirs = [str(root / d) for d in sorted(set(lm_eval_dirs))]
        return TaskManager(include_path=dirs + paths, include_defaults=False, metadata=metadata)
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if specs and all(local.match_tasks([s]) or s.endswith(".yaml") for s in specs):
        return local
    return TaskManager(include_path=paths, metadata=metadata)


def _top_level(task_manager, spec: str) -> list:
    """The Task/Group objects a spec names at its top level (a group with its children, a tag's tasks)."""
    loaded = task_manager.load([spec])
    groups = loaded["groups"]
    children = {c for g in groups.values() for c in g.child_names}
    grouped = {t.task_name for g in groups.values() for t in g.get_all_tasks()}
    return [g for n, g in groups.items() if n not in children] + [
        t for n, t in loaded["tasks"].items() if n not in grouped
    ]


def _leaf_tasks(objs: list) -> list:
    return [t for o in objs for t in (o.get_all_tasks() if hasattr(o, "get_all_tasks") else [o])]


def _check_code_execution(objs: list, allow: bool) -> None:
    unsafe = sorted({t.task_name for t in _leaf_tasks(objs) if t.config.unsafe_code})
    if unsafe and not allow:
        raise ValueError(
            f"{', '.join(unsafe[:3])} runs model-written code; pass --allow-code-execution to allow it"
        )


def _expand(task_manager, specs: Sequence[str]) -> list[str]:
    names: list[str] = []
    for spec in specs:
        if spec.endswith(".yaml"):
            names += sorted(glob.glob(spec)) or [spec]
            continue
        matched = task_manager.match_tasks([spec])
        if not matched:
            raise ValueError(
                f"--tasks: unknown task {spec!r} (not an lm-eval task, nor one of ours: "
                f"{', '.join(LOCAL_TASKS)}; add local task folders with --include-path)"
            )
        names += matched
    return list(dict.fromkeys(names))


@dataclass
class _Planned:
    row: SuiteRow
    objs: list | None = None  # loaded tasks, or None with `why`
    task: str | None = None  # the task actually run (the row's, or its local stand-in)
    why: str = ""


def _plan_suite(task_manager, rows: Sequence[SuiteRow], allow_code: bool, version: str) -> list[_Planned]:
    """Which rows can run here: their data loads (offline: only what is cached or local). A dataset that
    cannot be reached is an OSError from `datasets` (ConnectionError offline, FileNotFoundError for a missing
    file), a task whose extra is not installed (lm-eval[math] for minerva_math) an ImportError; the row then
    says why instead of failing the suite."""
    planned = []
    for row in rows:
        p = _Planned(row)
        planned.append(p)
        if row.task is None:
            p.why = "no lm-eval task"
            continue
        if row.runs_code and not allow_code:
            p.why = "skipped: runs model-written code (pass --allow-code-execution)"
            continue
        reasons = []
        for name in (row.task, row.local_task):
            if name is None:
                continue
            if name not in task_manager.all_tasks:
                reasons.append(f"lm-eval {version} has no task {name!r}")
                continue
            try:
                p.objs, p.task = _top_level(task_manager, name), name
                break
            # data not reachable, or a task's optional dependency missing
            except (OSError, ImportError) as err:
                reasons.append(
                    f"{name}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                )
        if p.objs is None:
            p.why = "unavailable: " + "; ".join(reasons)
    return planned


@dataclass
class EvalSettings:
    """What simple_evaluate gets besides the model and tasks (the stock CLI's defaults when not given)."""

    limit: float | None = None
    output: Path | None = None  # lm-eval's results/samples files and the report go here
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None  # None: as the CLI, on with a chat template
    system_instruction: str | None = None
    gen_kwargs: str | None = None
    allow_code_execution: bool = False


def run_eval(
    model: str,
    tasks: Sequence[str] = (),
    suite: str | None = None,
    *,
    include_path: Sequence[str | os.PathLike] = (),
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str | None = None,
    output: str | os.PathLike | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    strip_thinking: bool = False,
    allow_code_execution: bool = False,
    backend: str = "hf",
    device: str | None = None,
    dtype: str | None = None,
    model_args: str | dict | None = None,
    gen_kwargs: str | None = None,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    record: bool = True,
) -> EvalRun:
    lm_eval = require("lm_eval")
    tasks = [t.strip() for spec in tasks for t in str(spec).split(",") if t.strip()]
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)  # a count (the CLI parses it as a float: below 1 it is a fraction)
    _check_options(
        tasks,
        suite,
        num_fewshot,
        limit,
        backend,
        1 if batch_size is None else batch_size,
        apply_chat_template,
        fewshot_as_multiturn,
    )
    include = [Path(p) for p in include_path]
    if bad := next((p for p in include if not p.is_dir()), None):
        raise ValueError(f"--include-path: {bad} is not a folder")
    if output is not None:
        require("matplotlib")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm: vLLM is not installed (pip install vllm; it needs a GPU machine)")
    path = _resolve_model(model)
    if apply_chat_template:
        _check_chat_template(path)
    extra = simple_parse_args(model_args)
    if backend == "vllm":
        args = vllm_model_args(
            str(path),
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            strip_thinking=strip_thinking,
            extra=extra,
        )
    else:
        args = hf_model_args(str(path), dtype=dtype, strip_thinking=strip_thinking, extra=extra)
    if allow_code_execution:
        os.environ.setdefault(CODE_EVAL_ENV, "1")
    settings = EvalSettings(
        limit,
        Path(output) if output is not None else None,
        apply_chat_template,
        fewshot_as_multiturn,
        system_instruction,
        gen_kwargs,
        allow_code_execution,
    )

    # Tasks first (their data), then the model, loaded once for every run.
    if suite:
        dirs = [d for r in get_suite(suite) if r.task for d in LM_EVAL_TASK_DIRS.get(r.task, ())]
        task_manager = _task_manager([], include, metadata=args, lm_eval_dirs=dirs)
        planned = _plan_suite(task_manager, get_suite(suite), allow_code_execution, lm_eval.__version__)
        runs = [(p.objs, p.row.shots) for p in planned if p.objs is not None]
    else:
        task_manager = _task_manager(tasks, include, metadata=args)
        objs = [o for name in _expand(task_manager, tasks) for o in _top_level(task_manager, name)]
        _check_code_execution(objs, allow_code_execution)
        runs = [(objs, num_fewshot)]
    results: list[dict] = []
    files: list[Path] = []
    if runs:
        lm = _load_lm(backend, args, batch_size, device)
        for run_objs, shots in runs:
            result, written = _evaluate(lm, args, task_manager, run_objs, shots, settings)
            results.append(result)
            files += written

    rows = suite_rows(planned, results) if suite else rows_for_results(results[0], objs)
    title = f"# {path.name}: lm-eval {lm_eval.__version__}" + (f", suite {suite}" if suite else "")
    title += f", limit {limit} per task" if limit is not None else ""
    markdown, written = _report(
        rows, title, settings.output, chart_title=f"{path.name}: ours vs DeepSeek-V3-Base"
    )
    record_path = None
    if record and Path(model).is_dir() and results:  # a Hub snapshot is not the user's folder to annotate
        from dsv3.convert.record import add_evaluation

        entry = {
            "tool": f"lm-eval {lm_eval.__version__}",
            "suite": suite,
            "limit": limit,
            "model_args": ",".join(f"{k}={v}" for k, v in args.items()),
            "results": record_results(results),
        }
        record_path = add_evaluation(path, entry)
    return EvalRun(results, rows, markdown, files + written, record_path)


def simple_parse_args(model_args: str | dict | None) -> dict:
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})


def _device(device: str | None) -> str:
    # The stock CLI asks for cuda:0 and HFLM falls back to the CPU without a GPU; HFLM's own default ("cuda")
    # would not fall back, so always name one.
    if device:
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _load_lm(backend: str, args: dict, batch_size, device: str | None):
    import lm_eval.api.registry

    from . import model as _registers_dsv3  # noqa: F401  (registers "dsv3" with lm-eval)

    size = batch_size if batch_size is not None else (1 if backend == "hf" else "auto")
    size = int(size) if str(size).isdigit() else size
    hf = backend == "hf"
    extra = {"batch_size": size, "max_batch_size": None, "device": _device(device) if hf else None}
    return lm_eval.api.registry.get_model("dsv3" if hf else "vllm").create_from_arg_obj(args, extra)


def _evaluate(
    lm, args: dict, task_manager, objs: list, shots: int | None, s: EvalSettings
) -> tuple[dict, list]:
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(s.output)) if s.output is not None else None
    result = simple_evaluate(
        model=lm,
        model_args=args,  # for the results' config and the output folder's name
        tasks=objs,
        num_fewshot=shots,
        limit=s.limit,
        log_samples=s.output is not None,
        evaluation_tracker=tracker,
        system_instruction=s.system_instruction,
        apply_chat_template=s.apply_chat_template,
        fewshot_as_multiturn=s.apply_chat_template
        if s.fewshot_as_multiturn is None
        else s.fewshot_as_multiturn,
        gen_kwargs=s.gen_kwargs,
        task_manager=task_manager,  # the objects are loaded already; it only collects them
        confirm_run_unsafe_code=s.allow_code_execution,
    )
    if tracker is None:
        return result, []
    # What `lm_eval --output_path --log_samples` writes: results_<date>.json, samples_<task>_<date>.jsonl.
    samples = result.pop("samples")
    tracker.save_results_aggregated(results=result, samples=samples)
    for task_name in result["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    folder = s.output / tracker.general_config_tracker.model_name_sanitized
    written = sorted(folder.glob(f"*_{tracker.date_id}.json*"))
    if not any(p.name.startswith("results_") for p in written):  # lm-eval only logs a failed write
        raise OSError(f"lm-eval could not write its results under {folder}")
    return result, written


def _report(
    rows: list[ReportRow], title: str, output: Path | None, chart_title: str
) -> tuple[str, list[Path]]:
    if output is None:
        return render_markdown(rows, title), []
    stamp = _dt.datetime.now().isoformat().replace(":", "-")  # never overwrites, like lm-eval's own files
    chart = write_chart(rows, output / f"report_{stamp}.png", title=chart_title)
    markdown = render_markdown(rows, title, chart.name if chart else None)
    report = output / f"report_{stamp}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown)
    return markdown, [report] + ([chart] if chart else [])


def record_results(results: list[dict]) -> dict:
    """lm-eval results in the record's schema: {task: {metric: v, metric_stderr: v, num_fewshot, samples}}. A
    metric keeps its filter when it is not "none" ("exact_match,strict-match"); "N/A" stderrs become None."""
    out: dict = {}
    for result in results:
        n_samples = result.get("n-samples", {})
        for task, metrics in result["results"].items():
            entry: dict = {}
            for key, value in metrics.items():
                if key == "alias" or "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                stderr = metric.endswith("_stderr")
                name = metric.removesuffix("_stderr") + ("" if filt == "none" else f",{filt}")
                entry[name + ("_stderr" if stderr else "")] = _number(value)
            entry["num_fewshot"] = result.get("n-shot", {}).get(task)
            counts = [n_samples[t]["effective"] for t in leaf_names(result, task) if t in n_samples]
            entry["samples"] = sum(counts) if counts else None
            out[task] = entry
    return out


def _number(value):
    if isinstance(value, int | float) and value == value and value not in (float("inf"), float("-inf")):
        return value
    return None
