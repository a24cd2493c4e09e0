"""Files written atomically (a temporary file beside the target, then a rename), so an error or
Ctrl-C never leaves half a file: heads files, checkpoints, result files, tables and figures."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def usual_mode(directory: bool = False) -> int:
    """The mode a plain open / mkdir gives under the process's umask (mkstemp / mkdtemp give 0600 / 0700)."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in path's folder; write it inside the block. On success it replaces
    `path`, keeping the mode of the file it replaces, or with the usual mode for a new file (mkstemp
    makes 0600); on an error it is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = usual_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def pyplot():
    """matplotlib.pyplot without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: Path) -> Path:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    pyplot().close(fig)
    return png
