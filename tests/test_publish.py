"""Publishing: model cards from the recorded metadata, and `dsv3 push` through the real huggingface_hub client
against a small Hub on 127.0.0.1 (the endpoints huggingface_hub 2.x calls: create repo, repo info, tree,
preupload, LFS batch + basic transfer, commit, branch, validate-yaml, resolve).

What the local Hub does not implement: the Xet storage service (CAS). With hf_xet installed, huggingface_hub
uploads every file the Hub calls "lfs" through Xet, so the local Hub answers "regular" for every file in that
mode (contents travel base64 in the commit); the LFS path (large files as objects, skipped when the Hub already
has them) is exercised with HF_HUB_DISABLE_XET=1.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

TOKEN = "hf_localtest_0123456789abcdefSECRET"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ a local Hub
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


class LocalHub:
    """Repos as {branch: commit}, commits as {path: (bytes, is_lfs)}; LFS objects by sha256. Knobs: `lfs`
    (answer "lfs" for *.safetensors at preupload), `admit_lfs_puts` / `stall_commits` (stall requests past a
    count until `release` is set, so a test can kill the client mid-upload)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, dict] = {}
        self.commits: dict[str, dict[str, tuple[bytes, bool]]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.lfs_puts: list[str] = []
        self.lfs = False
        self.admit_lfs_puts: int | None = None
        self.stall_commits = False
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- state helpers used by the tests
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: data for path, (data, _) in self.commits[repo["branches"][branch]].items()}

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id]["history"])

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> None:
        sha = self._new_commit(
            {".gitattributes": (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)}
        )
        self.repos[repo_id] = {"private": private, "branches": {"main": sha}, "history": [sha]}
        if files:
            sha = self._new_commit({**self.commits[sha], **{p: (d, False) for p, d in files.items()}})
            self.repos[repo_id]["branches"]["main"] = sha
            self.repos[repo_id]["history"].append(sha)

    def _new_commit(self, files: dict) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}-{time.time_ns()}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        return sha

    def _resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        return repo["branches"].get(rev) or (rev if rev in self.commits and rev in repo["history"] else None)

    def _handler(hub):  # noqa: N805 - the handler class closes over the hub
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            # -- plumbing
            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(
                self, status: int, body=b"", headers: dict | None = None, head_only: bool = False
            ) -> None:
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head_only and self.command != "HEAD":  # a HEAD answer has headers only, errors too
                    try:
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-request
                        pass

            def _error(self, status: int, message: str, code: str | None = None) -> None:
                headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
                self._send(status, {"error": message}, headers)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def _repo(self, repo_id: str, write: bool = False) -> dict | None:
                if write and not self._authorized():
                    self._error(401, "Invalid credentials in Authorization header")
                    return None
                repo = hub.repos.get(repo_id)
                if repo is None or (repo["private"] and not self._authorized()):
                    self._error(404, "Repository not found", "RepoNotFound")
                    return None
                return repo

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.log.append((method, path))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if method == "GET" and m:
                    return self.repo_info(m[1], m[2] or "main")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if method == "GET" and m:
                    return self.tree(m[1], m[2])
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if method == "POST" and m:
                    return getattr(self, m[2])(m[1], m[3], query)
                m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if method == "POST" and m:
                    return self.lfs_batch(m[1])
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
                if method == "PUT" and m:
                    return self.lfs_put(m[1])
                if method == "POST" and path == "/lfs-verify":
                    oid = json.loads(self._body())["oid"]
                    return self._send(200 if oid in hub.lfs_objects else 404, {})
                if method == "POST" and path == "/api/repos/create":
                    return self.create_repo()
                if method == "POST" and path == "/api/validate-yaml":
                    return self.validate_yaml()
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if method in ("GET", "HEAD") and m:
                    return self.resolve(m[1], m[2], m[3], head_only=method == "HEAD")
                self._body()
                self._error(404, f"no route {method} {path}")

            def do_GET(self) -> None:
                self._route("GET")

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

            # -- endpoints
            def create_repo(self) -> None:
                payload = json.loads(self._body())
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                repo_id = f"{payload['organization']}/{payload['name']}"
                with hub.lock:
                    if (
                        repo_id in hub.repos
                    ):  # the Hub's 409 carries the url (create_repo(exist_ok=True) reads it)
                        message = "You already created this model repo"
                        return self._send(409, {"error": message, "url": f"{hub.url}/{repo_id}"})
                    hub.add_repo(
                        repo_id, private=payload.get("visibility") == "private" or payload.get("private")
                    )
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def repo_info(self, repo_id: str, rev: str) -> None:
                if (repo := self._repo(repo_id)) is None:
                    return
                sha = hub._resolve(repo_id, rev)
                if sha is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                siblings = [{"rfilename": p} for p in sorted(hub.commits[sha])]
                info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"]}
                self._send(
                    200,
                    {**info, "siblings": siblings, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z"},
                )

            def tree(self, repo_id: str, rev: str) -> None:
                if self._repo(repo_id) is None:
                    return
                sha = hub._resolve(repo_id, rev)
                if sha is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                entries = []
                for path, (data, is_lfs) in sorted(hub.commits[sha].items()):
                    pointer = lfs_pointer(data)
                    entry = {"type": "file", "path": path, "size": len(data)}
                    entry["oid"] = git_blob_sha1(pointer if is_lfs else data)
                    if is_lfs:
                        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
                        entry["lfs"] = {**lfs, "pointerSize": len(pointer)}
                    entries.append(entry)
                self._send(200, entries)

            def preupload(self, repo_id: str, rev: str, query) -> None:
                payload = json.loads(self._body())
                if self._repo(repo_id, write=True) is None:
                    return
                sha = hub._resolve(repo_id, rev)
                if sha is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                out = []
                for f in payload["files"]:
                    lfs = hub.lfs and f["path"].endswith(".safetensors")
                    remote = hub.commits[sha].get(f["path"])
                    oid = None
                    if (
                        remote is not None
                    ):  # what huggingface_hub compares with: sha256 for LFS, git sha1 else
                        data, _ = remote
                        oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
                    mode = "lfs" if lfs else "regular"
                    out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
                self._send(200, {"files": out, "commitOid": sha})

            def lfs_batch(self, repo_id: str) -> None:
                payload = json.loads(self._body())
                if self._repo(repo_id, write=True) is None:
                    return
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs_objects:  # already stored: no actions, the client skips it
                        upload = {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}
                        entry["actions"] = {"upload": upload, "verify": {"href": f"{hub.url}/lfs-verify"}}
                    objects.append(entry)
                self._send(200, {"transfer": "basic", "objects": objects})

            def lfs_put(self, oid: str) -> None:
                data = self._body()
                with hub.lock:
                    admitted = hub.admit_lfs_puts is None or hub.admit_lfs_puts > 0
                    if hub.admit_lfs_puts is not None and admitted:
                        hub.admit_lfs_puts -= 1
                if not admitted:
                    hub.stalled.set()
                    hub.release.wait(60)
                    return self._error(500, "stalled upload")
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._error(400, "sha256 mismatch")
                with hub.lock:
                    hub.lfs_objects[oid] = data
                    hub.lfs_puts.append(oid)
                self._send(200, b"")

            def branch(self, repo_id: str, branch: str, query) -> None:
                payload = json.loads(self._body() or b"{}")
                if (repo := self._repo(repo_id, write=True)) is None:
                    return
                if branch in repo["branches"]:
                    return self._error(409, f"Reference already exists: refs/heads/{branch}")
                start = hub._resolve(repo_id, payload.get("startingPoint") or "main")
                repo["branches"][branch] = start
                self._send(200, {})

            def commit(self, repo_id: str, rev: str, query) -> None:
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                if (repo := self._repo(repo_id, write=True)) is None:
                    return
                if hub.stall_commits:
                    hub.stalled.set()
                    hub.release.wait(60)
                    return self._error(500, "stalled commit")
                with hub.lock:
                    parent = hub._resolve(repo_id, rev)
                    if parent is None:
                        return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                    files = dict(hub.commits[parent])
                    for item in lines[1:]:
                        value = item["value"]
                        if item["key"] == "file":
                            files[value["path"]] = (base64.b64decode(value["content"]), False)
                        elif item["key"] == "lfsFile":
                            if value["oid"] not in hub.lfs_objects:
                                return self._error(422, f"LFS object {value['oid']} was never uploaded")
                            files[value["path"]] = (hub.lfs_objects[value["oid"]], True)
                        elif item["key"] == "deletedFile":
                            files.pop(value["path"], None)
                        else:
                            return self._error(400, f"unsupported commit item {item['key']}")
                    sha = hub._new_commit(files)
                    repo["branches"][rev] = sha
                    repo["history"].append(sha)
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

            def validate_yaml(self) -> None:
                # The Hub validates card metadata server side; here: huggingface_hub's own strict parser.
                from huggingface_hub import ModelCard

                try:
                    ModelCard(json.loads(self._body())["content"], ignore_metadata_errors=False)
                except Exception as err:
                    return self._send(400, str(err).encode())
                self._send(200, {})

            def resolve(self, repo_id: str, rev: str, path: str, head_only: bool) -> None:
                if self._repo(repo_id) is None:
                    return
                sha = hub._resolve(repo_id, rev)
                if sha is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                if path not in hub.commits[sha]:
                    return self._error(404, f"Entry not found: {path}", "EntryNotFound")
                data, is_lfs = hub.commits[sha][path]
                headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
                if is_lfs:
                    sha256 = hashlib.sha256(data).hexdigest()
                    headers |= {
                        "ETag": f'"{sha256}"',
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data)),
                    }
                else:
                    headers["ETag"] = f'"{git_blob_sha1(data)}"'
                self._send(200, data, headers, head_only=head_only)

        return Handler


