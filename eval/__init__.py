"""lm-eval integration: the registered model "dsv3", offline tasks, the deepseek-v3-base suite, reports.

    from dsv3.eval import run_eval
    run = run_eval("./model", tasks=["dsv3_pydoc_ppl", "dsv3_pydoc_order"], limit=20)
    print(run.markdown)

Importing this package registers "dsv3" with lm-eval (when lm-eval is installed), so
`lm_eval.simple_evaluate(model="dsv3", model_args="pretrained=DIR", ...)` works from Python. lm-eval 0.4.13
scans no entry points for models, so its CLI uses `--model hf --model_args
pretrained=DIR,trust_remote_code=True`, which loads the same remote code and gives the same numbers.
"""

import importlib
import logging
import os
from importlib.util import find_spec
from pathlib import Path

EXTRA_HINT = "pip install 'dsv3[eval]'"


class MissingDependency(ImportError):
    pass


def require(module: str):
    """Import an optional dependency of the eval extra, or fail with one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingDependency(
            f"{err.name or module} is not installed (dsv3 eval needs it): {EXTRA_HINT}"
        ) from None


if find_spec("lm_eval") is not None:
    from . import model as _model  # noqa: F401  (registers "dsv3" with lm-eval)

from .local_tasks import LOCAL_TASKS, TASKS_DIR  # noqa: E402
from .run import EvalRun, run_eval  # noqa: E402
from .suites import SUITES  # noqa: E402


class _QuietLocalTasks(logging.Filter):
    # lm-eval suggests --metadata for every task with a custom_dataset; ours take no custom arguments.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(LOCAL_TASKS) and "Custom kwargs" in message)


logging.getLogger("lm_eval.api.task").addFilter(_QuietLocalTasks())

DEMO_TASKS = ("dsv3_pydoc_ppl", "dsv3_pydoc_order")


def demo_report(
    model_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    limit: float | None = None,
    batch_size: int = 16,
    record: bool = False,
) -> tuple[str, dict]:
    """Evaluate a model folder on the shipped offline tasks (held-out pydoc perplexity and word order):
    lm-eval's files and the report go to `workdir`. Returns (markdown report, lm-eval's results). fp32 on the
    CPU, so the numbers do not depend on bf16 rounding."""
    run = run_eval(
        str(model_dir),
        tasks=list(DEMO_TASKS),
        limit=limit,
        batch_size=batch_size,
        output=Path(workdir),
        dtype="float32",
        record=record,
    )
    return run.markdown, run.results[0]


__all__ = [
    "DEMO_TASKS",
    "EXTRA_HINT",
    "LOCAL_TASKS",
    "SUITES",
    "TASKS_DIR",
    "EvalRun",
    "MissingDependency",
    "demo_report",
    "require",
    "run_eval",
]
