"""The `dsv3` command: parse -> call one library function -> print. Errors are one line on stderr, exit 1."""

import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DeepSeek-V3-family checkpoints on transformers 5: build, load, convert, generate.",
)
STATE = {"debug": False}


def _friendly(fn: Callable) -> Callable:
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as err:
            # Ctrl-C or SIGTERM (the converters raise a KeyboardInterrupt subclass for it): temporary files are
            # already gone; exit like a shell would for that signal.
            sigterm = type(err).__name__ == "Terminated"
            typer.echo(
                f"Error: {'terminated' if sigterm else 'interrupted'}; re-run the command to resume", err=True
            )
            raise typer.Exit(143 if sigterm else 130) from None
        except Exception as err:
            if STATE["debug"]:
                traceback.print_exc()
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            typer.echo(f"Error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _main(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback on errors (anywhere on the line)."
    ),
) -> None:
    STATE["debug"] = STATE["debug"] or debug


@app.command()
@_friendly
def demo(
    workdir: Path = typer.Option(Path("dsv3-demo"), help="Folder for the demo's checkpoints (recreated)."),
):
    """Run the main job end to end on the built-in demo model (trained on first use, about a minute on 2 cores,
    then cached; no download): FP8 release -> convert -> load -> generate -> INT8 / GPTQ -> eval -> card.

    Example: dsv3 demo --workdir /tmp/dsv3-demo
    """
    from .demo import run_demo

    run_demo(workdir)


@app.command()
@_friendly
def tiny(
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty, unless --force)."),
    preset: str = typer.Option("v3", help="v3 (YaRN, q-LoRA, grouped routing, MTP) | moonlight | kimi"),
    fp8: bool = typer.Option(False, "--fp8/--bf16", help="Official FP8 block layout, or plain BF16."),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    force: bool = typer.Option(
        False, help="Write into a non-empty folder (removes only old weight shards; other files stay)."
    ),
):
    """Write a small random checkpoint in the official layout (shards + index, config, tokenizer, remote code).

    Example: dsv3 tiny ./tiny-v3-fp8 --preset v3 --fp8
    """
    from dsv3.convert.tiny import build_tiny

    path = build_tiny(out, preset, seed, fp8=fp8, force=force)
    typer.echo(f"wrote {preset} tiny checkpoint ({'FP8' if fp8 else 'BF16'}) to {path}")


convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints shard by shard on CPU (resumable).")
app.add_typer(convert_app, name="convert")


@convert_app.command("fp8-to-bf16")
@_friendly
def fp8_to_bf16(
    src: str = typer.Argument(..., help="FP8 checkpoint folder or Hub repo id (never modified)."),
    dst: Path = typer.Argument(..., help="Output folder (must be empty unless --force; re-run to resume)."),
    dtype: str = typer.Option("bf16", help="bf16 | fp16 | fp32"),
    drop_mtp: bool = typer.Option(
        False, help="Leave out the MTP layer(s) (model.layers.{num_hidden_layers}+)."
    ),
    workers: int = typer.Option(
        0, help="Compute threads (0 = the default, 1: the job is memory-bound); a separate thread writes."
    ),
    force: bool = typer.Option(False, help="Overwrite a non-empty destination."),
):
    """Dequantize an FP8 block-scaled checkpoint: bit-identical to dtype(fp32(q) * scale), no GPU needed.

    Example: dsv3 convert fp8-to-bf16 ~/models/DeepSeek-V3 ~/models/DeepSeek-V3-bf16
    """
    from dsv3.convert.fp8 import fp8_to_bf16 as run

    typer.echo(run(src, dst, dtype, drop_mtp, workers or None, force).summary())


