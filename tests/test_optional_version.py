"""The build a table records for a backend used in place: the commit of its own checkout, never that of
a repository the checkout happens to sit in."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fused_a2a.backends.optional import _git_commit


def _repo(folder: Path) -> str:
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    (folder / "f").write_text("x")
    subprocess.run(["git", "-C", str(folder), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c"],
                   check=True)
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_checkout_gives_its_own_commit(tmp_path: Path) -> None:
    commit = _repo(tmp_path / "DeepEP")
    package = tmp_path / "DeepEP" / "deep_ep"
    package.mkdir()
    assert _git_commit(package) == commit


def test_a_copy_without_git_inside_another_repository_gives_none(tmp_path: Path) -> None:
    _repo(tmp_path)
    package = tmp_path / "build" / "DeepEP" / "deep_ep"
    package.mkdir(parents=True)
    assert _git_commit(package) is None
    assert _git_commit(tmp_path / "nowhere") is None
