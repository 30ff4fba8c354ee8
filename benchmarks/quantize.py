"""Quantization quality, time and memory on the trained reference model (benchmarks/train_reference.py).

    bash scripts/bench.sh quantize [--model reference|demo] [--nsamples 128] [--seqlen 128] [--group-size 64]
        [--llm-compressor /path/to/llmc-venv/bin/python]

One run, same weights, same held-out data: wikitext-2 test perplexity (the reference recipe's held-out set) for
BF16, FP8 (block 128), INT8 W8A8, and W4A16 by round-to-nearest and by GPTQ, each for the routed experts only and
for every decoder-block Linear (same group size), plus each job's wall time and peak RSS. Each quantization runs
in its own process, so its peak RSS is its own. Calibration text: wikitext-2 valid (part of the model's training
data), never the test set. Targets (issue 11): GPTQ-W4's perplexity increase <= 0.5x RTN-W4's; INT8's <= 1%;
GPTQ peak RSS <= 2 x one decoder layer + calibration activations + 1 GiB.

--llm-compressor PYTHON (the python of a separate venv with llm-compressor, which pins its own transformers) adds
llm-compressor's GPTQ W4A16 on the same BF16 checkpoint, calibration windows and scheme, experts and all
(benchmarks/llmcompressor_job.py), read back by our loader, as a reference for our GPTQ's increase.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_reference import DATA, SEQ, TEST_FILE, encode, get_reference_model  # noqa: E402

JOB = """
import sys, json, torch
torch.set_num_threads(int(sys.argv[3]))
kind, args = sys.argv[1], json.loads(sys.argv[2])
if kind == "fp8":
    from dsv3.convert.fp8 import bf16_to_fp8
    bf16_to_fp8(args["src"], args["dst"])
elif kind == "int8":
    from dsv3.convert.quantize import quantize_int8
    quantize_int8(args["src"], args["dst"])
else:
    from dsv3.convert.gptq_stream import GPTQOptions, quantize_gptq
    quantize_gptq(args["src"], args["dst"], args["calib"], GPTQOptions(**args["opts"]))