@convert_app.command("bf16-to-fp8")
@_friendly
def bf16_to_fp8(
    src: str = typer.Argument(..., help="BF16/FP16/FP32 checkpoint folder or Hub repo id (never modified)."),
    dst: Path = typer.Argument(..., help="Output folder (must be empty unless --force; re-run to resume)."),
    block_size: int = typer.Option(128, help="Square quantization block size."),
    scale_fmt: str = typer.Option("float", help="float (amax/448) | ue8m0 (power-of-two scales, V3.1 style)"),
    workers: int = typer.Option(
        0, help="Compute threads (0 = the default, 1: the job is memory-bound); a separate thread writes."
    ),
    force: bool = typer.Option(False, help="Overwrite a non-empty destination."),
):
    """Quantize to DeepSeek's FP8 block format (float8_e4m3fn + weight_scale_inv), official tensor selection.

    Example: dsv3 convert bf16-to-fp8 ./tiny-bf16 ./tiny-fp8 --scale-fmt ue8m0
    """
    from dsv3.convert.fp8 import bf16_to_fp8 as run

    typer.echo(run(src, dst, block_size, scale_fmt, workers or None, force).summary())


quantize_app = typer.Typer(
    no_args_is_help=True, help="Quantize checkpoints to integer formats transformers and vLLM load."
)
app.add_typer(quantize_app, name="quantize")


@quantize_app.command("int8")
@_friendly
def quantize_int8(
    src: str = typer.Argument(
        ..., help="FP8 or BF16/FP16/FP32 checkpoint folder or Hub repo id (never modified)."
    ),
    dst: Path = typer.Argument(..., help="Output folder (must be empty unless --force; re-run to resume)."),
    workers: int = typer.Option(
        0, help="Compute threads (0 = the default, 1: the job is memory-bound); a separate thread writes."
    ),
    force: bool = typer.Option(
        False, help="Write into a non-empty destination (removes only our own files)."
    ),
):
    """INT8 W8A8 in compressed-tensors `int-quantized` format: int8 weights per output channel, int8 activations
    per token at run time. Data-free and streamed shard by shard (FP8 sources dequantized on the fly). Router,
    embeddings, lm_head, norms and the MTP module's eh_proj / shared head stay as they are.

    Example: dsv3 quantize int8 ~/models/DeepSeek-V3 ~/models/DeepSeek-V3-int8
    """
    from dsv3.convert.quantize import quantize_int8 as run

    typer.echo(run(src, dst, workers or None, force).summary())


@quantize_app.command("gptq")
@_friendly
def quantize_gptq(
    src: str = typer.Argument(
        ..., help="FP8 or BF16/FP16/FP32 checkpoint folder or Hub repo id (never modified)."
    ),
    dst: Path = typer.Argument(..., help="Output folder (must be empty unless --force; re-run to resume)."),
    calib: Path = typer.Option(..., help="UTF-8 text file the calibration samples are cut from."),
    bits: int = typer.Option(4, help="Weight bits: 4 | 8."),
    group_size: int = typer.Option(
        128, help="Input columns per scale; must divide every quantized input dim."
    ),
    nsamples: int = typer.Option(128, help="Calibration samples."),
    seqlen: int = typer.Option(512, help="Tokens per calibration sample."),
    act_order: bool = typer.Option(
        False, help="Quantize columns in decreasing Hessian diagonal order (g_idx)."
    ),
    targets: str = typer.Option(
        "all", help="all (every decoder-block Linear) | experts (routed experts only)."
    ),
    format: str = typer.Option("compressed-tensors", help="compressed-tensors (pack-quantized) | gptq (v1)."),
    device: str = typer.Option("cpu", help="Where calibration and GPTQ run: cpu | cuda | cuda:N."),
    force: bool = typer.Option(
        False, help="Write into a non-empty destination (removes only our own files)."
    ),
):
    """GPTQ weight-only quantization (W4A16 / W8A16), one decoder layer at a time from the shards: every routed
    expert is calibrated on all tokens, the MTP layer too; router, embeddings, lm_head, norms, eh_proj and the
    MTP shared head stay as they are. What was done (incl. per-module fallbacks) goes to dsv3_record.json.

    Example: dsv3 quantize gptq ~/models/DeepSeek-V3 ~/models/DeepSeek-V3-w4a16 --calib wiki.txt --targets experts
    """
    from dsv3.convert.gptq_stream import GPTQOptions
    from dsv3.convert.gptq_stream import quantize_gptq as run

    opts = GPTQOptions(bits, group_size, nsamples, seqlen, act_order, targets, format, device=device)
    typer.echo(run(src, dst, calib, opts, force).summary())


