"""`dsv3 push`: check that a checkpoint folder is complete and its card current, then upload it to the Hub.

    check_folder(folder, repo_id)  -> list[UploadFile]   every refusal is one PushError line naming the fix
    push_folder(folder, repo_id, private=False, revision=None, dry_run=False) -> PushReport

The upload is huggingface_hub's `HfApi.upload_folder` restricted to the checked files: with hf_xet (installed with
huggingface_hub) it commits in batches and a re-run skips files already committed and chunks already uploaded;
without it, the LFS batch API skips objects the Hub already holds. So re-running an interrupted push completes it.
The token is read by huggingface_hub (HF_TOKEN or `hf auth login`) and never printed: every message we raise is
scrubbed of it.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .card import CARD_FILE, REPO_ID, human_bytes, is_our_card, render_card

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECORD_FILE = "dsv3_record.json"
# Left by a job that did not finish (converters, quantizers): temporary files, job markers, locks, GPTQ state.
UNFINISHED = ("*.tmp", "*.partial", ".dsv3-job*", ".dsv3-gptq-*")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.M)


class PushError(ValueError):
    """Why a folder cannot be pushed, or why the Hub refused it: one line."""


@dataclass
class UploadFile:
    name: str
    size: int


@dataclass
class PushReport:
    folder: Path
    repo_id: str
    files: list[UploadFile]
    dry_run: bool
    revision: str | None = None
    url: str | None = None
    commit: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    def listing(self) -> str:
        width = max(len(human_bytes(f.size)) for f in self.files)
        lines = [f"  {human_bytes(f.size):>{width}}  {f.name}" for f in self.files]
        where = f"{self.repo_id}" + (f" (branch {self.revision})" if self.revision else "")
        head = f"{'would upload' if self.dry_run else 'uploaded'} {len(self.files)} files, "
        head += f"{human_bytes(self.total)}, from {self.folder} to {where}"
        return "\n".join([head + ":", *lines])

    def summary(self) -> str:
        if self.dry_run:
            return self.listing() + "\ndry run: nothing was uploaded"
        return self.listing() + f"\ndone: {self.url} (commit {str(self.commit)[:12]})"


# ------------------------------------------------------------------------------------------ folder checks
def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> entry, the file size the header implies); a short or garbled file is a PushError."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > 100 * 2**20:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        raise PushError(f"{path}: unreadable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    return header, 8 + n + end


def _check_weights(folder: Path) -> list[str]:
    """The weight files: the index's shards, each holding exactly the tensors the index maps to it, and complete."""
    stray = {p.name for p in folder.glob("*.safetensors")}
    if (folder / INDEX_NAME).is_file():
        try:
            index = json.loads((folder / INDEX_NAME).read_text())
            weight_map = index["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise PushError(f"{folder / INDEX_NAME}: not a valid safetensors index ({err})") from None
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            if (
                not isinstance(shard, str)
                or shard != os.path.basename(shard)
                or not shard.endswith(".safetensors")
            ):
                raise PushError(
                    f"{folder / INDEX_NAME}: {name} -> {shard!r} is not a shard file in this folder"
                )
            by_shard.setdefault(shard, set()).add(name)
    elif (folder / SINGLE_NAME).is_file():
        index, by_shard = {}, {SINGLE_NAME: None}
    else:
        raise PushError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}: not a checkpoint folder")
    total = 0
    for shard, names in sorted(by_shard.items()):
        path = folder / shard
        if not path.is_file():
            raise PushError(f"{path}: listed in {INDEX_NAME} but missing")
        header, size = _safetensors_header(path)
        if path.stat().st_size != size:
            raise PushError(f"{path}: {path.stat().st_size} bytes, its header says {size}: incomplete shard")
        if names is not None and set(header) != names:
            extra, missing = sorted(set(header) - names), sorted(names - set(header))
            what = f"holds {extra[0]}, which the index does not list" if extra else f"lacks {missing[0]}"
            raise PushError(f"{path}: {what} ({len(extra)} extra, {len(missing)} missing tensors)")
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    declared = (index.get("metadata") or {}).get("total_size")
    if declared is not None and declared != total:
        raise PushError(f"{folder / INDEX_NAME}: total_size {declared} but the shards hold {total} bytes")
    unlisted = sorted(stray - set(by_shard))
    if unlisted:
        raise PushError(
            f"{folder / unlisted[0]}: a shard the index does not use (remove it or rebuild the index)"
        )
    return sorted(by_shard)


def _check_config(folder: Path) -> dict:
    from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PushError(f"{path}: not found") from None
    except ValueError as err:
        raise PushError(f"{path}: invalid JSON ({err})") from None
    try:
        DeepseekV3Config.from_dict(config)
    except Exception as err:  # the config class validates every field it reads and names the bad one
        raise PushError(f"{path}: does not load as DeepseekV3Config ({str(err).splitlines()[0]})") from None
    return config


