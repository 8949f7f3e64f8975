"""The project's one user-error contract and its clip-id scheme (no HDF5 here; every layer imports it).

``UserError`` is anything a user can cause and fix: a bad path, a bad setting, a damaged or foreign store,
bad weights, an undecodable video. The CLI prints it as one line (plus indented detail lines when the
message has them) and exits non-zero, with no traceback. ``ValueError`` and the rest stay bugs, and keep
their tracebacks.
"""
from __future__ import annotations

from urllib.parse import quote, unquote


class UserError(Exception):
    """Something the user can fix; the message names the file or setting and what to do."""
    exit_code = 1


class ConfigError(UserError):
    """A setting or argument that cannot work; raised before any work is done."""


class StoreError(UserError):
    """A store cannot be used as asked; the message names the file and what to do."""


class StoreMismatch(StoreError):
    """A store was built with other settings than the ones this run asks for."""


class StoreDamaged(StoreError):
    """A store file is damaged (cannot be opened, a checksum failed, non-finite values)."""


class StoreLocked(StoreError):
    """Another process (named by host and pid) is writing this store."""


class StoreFull(StoreError):
    """The disk filled while writing; committed clips are kept and a rerun finishes once there is space."""


# -- clip ids ---------------------------------------------------------------------------------------
# A clip id is "split/label/file" (or any "/"-joined path a layout gives). Two schemes map it injectively:
#  * HDF5 group names: "%" -> "%25", "|" -> "%7C", then "/" -> "|"; readable, and reversible by key_to_id.
#  * file names (figures, per-frame CSVs): percent-encoding of everything but [A-Za-z0-9._-], so that
#    "a b.avi", "a_b.avi" and "x/v.avi", "y/v.avi" never share a file; reversible by filename_to_id.

def clip_key(clip_id: str) -> str:
    """HDF5 group name of a clip id; injective.

    >>> clip_key("Val/Happy/Sad|z.avi"), clip_key("Val|Happy/Sad/z.avi")
    ('Val|Happy|Sad%7Cz.avi', 'Val%7CHappy|Sad|z.avi')
    """
    if not clip_id or clip_id in (".", ".."):
        raise ValueError(f"clip id {clip_id!r} cannot name a group")
    return clip_id.replace("%", "%25").replace("|", "%7C").replace("/", "|")


def key_to_id(key: str) -> str:
    """Inverse of ``clip_key``.

    >>> key_to_id(clip_key("a|b/c%7C.avi"))
    'a|b/c%7C.avi'
    """
    return key.replace("|", "/").replace("%7C", "|").replace("%25", "%")


def clip_filename(clip_id: str, suffix: str = "") -> str:
    """A file name for a clip's output; injective over clip ids and safe on every file system.

    >>> clip_filename("Val/Sad/a b.avi", ".png"), clip_filename("Val/Sad/a_b.avi", ".png")
    ('Val%2FSad%2Fa%20b.avi.png', 'Val%2FSad%2Fa_b.avi.png')
    """
    name = quote(clip_id, safe="")
    if name.startswith("."):  # no hidden files, no "." or ".."
        name = "%2E" + name[1:]
    return name + suffix


def filename_to_id(name: str, suffix: str = "") -> str:
    """Inverse of ``clip_filename``."""
    return unquote(name[:-len(suffix)] if suffix else name)
