"""The dsv3 command: thin, one-line errors, refuses to overwrite."""

import json
import os
import re
import shutil
import subprocess
import sys


def dsv3(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_tiny_refuses_a_non_empty_destination_with_one_line_error(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    proc = dsv3("tiny", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: ")
    assert str(tmp_path) in proc.stderr and (tmp_path / "keep.txt").read_text() == "user data"


def test_tiny_then_generate(tmp_path):
    out = tmp_path / "moon"
    assert dsv3("tiny", str(out), "--preset", "moonlight").returncode == 0
    proc = dsv3("generate", str(out), "--prompt", "The quick brown fox", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_unknown_preset_and_missing_folder_are_one_line_errors(tmp_path):
    proc = dsv3("tiny", str(tmp_path / "x"), "--preset", "v9")
    assert proc.returncode == 1 and proc.stderr.startswith("Error: preset: unknown 'v9'")
    proc = dsv3("install-code", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "config.json: not found" in proc.stderr


def test_demo_runs_end_to_end_on_the_trained_model(tmp_path, request, monkeypatch):
    # The demo trains its model on first use (about a minute) and caches it: keep that cache across test runs
    # (pytest's cache folder, unless DSV3_CACHE is set) so only the first run pays for it.
    if not os.environ.get("DSV3_CACHE"):
        monkeypatch.setenv("DSV3_CACHE", str(request.config.cache.mkdir("dsv3-cache")))
    proc = dsv3("demo", "--workdir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "identical to native = True" in out
    # The latent cache holds kv_lora_rank + rope dim values per token and layer, measured from the cache object.
    held, rank, rope = map(
        int,
        re.search(r"cache holds (\d+) values/token/layer \(kv_lora_rank (\d+) \+ rope (\d+)\)", out).groups(),
    )
    assert held == rank + rope
    # The model learned something: far below the unigram baseline, a real continuation, and INT8 costs little.
    ppl, unigram = map(float, re.search(r"held-out perplexity ([\d.]+) \(unigram ([\d.]+)\)", out).groups())
    assert ppl < unigram / 4
    continuation = re.search(r"'The assignment statement' -> (['\"])(.+)\1", out).group(2)
    assert len(continuation.split()) >= 3
    assert "fp8_mode='keep'" in out and "logits identical: True" in out
    # MTP speculative decoding: the same greedy tokens at batch 1 and with left padding, and the trained MTP head
    # gets drafts accepted (a random one would almost never).
    mtp = re.findall(r"batch (\d): identical to plain greedy = (\w+); .* draft acceptance (\d+)%", out)
    assert [(b, same) for b, same, _ in mtp] == [("1", "True"), ("2", "True")], out
    assert all(int(acc) >= 5 for _, _, acc in mtp)
    increase = float(re.search(r"-> INT8 [\d.]+ \(([-+\d.]+)%\)", out).group(1))
    assert abs(increase) < 5


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-2000:]
    return lines[0]


def test_generate_names_the_missing_config_or_tokenizer(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json: not found" in _one_line_error(dsv3("generate", str(empty), "--prompt", "hi"))
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_ckpt("moonlight"), no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tok / name).unlink(missing_ok=True)
    err = _one_line_error(dsv3("generate", str(no_tok), "--prompt", "hi"))
    assert "no tokenizer" in err and "tokenizer.json" in err and str(no_tok) in err


def test_generate_rejects_empty_prompt_and_zero_tokens_before_loading(tmp_path):
    # The folder does not even exist: the argument checks must come first.
    missing = str(tmp_path / "not-loaded")
    assert "--prompt: must not be empty" in _one_line_error(dsv3("generate", missing, "--prompt", ""))
    err = _one_line_error(dsv3("generate", missing, "--prompt", "hi", "--max-new-tokens", "0"))
    assert "--max-new-tokens: must be at least 1, got 0" in err


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    for args in (["--debug", "install-code", str(tmp_path)], ["install-code", str(tmp_path), "--debug"]):
        proc = dsv3(*args)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_tiny_force_leaves_no_stale_shards(tmp_path):
    out = tmp_path / "tiny"
    assert dsv3("tiny", str(out), "--preset", "v3", "--bf16").returncode == 0
    before = sorted(p.name for p in out.glob("*.safetensors"))
    (out / "notes.txt").write_text("mine")
    proc = dsv3("tiny", str(out), "--preset", "kimi", "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    after = sorted(p.name for p in out.glob("*.safetensors"))
    assert before != after  # the two presets shard differently: the old names must be gone
    assert after == sorted(set(index["weight_map"].values()))
    assert (out / "notes.txt").read_text() == "mine"  # --force removes only weight files
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