def _check_remote_code(folder: Path, config: dict) -> None:
    """Every auto_map entry's file exists and defines its class; every sibling those files import is present."""
    auto_map = config.get("auto_map")
    if not auto_map:
        raise PushError(f"{folder / 'config.json'}: no auto_map (run `dsv3 install-code {folder}`)")
    todo = []
    for auto, ref in auto_map.items():
        module, _, cls = str(ref).rpartition(".")
        path = folder / f"{module}.py"
        if not path.is_file():
            raise PushError(f"{path}: missing, but config.json's auto_map names it for {auto}")
        if not re.search(rf"^class {re.escape(cls)}\b", path.read_text(), re.M):
            raise PushError(f"{path}: defines no class {cls}, which config.json's auto_map names for {auto}")
        todo.append(path)
    seen = set()
    while todo:
        path = todo.pop()
        if path.name in seen:
            continue
        seen.add(path.name)
        for sibling in RELATIVE_IMPORT.findall(path.read_text()):
            target = folder / f"{sibling}.py"
            if not target.is_file():
                raise PushError(f"{target}: missing, but {path.name} imports it")
            todo.append(target)


def _check_card(folder: Path, repo_id: str | None) -> None:
    path = folder / CARD_FILE
    fix = f"run `dsv3 card {folder}" + (f" --repo-id {repo_id}`" if repo_id else "`")
    if not path.is_file():
        raise PushError(f"{path}: no model card; {fix}")
    if not is_our_card(path):
        raise PushError(f"{path}: not written by `dsv3 card`; {fix} --force (replaces it)")
    if (folder / RECORD_FILE).is_file():
        from dsv3.convert.record import read_record

        named = (read_record(folder) or {}).get("card", {}).get("repo_id")
        if repo_id is not None and named != repo_id:
            now = f"names {named}" if named else "names no Hub repo"
            raise PushError(f"{path}: its usage snippet {now}, not {repo_id}; {fix}")
    if path.read_text(encoding="utf-8") != render_card(folder):
        raise PushError(f"{path}: out of date with config.json / {RECORD_FILE}; {fix}")


def check_folder(folder: str | os.PathLike, repo_id: str | None = None) -> list[UploadFile]:
    """What `dsv3 push` would upload, after checking the folder is complete: no unfinished job, the index matches
    the shards, config.json loads as DeepseekV3Config, the remote code of auto_map is present, a tokenizer, and a
    current card (for `repo_id`, when given). Every top-level file except hidden ones is uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: not a folder")
    for pattern in UNFINISHED:
        leftover = sorted(folder.glob(pattern))
        if leftover:
            raise PushError(
                f"{leftover[0]}: left by an unfinished job; re-run the command that writes {folder} to complete it"
            )
    config = _check_config(folder)
    _check_weights(folder)
    _check_remote_code(folder, config)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PushError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    _check_card(folder, repo_id)
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        raise PushError(
            f"{folder / subfolders[0]}: a subfolder; a checkpoint folder is flat (move it elsewhere)"
        )
    return [
        UploadFile(p.name, p.stat().st_size)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]


# ------------------------------------------------------------------------------------------ the upload
def _scrub(message: str, token: str | None) -> str:
    line = (message.strip().splitlines() or [""])[0]
    return line.replace(token, "***") if token else line


def _glob_literal(name: str) -> str:
    # upload_folder filters with fnmatch; brackets make *, ? and [ literal.
    return re.sub(r"([*?\[])", r"[\1]", name)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
) -> PushReport:
    folder = Path(folder)
    if not REPO_ID.match(repo_id):
        raise PushError(f"REPO_ID: {repo_id!r} is not a Hub repo id (namespace/name)")
    files = check_folder(folder, repo_id)
    report = PushReport(folder, repo_id, files, dry_run, revision)
    if dry_run:
        return report

    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to push")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        try:
            remote, new_branch = api.list_repo_files(repo_id, revision=revision), False
        except RevisionNotFoundError:  # a new branch starts from main: main's files must fit too
            remote, new_branch = api.list_repo_files(repo_id), True
        local = {f.name for f in files}
        others = sorted(set(remote) - local - {".gitattributes"})
        if others:
            raise PushError(
                f"{repo_id} already holds files that are not in {folder} ({others[0]}"
                f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}): push to a new repo or remove them"
            )
        if new_branch:
            api.create_branch(repo_id, branch=revision)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            allow_patterns=[_glob_literal(name) for name in sorted(local)],
            commit_message=f"Upload {folder.name} with dsv3 push",
        )
    except PushError:
        raise
    except Exception as err:
        raise PushError(_hub_error(err, api.endpoint, repo_id, token)) from err  # --debug shows the cause
    report.url, report.commit = str(url), info.oid
    return report


def _hub_error(err: Exception, endpoint: str, repo_id: str, token: str) -> str:
    """One line for what went wrong talking to the Hub, never containing the token."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError

    if isinstance(err, TransportError):
        return _scrub(
            f"cannot reach {endpoint} ({type(err).__name__}: {err}); check the network or HF_ENDPOINT", token
        )
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return f"{endpoint} rejected the token (401 Unauthorized): check HF_TOKEN or run `hf auth login`"
        if status == 403:
            return f"no write access to {repo_id} with this token (403 Forbidden)"
        server = err.server_message or str(err)
        return _scrub(f"{repo_id}: the Hub answered {status}: {server}", token)
    return _scrub(f"{repo_id}: {type(err).__name__}: {err}", token)
