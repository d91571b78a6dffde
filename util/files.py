"""Atomic file writes: a reader (or a restarted run) sees the old file or the new one, never half of one."""

import os


def fsync_dir(folder: str) -> None:
    """Make renames inside `folder` durable; not every platform or filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, write, previous: str | None = None) -> None:
    """Write a file through a temporary beside `path`, flushed to disk, then renamed over `path`.

    `write` is the text or bytes to write, or a function that writes to the open binary file. With
    `previous`, the file `path` held until now is kept under that name: it is hard-linked there before the
    rename, so at every moment `path` is a complete file (where hard links are not available it is renamed
    instead, and for an instant only `previous` exists). A crash or an error during the write leaves `path`
    and `previous` untouched and removes the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.isfile(path):
            keep = f"{previous}.tmp.{os.getpid()}"
            try:
                os.link(path, keep)
                os.replace(keep, previous)
            except OSError:
                if os.path.exists(keep):
                    os.remove(keep)
                os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def holds_text(path: str, text: str) -> bool:
    """Whether `path` is a file that holds exactly `text` (one that cannot be read as text does not)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False