with open("/proc/self/status") as f:  # own peak RSS (see run_job)
    print("VmHWM", next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


def run_llmcompressor(python: str, args: list[str], log: Path) -> tuple[float, float, dict | str]:
    """(seconds, peak RSS in GiB, the job's JSON line or, if it failed, the last line of its error) of
    benchmarks/llmcompressor_job.py under `python`; its output goes to `log`, never through a pipe."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [python, str(ROOT / "benchmarks" / "llmcompressor_job.py"), *args],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
    except OSError as err:
        return float("nan"), float("nan"), f"{python}: {err.strerror or err}"
    seconds, rss = time.perf_counter() - t0, usage.ru_maxrss / 2**20
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if status == 0 and lines and lines[-1].startswith("{"):
        return seconds, rss, json.loads(lines[-1])
    why = lines[-1] if lines else f"exit status {status}, no output"
    return seconds, rss, f"{why} (log: {log})"


def run_job(kind: str, args: dict, threads: int) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one job in a fresh process. The peak is the job's own VmHWM: a parent's
    wait4/getrusage ru_maxrss for a child starts at the parent's RSS at fork time, so it would measure this
    benchmark process rather than the job."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", JOB, kind, json.dumps(args), str(threads)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} job failed:\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VmHWM "))
    return seconds, peak / 2**30


@torch.no_grad()
def perplexity(folder: Path, test_ids: torch.Tensor, max_tokens: int, **load_kwargs) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, **load_kwargs
    ).eval()
    n = min(len(test_ids), max_tokens) // SEQ * SEQ
    chunks = test_ids[:n].view(-1, SEQ)
    nll, count = 0.0, 0
    for i in range(0, len(chunks), 16):
        ids = chunks[i : i + 16]
        out = model(ids, labels=ids)
        nll += out.lm_loss.item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def _num(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def layer_bytes(folder: Path, layer: int) -> int:
    from dsv3.convert.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    prefix = f"model.layers.{layer}."
    return sum(reader.get(n).numel() * 2 for n in reader if n.startswith(prefix))  # in BF16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        choices=("reference", "demo"),
        default="reference",
        help="reference: benchmarks/train_reference.py's model, wikitext-2; demo: dsv3's demo model, pydoc text",
    )
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=SEQ)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--llm-compressor",
        metavar="PYTHON",
        help="python of a venv with llm-compressor: adds its GPTQ-W4 (experts, all) as a reference",
    )
    ap.add_argument(
        "--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsv3-bench-quantize"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dsv3.convert.checkpoint import copy_side_files
    from dsv3.convert.tiny import write_official_layout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "reference":
        ref = get_reference_model()
        calib_text = (DATA / "wikitext2_valid.txt").read_text()
        test_text = (DATA / TEST_FILE).read_text()
        data = "wikitext-2 (calibration: valid, part of the model's training data; held out: test)"
    else:
        from dsv3.corpus import pydoc_split
        from dsv3.demo_model import get_demo_model

        ref = get_demo_model()
        calib_text, test_text = pydoc_split()
        data = "pydoc_data.topics (calibration: the demo model's training text; held out: its held-out 10%)"
    work = args.workdir
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    # The BF16 starting point, in the official sharded layout (what every job reads).
    bf16 = work / "bf16"
    model = AutoModelForCausalLM.from_pretrained(ref, trust_remote_code=True, dtype=torch.float32)
    write_official_layout(model, bf16, torch.bfloat16, max_shard_bytes=16 * 2**20)
    tokenizer.save_pretrained(bf16)
    copy_side_files(ref, bf16)
    config = model.config
    del model
    calib = work / "calib.txt"
    calib.write_text(calib_text)
    test_ids = encode(tokenizer, test_text)

    jobs = [("BF16", None, {}), ("FP8 (block 128)", "fp8", {}), ("INT8 W8A8 (channel)", "int8", {})]
    for targets in ("experts", "all"):
        for method, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
            opts = dict(
                bits=4, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen,
                targets=targets, method=method, act_order=act_order,
            )  # fmt: skip
            label = f"{method.upper()}-W4 g{args.group_size}{' act-order' if act_order else ''}, {targets}"
            jobs.append((label, "gptq", {"opts": opts}))
    rows = []
    for label, kind, extra in jobs:
        if kind is None:
            folder, seconds, rss = bf16, float("nan"), float("nan")
        else:
            folder = work / "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
            seconds, rss = run_job(
                kind, {"src": str(bf16), "dst": str(folder), "calib": str(calib), **extra}, args.threads
            )
        ppl = perplexity(folder, test_ids, args.eval_tokens)
        rows.append((label, ppl, seconds, rss))
        print(f"  {label}: ppl {ppl:.3f}, {seconds:.1f}s, peak RSS {rss:.2f} GiB", flush=True)
    llmc_failed, llmc_notes = [], []
    for targets in ("experts", "all") if args.llm_compressor else ():
        label = f"llm-compressor GPTQ-W4 g{args.group_size}, {targets}"
        folder = work / f"llmcompressor_w4_g{args.group_size}_{targets}"
        opts = dict(targets=targets, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen)
        job = [str(bf16), str(folder), str(calib), "--threads", str(args.threads)]
        job += [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), str(v))]
        seconds, rss, info = run_llmcompressor(args.llm_compressor, job, work / f"{folder.name}.log")
        if isinstance(info, dict) and info.get("vm_hwm_gib") is not None:
            rss = float(info["vm_hwm_gib"])  # its own peak (see run_job), not the floored ru_maxrss
        try:
            if isinstance(info, str):
                raise RuntimeError(info)
            # Without the MTP layer: llm-compressor never calibrates it (it runs only with labels) and saves it
            # with uninitialised scales, which our loader refuses; perplexity uses the main head only.
            ppl = perplexity(folder, test_ids, args.eval_tokens, num_nextn_predict_layers=0)
        except Exception as err:  # a reference run: its failure is a result, not the benchmark's
            llmc_failed.append((label, str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)))
            print(f"  {label}: failed: {llmc_failed[-1][1]}", flush=True)
            continue
        rows.append((label, ppl, seconds, rss))
        never = info.get("layers_never_calibrated") or []
        if never:
            llmc_notes.append(
                f"{label}: {info['modules_never_calibrated']} of {info['modules_targeted']} targeted modules never "
                f"saw calibration input ({', '.join(never)}), saved with uninitialized scales"
            )
        print(
            f"  {label}: ppl {ppl:.3f}, {seconds:.1f}s, peak RSS {rss:.2f} GiB (own VmHWM "
            f"{info.get('vm_hwm_gib')} GiB; llmcompressor {info.get('llmcompressor')}, transformers "
            f"{info.get('transformers')})",
            flush=True,
        )

    base = rows[0][1]
    print(
        f"\n{args.model} model ({config.num_hidden_layers} layers + MTP, hidden {config.hidden_size}, "
        f"{config.n_routed_experts} experts); {data}; perplexity on "
        f"{min(len(test_ids), args.eval_tokens) // SEQ * SEQ:,} held-out tokens; calibration {args.nsamples} x "
        f"{args.seqlen} tokens; {args.threads} threads\n"
    )
    print("| weights | perplexity | increase vs BF16 | time s | peak RSS GiB |\n|---|---|---|---|---|")
    for label, ppl, seconds, rss in rows:
        print(
            f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {_num(seconds, 1)} | {_num(rss, 2)} |"
        )
    for label, why in llmc_failed:
        print(f"| {label} | failed: {why} | | | |")
    for note in llmc_notes:
        print(f"\n{note}")
    by = {label: ppl for label, ppl, _, _ in rows}
    print("\n| target | ours | anchor | ratio |\n|---|---|---|---|")
    for targets in ("experts", "all"):
        r = by[f"RTN-W4 g{args.group_size}, {targets}"] - base
        for variant in ("", " act-order"):
            g = by[f"GPTQ-W4 g{args.group_size}{variant}, {targets}"] - base
            print(
                f"| GPTQ-W4{variant} ppl increase vs RTN-W4's ({targets}); target <= 0.5 | {g:+.3f} | {r:+.3f} "
                f"| {g / r:.2f} |"
            )
        llmc = by.get(f"llm-compressor GPTQ-W4 g{args.group_size}, {targets}")
        if llmc is not None:
            g, ref = by[f"GPTQ-W4 g{args.group_size}, {targets}"] - base, llmc - base
            print(
                f"| GPTQ-W4 ppl increase vs llm-compressor GPTQ-W4's ({targets}); reference, no target | {g:+.3f} "
                f"| {ref:+.3f} | {_num(g / ref if ref > 0 else float('nan'), 2)} |"
            )
    int8 = by["INT8 W8A8 (channel)"] / base - 1
    print(f"| INT8 ppl increase; target <= 1% | {100 * int8:+.2f}% | 1% | {int8 / 0.01:.2f} |")
    acts = 4 * args.nsamples * args.seqlen * config.hidden_size * 4  # four fp32 buffers (gptq_stream.ACTS)
    layer = max(layer_bytes(bf16, i) for i in range(config.num_hidden_layers))
    budget = (2 * layer + acts + 2**30) / 2**30
    worst = max(rss for label, _, _, rss in rows if label.startswith("GPTQ"))
    print(
        f"| GPTQ peak RSS vs 2 x layer ({layer / 2**20:.1f} MiB) + activations ({acts / 2**20:.1f} MiB) + 1 GiB "
        f"| {worst:.2f} GiB | {budget:.2f} GiB | {worst / budget:.2f} |"
    )


if __name__ == "__main__":
    main()
