"""Refuse trust files and key folders that another local user could change.

A trust store, an app trust file or a key folder that group or others may write (or that another
non-root user owns, and so may chmod at will) lets any local account pin its own key, plant its
own app or swap a file in place. :func:`refuse_shared_writable` raises a one-line error naming the
path, its mode and the ``chmod`` to run. Read permission is not checked here (public files);
private key files have their own, stricter check (``identity.check_private_file_mode``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def refuse_shared_writable(path: str | os.PathLike, what: str, error: type[Exception]) -> None:
    """Raise ``error`` if ``path`` (a file or folder; following links) is writable by group/others
    or owned by another non-root user. A missing path is not checked (the caller decides)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{p}: cannot stat {what} ({exc.strerror or exc})") from exc
    fix = f"chmod {'700' if stat.S_ISDIR(st.st_mode) else '600'} {p}"
    if st.st_uid not in (os.getuid(), 0):
        raise error(f"{p}: {what} is owned by uid {st.st_uid}, not by this user or root; "
                    f"run: chown {os.getuid()} {p} && {fix}")
    if st.st_mode & 0o022:
        raise error(f"{p}: {what} is writable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); run: {fix}")


def refuse_shared_writable_file_and_folder(path: str | os.PathLike, what: str, error: type[Exception]) -> None:
    """:func:`refuse_shared_writable` for a file and the folder holding it (a writable folder lets
    anyone rename another file over it). The folder is checked first."""
    p = Path(path)
    refuse_shared_writable(p.parent, f"folder of {p.name}", error)
    refuse_shared_writable(p, what, error)