@app.command("install-code")
@_friendly
def install_code(
    folder: Path = typer.Argument(..., help="A downloaded checkpoint folder (e.g. deepseek-ai/DeepSeek-V3)."),
):
    """Put dsv3's remote-code files and auto_map into a checkpoint folder, keeping the originals as *.orig.

    After this, AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) uses our code on
    transformers 5.

    Example: dsv3 install-code ~/models/DeepSeek-V3
    """
    from dsv3.convert.checkpoint import install_remote_code

    for line in install_remote_code(folder):
        typer.echo(line)


@app.command()
@_friendly
def generate(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 | auto"),
    sample: bool = typer.Option(
        False, help="Sample (with the checkpoint's generation config) instead of greedy."
    ),
    seed: int = typer.Option(0, help="Random seed when sampling."),
    mtp: bool = typer.Option(
        False, "--mtp", help="MTP speculative decoding (same greedy text, fewer main-model forwards)."
    ),
    draft_tokens: int = typer.Option(
        1, help="With --mtp: draft tokens per step (more than 1 chains the MTP module on its own output)."
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Static cache + torch.compile'd decode step (CPU too); an untimed first run compiles it.",
    ),
):
    """Generate a continuation with the KV cache; prints the text (stdout), then tok/s and, with --mtp, the
    draft acceptance (stderr).

    Example: dsv3 generate ./tiny-v3 --prompt "The quick brown fox" --max-new-tokens 16 --mtp --draft-tokens 2
    """
    from .generate import run_generation

    result = run_generation(model, prompt, max_new_tokens, dtype, sample, seed, mtp, draft_tokens, compile)
    typer.echo(result.text)
    typer.echo(result.summary(), err=True)


@app.command()
@_friendly
def card(
    folder: Path = typer.Argument(..., help="Checkpoint folder written by dsv3 (it holds dsv3_record.json)."),
    repo_id: str = typer.Option(None, help="Hub repo the usage snippet loads from (kept for later runs)."),
    license: str = typer.Option(None, "--license", help="Hub license id, e.g. mit (default: the base's)."),
    force: bool = typer.Option(False, help="Replace a README.md that dsv3 did not write."),
):
    """Write (or refresh) FOLDER/README.md: a model card rendered from config.json and dsv3_record.json
    (variant, provenance, usage, evaluation results, limitations).

    Example: dsv3 card ./DeepSeek-V3-int8 --repo-id me/DeepSeek-V3-int8
    """
    from dsv3.model_cards import write_card

    typer.echo(f"wrote {write_card(folder, force=force, repo_id=repo_id, license=license)}")


@app.command()
@_friendly
def push(
    folder: Path = typer.Argument(..., help="Checkpoint folder with a current card (see `dsv3 card`)."),
    repo_id: str = typer.Argument(..., help="Hub repo id, namespace/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repo private."),
    revision: str = typer.Option(None, help="Branch to push to (created from main if missing)."),
    dry_run: bool = typer.Option(False, help="Check the folder and list the files; upload nothing."),
):
    """Check FOLDER (complete shards and index, config, remote code, tokenizer, current card) and upload it;
    re-run after an interruption to complete the upload. The token comes from HF_TOKEN or `hf auth login`.

    Example: dsv3 push ./DeepSeek-V3-int8 me/DeepSeek-V3-int8 --dry-run
    """
    from dsv3.model_cards import push_folder

    typer.echo(push_folder(folder, repo_id, private=private, revision=revision, dry_run=dry_run).summary())


