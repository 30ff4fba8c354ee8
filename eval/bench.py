"""Wall time of `dsv3 eval` vs stock `lm_eval --model hf` on the same generative task, same checkpoint, limit
and batch size, each a fresh process (start-up included: stock lm-eval indexes all ~14k task files, dsv3 eval
only the folders it needs); also `dsv3 eval --model-args use_mtp=True` (MTP speculative decoding) when the
model has an MTP layer. Prints the best wall time of --repeat runs, the ratio to stock, and whether the scores
are the same.

    python -m dsv3.eval.bench MODEL [--task dsv3_gsm8k] [--limit 8] [--batch-size 1] [--repeat 1]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .local_tasks import TASKS_DIR


def _run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip().splitlines()[-1:]}")
    (path,) = out.glob("*/results_*.json")
    result = json.loads(path.read_text())
    path.unlink()  # the next repeat writes its own
    return {"wall": wall, "results": result["results"]}


def compare(
    model: str,
    task: str = "dsv3_gsm8k",
    limit: int = 8,
    batch_size: int = 1,
    repeat: int = 1,
    workdir: Path | None = None,
) -> dict:
    from transformers import AutoConfig

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dsv3-eval-bench-") as tmp:
            return compare(model, task, limit, batch_size, repeat, Path(tmp))
    workdir = Path(workdir)
    common = ["--tasks", task, "--limit", str(limit)]

    dsv3 = [sys.executable, "-m", "dsv3.cli", "eval", model, "--no-record", "--batch-size", str(batch_size)]

    def ours(out: str, *extra: str) -> tuple[list[str], Path]:
        return [*dsv3, "--output", str(workdir / out), *common, *extra], workdir / out

    runs = {
        "stock lm_eval --model hf": (
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
             f"pretrained={model},trust_remote_code=True", "--include_path", str(TASKS_DIR),
             "--batch_size", str(batch_size), "--output_path", str(workdir / "stock"), *common],
            workdir / "stock",
        ),
        "dsv3 eval": ours("ours"),
    }  # fmt: skip
    if getattr(AutoConfig.from_pretrained(model, trust_remote_code=True), "num_nextn_predict_layers", 0):
        runs["dsv3 eval, use_mtp=True"] = ours("mtp", "--model-args", "use_mtp=True")
    timings: dict = {}
    for _ in range(repeat):  # interleaved, so a change in machine load hits every command alike
        for name, (cmd, out) in runs.items():
            t = _run(cmd, out)
            if name not in timings or t["wall"] < timings[name]["wall"]:
                timings[name] = t
    stock = timings["stock lm_eval --model hf"]
    print(f"{task}, limit {limit}, batch size {batch_size}, best of {repeat}, {model}")
    for name, t in timings.items():
        same = "same scores" if t["results"] == stock["results"] else "DIFFERENT scores"
        ratio = stock["wall"] / t["wall"]
        print(f"  {name:28s} wall {t['wall']:7.1f} s   stock / this = {ratio:.2f}   ({same})")
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--task", default="dsv3_gsm8k")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    compare(args.model, args.task, args.limit, args.batch_size, args.repeat)


if __name__ == "__main__":
    main()
