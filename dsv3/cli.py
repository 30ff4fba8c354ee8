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
        except Exception as err:
            if STATE["debug"]:
                traceback.print_exc()
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            typer.echo(f"Error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors.")) -> None:
    STATE["debug"] = debug


@app.command()
@_friendly
def demo(
    workdir: Path = typer.Option(Path("dsv3-demo"), help="Folder for the demo's checkpoints (recreated)."),
):
    """Run the main job end to end on the built-in tiny checkpoint (no download).

    Example: dsv3 demo --workdir /tmp/dsv3-demo
    """
    from .demo import run_demo

    run_demo(workdir)


@app.command()
@_friendly
def tiny(
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty, unless --force)."),
    preset: str = typer.Option("v3", help="v3 (YaRN, q-LoRA, grouped routing, MTP) | moonlight | kimi"),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    force: bool = typer.Option(False, help="Overwrite a non-empty output folder."),
):
    """Write a small random checkpoint in the official layout (BF16 shards, config, tokenizer, remote code).

    Example: dsv3 tiny ./tiny-v3 --preset v3
    """
    from convert.tiny import build_tiny

    _refuse_non_empty(out, force)
    path = build_tiny(out, preset, seed)
    typer.echo(f"wrote {preset} tiny checkpoint to {path}")


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
    from convert.checkpoint import install_remote_code

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
):
    """Generate a continuation with the KV cache.

    Example: dsv3 generate ./tiny-v3 --prompt "The quick brown fox" --max-new-tokens 16
    """
    from .generate import generate_text

    typer.echo(generate_text(model, prompt, max_new_tokens, dtype, sample, seed))


def _refuse_non_empty(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: exists and is not empty (use --force to overwrite)")


def main() -> None:
    app(prog_name="dsv3")


if __name__ == "__main__":
    sys.exit(main())
