"""Atomic file output: write under a temporary name, rename into place only on success."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"  # `.NAME.partial-PID-XXXX`: the PID tells a killed run's leftover from a live one


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it vanishes.

    The temporary sits in the same folder so the final rename never crosses file systems, which
    is what makes it atomic: a reader sees the old file or the whole new one, never a part.
    What lands gets the permissions the umask gives a new file (0644 or 0755 for most users),
    not the 0600/0700 of a private temporary: a llama.cpp server running as another user must
    be able to open it. Leftovers of earlier runs to the same output that were killed (their
    process is gone) are removed first.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    prefix = f".{final.name}{PARTIAL}{os.getpid()}-"
    if directory:
        import tempfile  # with shutil, only here: a file's temporary needs neither (3 ms)

        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        tmp = _new_file(prefix, final.parent)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
        if directory and final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _new_file(prefix: str, folder: Path) -> Path:
    """A new empty file `folder/PREFIX` + 12 random hex digits, private (0600) as tempfile.mkstemp
    makes it: created with O_EXCL, so never another's."""
    for _ in range(100):
        path = folder / f"{prefix}{os.urandom(6).hex()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name {prefix}* in {str(folder)!r}")


def remove_leftovers(final: Path) -> list[Path]:
    """Remove the `.partial-` temporaries of `final` whose writing process no longer runs (a run
    that was killed, so its cleanup never ran); return them. A live writer's are kept."""
    removed = []
    for leftover in final.parent.glob(f".{final.name}{PARTIAL}*"):
        pid = leftover.name[len(final.name) + 1 + len(PARTIAL):].split("-", 1)[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        _remove(leftover)
        removed.append(leftover)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        import shutil

        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _umask() -> int:
    # os.umask can only be read by setting it; /proc tells without touching process state.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
