"""A real small filesystem (tmpfs) for the disk-fault tests: filled up for "disk full", remounted read-only."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture()
def tmpfs(tmp_path):
    """A 2 MiB tmpfs; skipped where this process may not mount one (it needs root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem holding ``directory``; returns the file to delete to give it back."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