@app.command("eval")
@_friendly
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id."),
    tasks: str = typer.Option(
        None, help="Comma-separated lm-eval tasks, or ours: dsv3_pydoc_ppl, dsv3_pydoc_order, dsv3_gsm8k."
    ),
    suite: str = typer.Option(None, help="deepseek-v3-base: the paper's Table 3 rows as lm-eval tasks."),
    include_path: list[Path] = typer.Option([], help="Folder of more task YAML files (repeatable)."),
    num_fewshot: int = typer.Option(None, help="Few-shot examples (default: each task's own)."),
    limit: float = typer.Option(None, help="At most N examples per task (below 1: that fraction)."),
    batch_size: str = typer.Option(None, help="Batch size or auto (default 1; auto with --backend vllm)."),
    output: Path = typer.Option(None, help="Folder for lm-eval's results/samples files and the report."),
    apply_chat_template: bool = typer.Option(False, help="Format prompts with the tokenizer's chat template"),
    fewshot_as_multiturn: bool = typer.Option(
        None, "--fewshot-as-multiturn/--no-fewshot-as-multiturn", help="Few-shot examples as chat turns."
    ),
    system_instruction: str = typer.Option(None, help="System prompt for every request."),
    strip_thinking: bool = typer.Option(
        False, help="Reasoning models: score the text after </think>; no </think>: an empty answer."
    ),
    allow_code_execution: bool = typer.Option(
        False, help="Run tasks that execute model-written code (HumanEval, MBPP, CRUXEval): unsafe, opt-in."
    ),
    backend: str = typer.Option("hf", help="hf (transformers with our remote code) | vllm (GPU)."),
    device: str = typer.Option(None, help="hf backend device (default cuda:0 if present, else cpu)."),
    dtype: str = typer.Option(None, help="Weights dtype: auto (the checkpoint's) | float32 | bfloat16."),
    model_args: str = typer.Option(None, help="More model arguments, key=value,... (e.g. use_mtp=True)"),
    gen_kwargs: str = typer.Option(None, help="Generation overrides for generative tasks, key=value,..."),
    tensor_parallel_size: int = typer.Option(1, help="vllm: GPUs per model replica."),
    data_parallel_size: int = typer.Option(1, help="vllm: model replicas."),
    gpu_memory_utilization: float = typer.Option(None, help="vllm: fraction of GPU memory to use."),
    max_model_len: int = typer.Option(None, help="vllm: context length to reserve."),
    record: bool = typer.Option(True, help="Add the results to MODEL/dsv3_record.json (local folders only)."),
):
    """Evaluate with lm-eval (offline with local tasks): lm-eval's results/samples files unchanged in --output,
    a report (markdown + PNG chart vs the paper), results recorded for the model card. Tasks that run
    model-written code need --allow-code-execution.

    Example: dsv3 eval ./tiny-v3 --tasks dsv3_pydoc_ppl,dsv3_pydoc_order --limit 20 --output ./eval-out
    """
    from dsv3.eval import run_eval

    run = run_eval(
        model,
        tasks=[tasks] if tasks else [],
        suite=suite,
        include_path=include_path,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        output=output,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction,
        strip_thinking=strip_thinking,
        allow_code_execution=allow_code_execution,
        backend=backend,
        device=device,
        dtype=dtype,
        model_args=model_args,
        gen_kwargs=gen_kwargs,
        tensor_parallel_size=tensor_parallel_size,
        data_parallel_size=data_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        record=record,
    )
    typer.echo(run.markdown)
    for path in run.files + ([run.record] if run.record else []):
        typer.echo(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    # --debug is accepted anywhere on the line (before or after the subcommand), as DESIGN.md promises.
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in args:
        STATE["debug"] = True
        args = [a for a in args if a != "--debug"]
    app(args=args, prog_name="dsv3")


if __name__ == "__main__":
    sys.exit(main())
