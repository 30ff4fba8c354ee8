"""Model cards rendered from a folder's recorded metadata, and `dsv3 push` (check, then upload to the Hub)."""

import os
from pathlib import Path

from .card import CardError, render_card, write_card
from .push import PushError, PushReport, check_folder, push_folder

__all__ = [
    "CardError",
    "PushError",
    "PushReport",
    "check_folder",
    "demo_publish",
    "push_folder",
    "render_card",
    "write_card",
]


def demo_publish(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """The demo's last step: write `folder`'s card (for `repo_id`, default your-name/<folder name>) and return
    what `dsv3 push FOLDER REPO_ID --dry-run` prints. Nothing leaves the machine."""
    folder = Path(folder)
    repo_id = repo_id or f"your-name/{folder.resolve().name}"
    write_card(folder, repo_id=repo_id)
    return push_folder(folder, repo_id, dry_run=True).summary()
