"""The few git operations the registry needs, through the ``git`` command."""

from __future__ import annotations

import subprocess
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed; the message carries git's own stderr."""


class GitRepo:
    """The git work tree that holds a registry directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()  # every path given to git is absolute, whatever the caller's cwd

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise GitError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def is_repo(self) -> bool:
        return subprocess.run(["git", "-C", str(self.path), "rev-parse", "--git-dir"],
                              capture_output=True).returncode == 0

    def head(self) -> str | None:
        out = subprocess.run(["git", "-C", str(self.path), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    def dirty(self, path: Path) -> bool:
        """True when ``path`` has uncommitted changes (staged, unstaged or untracked)."""
        return bool(self.run("status", "--porcelain", "--", _abs(path)).strip())

    def tracked(self, path: Path) -> bool:
        return bool(self.run("ls-files", "--", _abs(path)).strip())

    def committed_text(self, path: Path, rev: str = "HEAD") -> str | None:
        rel = self.relative(path)
        out = subprocess.run(["git", "-C", str(self.path), "show", f"{rev}:{rel}"], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None

    def relative(self, path: Path) -> str:
        top = Path(self.run("rev-parse", "--show-toplevel").strip())
        return Path(path).resolve().relative_to(top.resolve()).as_posix()

    def log(self, path: Path) -> list[dict]:
        """Commits touching ``path``, newest first: sha, author, date, subject, body."""
        fmt = "%H%x1f%an%x1f%aI%x1f%s%x1f%b%x1e"
        out = self.run("log", f"--format={fmt}", "--", _abs(path))
        entries = []
        for record in out.split("\x1e"):
            parts = record.strip("\n").split("\x1f")
            if len(parts) == 5:
                entries.append(dict(zip(("sha", "author", "date", "subject", "body"), parts)))
        return entries

    def commit(self, paths: list[Path], message: str) -> str:
        files = [_abs(p) for p in paths]
        self.run("add", "--", *files)
        try:
            self.run("commit", "-q", "-m", message, "--", *files)
        except GitError:
            self.run("reset", "-q", "--", *files, check=False)  # unstage: the index is left as it was
            raise
        return self.head() or ""

    def user(self) -> str:
        name = self.run("config", "user.name", check=False).strip()
        email = self.run("config", "user.email", check=False).strip()
        return f"{name} <{email}>" if email else (name or "unknown")


def _abs(path: Path) -> str:
    return str(Path(path).resolve())
