"""Writing an output file in one step: a complete file appears under its name, or nothing.

Every report, plot and summary the package writes goes through ``write_file``: the content is
written to a temporary file beside the target, flushed to disk, given mode 0644 (a temporary
file is 0600), then renamed over the target (``overwrite``) or hard-linked to it, which fails if
the target exists, even one created meanwhile: nothing a user had is replaced.
"""

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def write_file(
    path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = True,
    exists_message: Optional[str] = None,
) -> Path:
    """Writes ``path`` through ``write(tmp_path)`` (which creates the content at the temporary
    path it is given), atomically; creates the parent folders.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists (``exists_message``, or a
            message naming the path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no clobbering, no race
            except FileExistsError:
                raise FileExistsError(exists_message or f"{path} exists and is not replaced") from None
            except OSError:  # a filesystem without hard links
                with open(path, "xb") as f:
                    f.write(tmp.read_bytes())
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
