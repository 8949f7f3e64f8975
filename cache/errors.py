"""The project's one user-error contract and its clip-id scheme (no HDF5 here; every layer imports it).

``UserError`` is anything a user can cause and fix: a bad path, a bad setting, a damaged or foreign store,
bad weights, an undecodable video. The CLI prints it as one line (plus indented detail lines when the
message has them) and exits non-zero, with no traceback. ``ValueError`` and the rest stay bugs, and keep
their tracebacks.
"""
from __future__ import annotations

import hashlib
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
#  * file names (figures, per-frame CSVs, part files): percent-encoding of everything but [A-Za-z0-9._~-], so
#    that "a b.avi", "a_b.avi" and "x/v.avi", "y/v.avi" never share a file; reversible by filename_to_id. A name
#    longer than FILENAME_BYTES is shortened: the readable start of the encoded id, cut at a whole character,
#    then "+" and HASH_CHARS hex digits of the id's sha256. "+" is never left unencoded, so a shortened name
#    never equals a plain one, and two shortened names differ whenever their ids do (up to a 64-bit hash).

FILENAME_BYTES = 200  # every file system allows 255 bytes a name; 55 are left for a writer's ".tmp"-like suffix
HASH_CHARS = 16       # 64 bits of sha256: a collision among a million clips has odds below 1e-7


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
    """A file name for a clip's output; injective over clip ids and at most FILENAME_BYTES bytes on every
    file system (ASCII only, so bytes = characters).

    >>> clip_filename("Val/Sad/a b.avi", ".png"), clip_filename("Val/Sad/a_b.avi", ".png")
    ('Val%2FSad%2Fa%20b.avi.png', 'Val%2FSad%2Fa_b.avi.png')
    >>> name = clip_filename("Val/Sad/" + "\u7b11" * 80 + ".mp4", ".png")
    >>> len(name), name[:21], name[-21:]
    (195, 'Val%2FSad%2F%E7%AC%91', '+b9c3c3aa138069e6.png')
    """
    name = _quoted(clip_id)
    if len(name) + len(suffix) <= FILENAME_BYTES:
        return name + suffix
    tail = "+" + hashlib.sha256(clip_id.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS] + suffix
    budget, prefix = FILENAME_BYTES - len(tail), ""
    for char in clip_id:  # whole characters only, so the readable part never ends in half an escape
        part = _quoted(char) if not prefix else quote(char, safe="")
        if len(prefix) + len(part) > budget:
            break
        prefix += part
    return prefix + tail


def _quoted(text: str) -> str:
    name = quote(text, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name  # no hidden files, no "." or ".."


def filename_to_id(name: str, suffix: str = "") -> str:
    """Inverse of ``clip_filename`` for a name that was not shortened; a shortened one (it holds "+") keeps
    only a hash of the rest of its id, so it is a ValueError here: look the id up in the output's index."""
    stem = name[:-len(suffix)] if suffix else name
    if "+" in stem:
        raise ValueError(f"{name}: a shortened file name; its clip id cannot be read back from it")
    return unquote(stem)
