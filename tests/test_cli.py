"""The dsv3 command: thin, one-line errors, refuses to overwrite."""

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


def test_demo_runs_end_to_end(tmp_path):
    proc = dsv3("demo", "--workdir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical to native = True" in proc.stdout
    assert "576 values/token/layer" in proc.stdout
