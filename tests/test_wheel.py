"""Packaging (slow: about a minute): build the wheel from a copy of the sources, install it into a fresh venv
outside the repository, and use the CLI and the library there from a folder outside the repository.

The fresh venv gets torch, transformers & co. from .venv's site-packages through a .pth line (installing them
again would take minutes and the network); a directory added that way is searched but its own .pth files are not
run, so .venv's editable install of dsv3 (a .pth import hook) stays inert and `import dsv3` can only find the wheel.
The test checks that it does.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, wheel, env, workdir): dsv3 built as a wheel and installed into a fresh venv with --no-deps."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}

    # Build from a copy, so the build leaves nothing (build/, *.egg-info) in the working tree. What to copy comes
    # from pyproject itself: the package folders it maps, plus the files the metadata reads.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"dsv3", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    src = tmp / "src"
    for name in folders:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], tmp, env)
    (wheel,) = dist.glob("dsv3-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "_dsv3_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q", wheel],
        tmp,
        env,
    )
    work = tmp / "work"
    work.mkdir()
    return venv, wheel, env, work


def test_wheel_holds_only_the_dsv3_namespace_and_the_card_templates(installed):
    _, wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"dsv3", wheel.name.split("-py")[0] + ".dist-info"}, top  # no top-level convert/eval/...
    for required in (
        "dsv3/cli.py",
        "dsv3/convert/record.py",
        "dsv3/model_cards/templates/base.md",
        "dsv3/modeling_deepseek/modeling_deepseek.py",
        "dsv3/modeling_deepseek/configuration_deepseek.py",
    ):
        assert required in names, required
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"dsv3 = dsv3.cli:main" in entry_points


def test_installed_wheel_runs_the_cli_and_loads_through_the_auto_classes_outside_the_repo(installed):
    venv, _, env, work = installed
    python, dsv3 = venv / "bin" / "python", venv / "bin" / "dsv3"
    where = _run(
        [
            python,
            "-c",
            "import json, importlib.util as u, dsv3, dsv3.convert, dsv3.model_cards, dsv3.modeling_deepseek;"
            "print(json.dumps({'files': [m.__file__ for m in (dsv3, dsv3.convert, dsv3.model_cards)],"
            "'top': {n: u.find_spec(n) is not None for n in ('convert', 'model_cards', 'modeling_deepseek')}}))",
        ],
        work,
        env,
    )
    found = json.loads(where.stdout)
    assert all(f.startswith(str(venv)) for f in found["files"]), found  # the wheel, not the source tree
    assert not any(found["top"].values()), found  # nothing installed outside the dsv3 namespace

    _run([dsv3, "tiny", "tiny", "--preset", "moonlight"], work, env)
    generated = _run(
        [dsv3, "generate", "tiny", "--prompt", "The quick brown fox", "--max-new-tokens", "4"], work, env
    )
    assert generated.stdout.strip()
    auto = (
        "import torch; from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained('tiny', trust_remote_code=True, dtype=torch.float32);"
        "t = AutoTokenizer.from_pretrained('tiny'); ids = t('hello world', return_tensors='pt').input_ids;"
        "print(type(AutoConfig.from_pretrained('tiny', trust_remote_code=True)).__name__, type(m).__name__,"
        " tuple(m(ids).logits.shape))"
    )
    loaded = _run([python, "-c", auto], work, env)
    assert loaded.stdout.split()[:2] == ["DeepseekV3Config", "DeepseekV3ForCausalLM"], loaded.stdout
    # The card templates are package data: `dsv3 card` and `push --dry-run` work from the installed wheel.
    _run([dsv3, "card", "tiny", "--repo-id", "me/tiny"], work, env)
    listing = _run([dsv3, "push", "tiny", "me/tiny", "--dry-run"], work, env)
    assert "README.md" in listing.stdout and listing.stdout.strip().endswith("nothing was uploaded")