@pytest.fixture
def hub():
    server = LocalHub()
    yield server
    server.close()


# ------------------------------------------------------------------------------------------ helpers
def hub_env(hub: LocalHub | None, tmp_path: Path, token: str | None = TOKEN, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def dsv3(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsv3.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-2000:]
    return lines[0]


def assert_no_token(*procs: subprocess.CompletedProcess) -> None:
    for proc in procs:
        assert TOKEN not in proc.stdout + proc.stderr


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One checkpoint per card variant, made by the real tools: tiny FP8 -> BF16 (MTP dropped) and INT8; a
    pack-quantized W4A16 folder with a quantize-gptq record; a tiny Moonlight BF16 (random weights, from scratch)."""
    from dsv3.convert.fp8 import fp8_to_bf16
    from dsv3.convert.quantize import quantize_int8
    from dsv3.convert.tiny import build_tiny

    base = tmp_path_factory.mktemp("variants")
    fp8 = build_tiny(base / "tiny-fp8", "v3", fp8=True)
    out = {
        "fp8": fp8,
        "scratch": build_tiny(base / "tiny-moonlight", "moonlight"),
        "bf16": fp8_to_bf16(fp8, base / "bf16", drop_mtp=True).dst,
        "int8": quantize_int8(fp8, base / "int8").dst,
    }
    out["gptq"] = _write_w4a16(out["bf16"], base / "w4a16")
    return out


def _write_w4a16(src: Path, dst: Path) -> Path:
    """A compressed-tensors pack-quantized W4A16 folder (experts int4, group 32) with the record a GPTQ run writes
    (round-to-nearest values: the card describes what the record says)."""
    import torch
    from dsv3.convert.checkpoint import (
        CheckpointReader,
        ShardWriter,
        atomic_write_json,
        copy_remote_code,
        copy_side_files,
        read_config,
    )
    from dsv3.convert.record import new_record, write_record
    from dsv3.modeling_deepseek.quantized import group_rtn_quant, pack_int32

    reader, writer = CheckpointReader(src), ShardWriter(dst, max_shard_bytes=2**21)
    for name in reader:
        t = reader.get(name)
        if ".mlp.experts." in name and name.endswith(".weight"):
            module = name.removesuffix(".weight")
            q, scale = group_rtn_quant(t.float(), 4, 32)
            writer.add(f"{module}.weight_packed", pack_int32(q, 4))
            writer.add(f"{module}.weight_scale", scale)
            writer.add(f"{module}.weight_shape", torch.tensor(t.shape))
        else:
            writer.add(name, t)
    writer.close()
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj$"]
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    config = read_config(src)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ignore + ["re:.*mlp\\.gate$", "re:.*eh_proj$", "re:.*shared_head\\.head$"],
    }
    atomic_write_json(dst / "config.json", config)
    copy_side_files(src, dst)
    copy_remote_code(dst)
    params = {
        "bits": 4,
        "group_size": 32,
        "nsamples": 16,
        "seqlen": 64,
        "act_order": False,
        "targets": "experts",
    }
    params |= {
        "fmt": "compressed-tensors",
        "method": "gptq",
        "calib": "wiki.valid.raw",
        "calib_sha256": "ab" * 32,
    }
    results = {
        "layers": 2,
        "modules_quantized": 96,
        "fallbacks": {"model.layers.1.mlp.experts.3.down_proj": "rtn"},
    }
    write_record(dst, new_record(src, "quantize-gptq", params, {**results, "fallback_counts": {"rtn": 1}}))
    return dst


def _count_scales(folder: Path) -> int:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return sum(name.endswith("_scale_inv") for name in weight_map)


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def _copy(folder: Path, tmp_path: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(folder, tmp_path / (name or folder.name)))


# ------------------------------------------------------------------------------------------ cards
def _metadata(card: str):
    from huggingface_hub import ModelCard

    return ModelCard(card, ignore_metadata_errors=False).data  # strict: a bad model-index raises


EXPECTED = {
    "bf16": ["BF16, no `quantization_config`", "dropped with `--drop-mtp`", "**Random weights.**"],
    "fp8": ["`float8_e4m3fn`", "{n_fp8} weight matrices", "vLLM dequantizes `kv_b_proj`", "MTP | kept"],
    "int8": ["`int-quantized`", "`re:.*mlp\\.gate$`", "vLLM dequantizes `kv_b_proj`", "MTP | kept"],
    "gptq": [
        "4-bit GPTQ",
        "group of 32",
        "`wiki.valid.raw`",
        "1 of 96 modules needed a fallback",
        "`re:.*self_attn.*`",
    ],
    "scratch": ["**random weights**", "preset `moonlight`, seed 0", "MTP | none |"],
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_card_metadata_validates_and_the_text_says_what_the_files_are(folders, variant):
    from dsv3.model_cards import render_card

    card = render_card(folders[variant])
    data = _metadata(card)
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    # Made from a tiny random checkpoint: no Hub model to name, no base card to inherit a license from.
    assert data.base_model is None and data.license == "other" and data.license_name == "unspecified"
    assert "custom_code" in data.tags
    for text in EXPECTED[variant]:
        text = text.format(n_fp8=_count_scales(folders["fp8"]))
        assert text in card, text
    if variant == "gptq":  # attention is in the ignore list: vLLM's kv_b_proj dequantization does not apply
        assert "kv_b_proj" not in card


def test_card_names_the_base_model_and_inherits_its_license_when_the_source_came_from_the_hub(
    folders, tmp_path
):
    from dsv3.model_cards import render_card

    folder = _copy(folders["int8"], tmp_path)
    record = json.loads((folder / "dsv3_record.json").read_text())
    record["source"] |= {"repo_id": "deepseek-ai/DeepSeek-V3", "revision": "e" * 40}
    record["source"]["card"] = {"license": "mit", "language": ["en", "zh"]}
    (folder / "dsv3_record.json").write_text(json.dumps(record))
    card = render_card(folder)
    data = _metadata(card)
    assert data.base_model == "deepseek-ai/DeepSeek-V3" and data.base_model_relation == "quantized"
    assert data.license == "mit" and data.language == ["en", "zh"] and data.license_name is None
    assert "revision `" + "e" * 40 + "`" in card and "license was not recorded" not in card


def test_card_of_a_model_trained_from_scratch_shows_the_training_results(folders, tmp_path):
    from dsv3.model_cards import render_card

    folder = _copy(folders["scratch"], tmp_path)
    record = json.loads((folder / "dsv3_record.json").read_text())
    record["operation"] |= {"name": "train-demo-model", "params": {"steps": 600, "seed": 0}}
    record["operation"]["results"] = {"heldout_ppl": 41.25, "unigram_ppl": 812.0, "mtp_agreement": 0.3}
    (folder / "dsv3_record.json").write_text(json.dumps(record))
    card = render_card(folder)
    assert _metadata(card).base_model is None
    assert "**trained from scratch**" in card and "Random weights" not in card
    assert "| heldout_ppl | 41.25 |" in card and "| `train-demo-model` | steps=600, seed=0 |" in card


def test_card_shows_evaluations_and_puts_only_full_runs_in_the_model_index(folders, tmp_path):
    from dsv3.convert.record import add_evaluation
    from dsv3.model_cards import check_folder, render_card, write_card

    folder = _copy(folders["int8"], tmp_path)
    write_card(folder, repo_id="me/int8")
    # As `dsv3 eval` records them (metric names without lm-eval's "none" filter); the smoke run in lm-eval's raw
    # spelling, which the card reads too.
    full = {"acc": 0.5123, "acc_stderr": 0.01, "acc_norm": 0.6, "acc_norm_stderr": None, "num_fewshot": 5}
    gsm8k = {
        "exact_match,flexible-extract": 0.3,
        "exact_match,flexible-extract_stderr": 0.05,
        "num_fewshot": 8,
    }
    results = {"arc_easy": full | {"samples": 100}, "gsm8k": gsm8k | {"samples": 1319}}
    add_evaluation(folder, {"tool": "lm-eval 0.4.9", "limit": None, "results": results})
    smoke = {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.2, "num_fewshot": 8}
    add_evaluation(
        folder, {"tool": "lm-eval 0.4.9", "limit": 4, "results": {"gsm8k": smoke | {"samples": 4}}}
    )
    with pytest.raises(ValueError, match="README.md: out of date"):
        check_folder(folder, "me/int8")  # the record changed: the card must be re-rendered before a push
    card = render_card(folder)
    data = _metadata(card)
    metrics = {(r.dataset_type, r.metric_type): r for r in data.eval_results}
    # The --limit run is a smoke test: table only.
    assert set(metrics) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("gsm8k", "exact_match")}
    assert metrics["gsm8k", "exact_match"].metric_name == "exact_match (flexible-extract)"
    assert metrics["arc_easy", "acc"].metric_value == 0.5123
    assert metrics["arc_easy", "acc"].dataset_args == {"num_few_shot": 5} and data.model_name == "int8"
    assert "| arc_easy | acc | 0.5123 | 0.01 | 5 | 100 |" in card
    assert "| arc_easy | acc_norm | 0.6 | - | 5 | 100 |" in card
    assert "| gsm8k | exact_match (flexible-extract) | 0.3 | 0.05 | 8 | 1319 |" in card
    assert "| gsm8k | exact_match (strict-match) | 0.25 | 0.2 | 8 | 4 (`--limit 4`) |" in card


def test_write_card_keeps_a_readme_it_did_not_write_unless_forced(folders, tmp_path):
    from dsv3.model_cards import CardError, write_card

    folder = _copy(folders["bf16"], tmp_path)
    (folder / "README.md").write_text("# my notes\n")
    with pytest.raises(CardError, match="README.md: exists and was not written by dsv3 card"):
        write_card(folder, license="apache-2.0")
    assert (folder / "README.md").read_text() == "# my notes\n"
    assert "card" not in json.loads((folder / "dsv3_record.json").read_text())  # refused before any change
    path = write_card(folder, force=True, repo_id="me/bf16", license="apache-2.0")
    first = path.read_text()
    assert (
        write_card(folder).read_text() == first
    )  # ours: rewritten freely; the options persist in the record
    assert 'model_id = "me/bf16"' in first and _metadata(first).license == "apache-2.0"
    with pytest.raises(CardError, match="--license: 'MIT License' is not a Hub license id"):
        write_card(folder, license="MIT License")


def test_each_card_usage_snippet_runs_against_its_folder(folders, tmp_path):
    """The python block of every variant's card, run as it is in a fresh interpreter inside the folder."""
    from dsv3.model_cards import render_card

    procs = {}
    for variant, folder in folders.items():
        code = _snippet(render_card(folder))
        assert 'model_id = "."' in code and "trust_remote_code=True" in code
        env = hub_env(None, tmp_path, token=None, HF_HUB_OFFLINE="1")
        procs[variant] = subprocess.Popen(
            [sys.executable, "-c", code], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    for variant, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (variant, err.decode()[-3000:])
        assert out.decode().strip(), variant  # 16 generated tokens, decoded


# ------------------------------------------------------------------------------------------ push
def _ready(folders: dict, variant: str, tmp_path: Path, repo_id: str) -> Path:
    from dsv3.model_cards import write_card

    folder = _copy(folders[variant], tmp_path)
    write_card(folder, repo_id=repo_id)
    return folder


def test_push_uploads_every_file_byte_identical_and_resumes_after_a_kill(folders, hub, tmp_path):
    """Default client path (hf_xet installed: the streamed, batched upload). The first run is killed while its
    commit is in flight, the second completes it, the third finds nothing to do and makes no commit."""
    folder = _ready(folders, "int8", tmp_path, "me/int8")
    env = hub_env(hub, tmp_path)
    hub.stall_commits = True
    cmd = [sys.executable, "-m", "dsv3.cli", "push", str(folder), "me/int8"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert hub.stalled.wait(180), first.communicate()[1][-2000:]
    first.kill()
    out, err = first.communicate()
    hub.stall_commits = False
    hub.release.set()
    assert set(hub.files("me/int8")) == {".gitattributes"}  # killed before anything was committed

    second = dsv3("push", str(folder), "me/int8", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    remote = hub.files("me/int8")
    assert remote.pop(".gitattributes") and remote == local_files(folder)  # every file, byte for byte
    commits = hub.commit_count("me/int8")
    third = dsv3("push", str(folder), "me/int8", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert hub.commit_count("me/int8") == commits  # unchanged files are skipped: no empty commit
    assert (
        f"uploaded {len(remote)} files" in second.stdout
        and "model-00001-of-00004.safetensors" in second.stdout
    )
    assert_no_token(second, third, subprocess.CompletedProcess(cmd, -9, out, err))


def test_interrupted_lfs_upload_resumes_without_resending_what_the_hub_has(folders, hub, tmp_path):
    """LFS path (HF_HUB_DISABLE_XET=1): shards go up as LFS objects. The first run is killed after two of the four
    shards arrived; the re-run uploads only the other two, then commits everything."""
    folder = _ready(folders, "fp8", tmp_path, "me/fp8")
    env = hub_env(hub, tmp_path, HF_HUB_DISABLE_XET="1")
    hub.lfs, hub.admit_lfs_puts = True, 2
    cmd = [sys.executable, "-m", "dsv3.cli", "push", str(folder), "me/fp8"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert hub.stalled.wait(180), first.communicate()[1][-2000:]
    first.kill()
    first.communicate()
    hub.admit_lfs_puts = None
    hub.release.set()
    stored = set(hub.lfs_puts)
    assert len(stored) == 2 and set(hub.files("me/fp8")) == {".gitattributes"}

    second = dsv3("push", str(folder), "me/fp8", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    shards = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}
    resent = hub.lfs_puts[2:]
    assert sorted(resent) == sorted(shards - stored)  # the objects the Hub already held were not sent again
    remote = hub.files("me/fp8")
    assert remote.pop(".gitattributes") and remote == local_files(folder)
    lfs_paths = {
        p for p, (_, is_lfs) in hub.commits[hub.repos["me/fp8"]["branches"]["main"]].items() if is_lfs
    }
    assert lfs_paths == {p.name for p in folder.glob("*.safetensors")}
    assert_no_token(second)


def test_dry_run_lists_files_with_sizes_and_sends_nothing(folders, hub, tmp_path):
    folder = _ready(folders, "gptq", tmp_path, "me/w4a16")
    proc = dsv3("push", str(folder), "me/w4a16", "--dry-run", env=hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.log == [] and hub.repos == {}
    lines = proc.stdout.strip().splitlines()
    assert (
        lines[0].startswith(f"would upload {len(local_files(folder))} files") and "to me/w4a16:" in lines[0]
    )
    assert re.search(r"^\s+\d+\.\d KB  config\.json$", proc.stdout, re.M)
    assert lines[-1] == "dry run: nothing was uploaded"


def test_push_to_a_new_private_branch_leaves_main_alone(folders, hub, tmp_path):
    folder = _ready(folders, "scratch", tmp_path, "me/tiny")
    proc = dsv3("push", str(folder), "me/tiny", "--private", "--revision", "dev", env=hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.repos["me/tiny"]["private"] and set(hub.files("me/tiny")) == {".gitattributes"}
    remote = hub.files("me/tiny", "dev")
    assert remote.pop(".gitattributes") and remote == local_files(folder)


def _break(folder: Path, how: str) -> str:
    """Damage a pushable folder one way; returns the text the refusal must contain."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    if how == "missing shard":
        shard.unlink()
        return f"{shard.name}: listed in model.safetensors.index.json but missing"
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
        return "incomplete shard"
    if how == "tensor not in index":
        name = next(n for n, s in index["weight_map"].items() if s == shard.name)
        del index["weight_map"][name]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return f"{shard.name}: holds {name}, which the index does not list"
    if how == "unfinished job":
        (folder / "model-00002-of-00004.safetensors.tmp").write_bytes(b"")
        return "left by an unfinished job"
    if how == "remote code":
        (folder / "fp8.py").unlink()
        return "fp8.py: missing, but modeling_deepseek.py imports it"
    if how == "bad config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "topk_method": "nonsense"}))
        return "config.json: does not load as DeepseekV3Config"
    if how == "stale card":
        (folder / "README.md").write_text((folder / "README.md").read_text().replace("Random", "Trained"))
        return "README.md: out of date"
    if how == "card for another repo":
        return "its usage snippet names me/int8, not me/other"
    if how == "no card":
        (folder / "README.md").unlink()
        return "README.md: no model card; run `dsv3 card"
    raise AssertionError(how)


BREAKAGES = [
    "missing shard",
    "truncated shard",
    "tensor not in index",
    "unfinished job",
    "remote code",
    "bad config",
    "stale card",
    "card for another repo",
    "no card",
]


def test_push_refuses_an_incomplete_folder_with_one_line_reason(folders, hub, tmp_path):
    from dsv3.model_cards import PushError, check_folder

    for how in BREAKAGES:
        folder = _ready(folders, "int8", tmp_path / how.replace(" ", "-"), "me/int8")
        expected = _break(folder, how)
        repo = "me/other" if how == "card for another repo" else "me/int8"
        with pytest.raises(PushError) as info:
            check_folder(folder, repo)
        assert expected in str(info.value) and "\n" not in str(info.value), (how, str(info.value))
    # The command: exit 1, one line, and not one request to the Hub.
    proc = dsv3("push", str(folder), "me/int8", env=hub_env(hub, tmp_path))
    assert "README.md: no model card" in one_line_error(proc) and hub.log == []


def test_push_errors_are_one_line_and_never_show_the_token(folders, hub, tmp_path):
    folder = _ready(folders, "bf16", tmp_path, "me/bf16")
    no_token = dsv3("push", str(folder), "me/bf16", env=hub_env(hub, tmp_path, token=None))
    assert "no Hugging Face token" in one_line_error(no_token)
    wrong = "hf_wrong_token_SECRET_987654321"
    rejected = dsv3("push", str(folder), "me/bf16", env=hub_env(hub, tmp_path, token=wrong))
    assert (
        "rejected the token (401" in one_line_error(rejected)
        and wrong not in rejected.stderr + rejected.stdout
    )
    hub.add_repo("me/bf16", {"notes.txt": b"someone else's"})
    taken = dsv3("push", str(folder), "me/bf16", env=hub_env(hub, tmp_path))
    assert (
        "me/bf16 already holds files that are not in" in one_line_error(taken)
        and "(notes.txt)" in taken.stderr
    )
    assert not any(method == "POST" and "/commit/" in path for method, path in hub.log)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there any more
    offline = dsv3(
        "push",
        str(folder),
        "me/bf16",
        env={**hub_env(hub, tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
    )
    assert f"cannot reach http://127.0.0.1:{port}" in one_line_error(offline)
    assert_no_token(no_token, rejected, taken, offline)


# ------------------------------------------------------------------------------------------ download path
def test_convert_and_quantize_resolve_a_repo_id_through_the_hub(folders, hub, tmp_path):
    """`dsv3 convert` / `quantize` with SRC = a repo id download it with snapshot_download: the output equals the
    local conversion byte for byte and its record names the repo and the commit; the derived card names the base
    model. The pushed card's usage snippet also runs against the Hub copy."""
    from dsv3.convert.fp8 import fp8_to_bf16
    from dsv3.model_cards import render_card

    folder = _ready(folders, "fp8", tmp_path, "me/tiny-fp8")
    env = hub_env(hub, tmp_path)
    assert dsv3("push", str(folder), "me/tiny-fp8", env=env).returncode == 0
    commit = hub.repos["me/tiny-fp8"]["branches"]["main"]

    bf16 = dsv3("convert", "fp8-to-bf16", "me/tiny-fp8", str(tmp_path / "bf16"), env=env)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    int8 = dsv3("quantize", "int8", "me/tiny-fp8", str(tmp_path / "int8"), env=env)
    assert int8.returncode == 0, int8.stderr[-3000:]
    local = fp8_to_bf16(folder, tmp_path / "bf16-local").dst
    for shard in local.glob("*.safetensors"):
        assert (tmp_path / "bf16" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    record = json.loads((tmp_path / "int8" / "dsv3_record.json").read_text())
    assert (record["source"]["repo_id"], record["source"]["revision"]) == ("me/tiny-fp8", commit)
    assert record["source"]["card"] == {
        "license": "other",
        "license_name": "unspecified",
    }  # the pushed card's
    data = _metadata(render_card(tmp_path / "int8"))
    assert data.base_model == "me/tiny-fp8" and data.base_model_relation == "quantized"
    bf16_data = _metadata(render_card(tmp_path / "bf16"))
    assert bf16_data.base_model == "me/tiny-fp8" and bf16_data.get("base_model_relation") is None

    code = _snippet(hub.files("me/tiny-fp8")["README.md"].decode())
    assert 'model_id = "me/tiny-fp8"' in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
