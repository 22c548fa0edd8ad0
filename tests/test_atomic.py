import os
import stat
import subprocess
import sys

import pytest

from zeropoint.atomic import atomic_path


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_output_follows_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    with atomic_path(tmp_path / "x.gguf") as tmp:
        tmp.write_bytes(b"abc")
    with atomic_path(tmp_path / "d", directory=True) as tmp:
        (tmp / "f").write_text("1")
    assert _mode(tmp_path / "x.gguf") == file_mode
    assert _mode(tmp_path / "d") == dir_mode


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_runs_leftovers_are_cleaned_live_ones_kept(tmp_path):
    out = tmp_path / "model.gguf"
    dead_file = tmp_path / f".model.gguf.partial-{_dead_pid()}-abc"
    dead_file.write_bytes(b"half")
    dead_dir = tmp_path / f".model.gguf.partial-{_dead_pid()}-xyz"
    dead_dir.mkdir()
    (dead_dir / "shard").write_bytes(b"half")
    old_style = tmp_path / ".model.gguf.partial-k3j2"  # written before the PID was in the name
    old_style.write_bytes(b"half")
    live = tmp_path / f".model.gguf.partial-{os.getpid()}-live"
    live.write_bytes(b"being written")
    other = tmp_path / ".other.gguf.partial-1-abc"
    other.write_bytes(b"not ours")

    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")

    assert out.read_bytes() == b"whole"
    assert not dead_file.exists() and not dead_dir.exists() and not old_style.exists()
    assert live.exists() and other.exists()


def test_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"part")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
