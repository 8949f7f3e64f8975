"""A features store written by a process of its own.

h5py holds Python's GIL, and its own lock, through every HDF5 call: in one process the features store's chunk
writes and commits and the faces store's reads take turns, whatever the cores (issue 17: the stage's main thread
was the limit of the host path, at a third of what the machine allows). ``WriterProcess`` moves the writes into
a child process:

- the parent keeps the store's writer lock and lets go of the file (``ClipStore.detach``); the child opens it
  (``take_lock=False``), so there is still one writer, and no other process can become one;
- the maps travel through a ring of buffers in shared memory (a memfd both processes map): the parent's network
  writes each batch's maps into a buffer, the child writes them from there, with no copy and no pickling of maps;
- per batch the parent sends the store operations (``cache.features_store.apply_writes``: begin a clip, write
  rows of the buffer, commit clips) and the child answers when it has applied them, which frees the buffer;
- a clip is still committed whole with its mark last, by the one writer. A kill of the parent ends the child
  (its socket closes) and a kill of either loses at most the clips in flight; a full disk in the child abandons
  the file as the last commit left it and comes back as StoreFull.

The child is a plain ``python -m emotion_attention.cache.writer_process`` that inherits the socket and the ring's
descriptor: multiprocessing's spawn would run the parent's ``__main__`` again in it (a user's script without a
``__main__`` guard would start a second run), and a fork would copy a process that holds torch's threads.
"""
from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Optional

import numpy as np

from emotion_attention.cache import errors
from emotion_attention.cache.errors import StoreError
from emotion_attention.cache.features_store import FeaturesStore, apply_writes

AHEAD = 1  # batches the child may still be writing when the parent sends the next: one written, one on its way


def available() -> bool:
    """True where the ring can be shared (Linux's memfd); elsewhere the stage writes in its own process."""
    return hasattr(os, "memfd_create")


class WriterProcess:
    """A child process that writes a features store from a ring of shared buffers.

    Arguments:
        store: the open features store (``"a"``); it is detached here (the parent keeps its writer lock).
        count: buffers in the ring; rows, row_bytes: the shape of each (uint8 (rows, row_bytes)).

    ``buffers[i]`` is buffer i in this process; ``committed`` the ids of the clips the child has committed.
    ``send(i, n, ops, remaining)`` queues a batch (its maps in the first n rows of buffer i, or i None for a batch
    without faces) and returns the buffers written since, free again; ``finish()`` waits for the rest and closes
    the store. Errors of the child come back as the store's exceptions (StoreFull, StoreDamaged, ...) from the
    call that receives them.
    """

    def __init__(self, store: FeaturesStore, count: int, rows: int, row_bytes: int):
        nbytes = count * rows * row_bytes
        self.path, self.in_flight, self.seconds, self.committed = store.path, 0, {}, []
        fd = os.memfd_create("emotion-extract-maps")
        ours, theirs = socket.socketpair()
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
            self.buffers = np.frombuffer(self._map, np.uint8).reshape(count, rows, row_bytes)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the parent's imports
            opening = (str(store.path), store.provenance, store.shard, self.buffers.shape)
            store.detach()
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), str(fd)],
                                         pass_fds=(theirs.fileno(), fd), env=env)
        finally:
            os.close(fd)  # the child has its own descriptors; the mapping outlives this one
            theirs.close()
        self._conn = Connection(ours.detach())
        self._tell(opening)
        self._receive()  # ("ready",): the child has the file open

    def send(self, index: Optional[int], n: int, ops: list, remaining: int) -> list[int]:
        """Queue one batch's operations; returns the indices of the buffers written since (free again)."""
        self._tell(("batch", index, n, ops, remaining))
        self.in_flight += 1
        freed = []
        while self.in_flight > AHEAD or (self.in_flight and self._conn.poll()):
            freed += self._receive()
        return freed

    def finish(self) -> list[int]:
        """Wait for every batch sent, close the store in the child and end it; returns the buffers freed."""
        freed = []
        while self.in_flight:
            freed += self._receive()
        self._tell(("close",))
        self._receive()
        self.proc.wait()
        self._conn.close()
        return freed

    def stop(self) -> None:
        """End the child without waiting for its work (the run failed): the clips it had not committed are
        lost, as with a kill; what it committed is kept."""
        self._conn.close()  # the child sees the socket end, closes the store and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _ended(self) -> StoreError:
        self.proc.wait()
        return StoreError(f"{self.path}: the store's writer process ended (exit code {self.proc.returncode}) before"
                          " it answered; the clips committed so far are kept: rerun the same command to finish")

    def _tell(self, msg: tuple) -> None:
        """Send ``msg``; when the child has ended (its error is on its way), raise what it says."""
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            while True:  # answers still in the socket come first; its error or its end raises
                self._receive()

    def _receive(self) -> list[int]:
        while not self._conn.poll(0.5):
            if self.proc.poll() is not None:
                raise self._ended()
        try:
            msg = self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._ended() from None
        if msg[0] == "error":
            _, name, text = msg
            kind = getattr(errors, name, None)
            self.proc.wait()
            if isinstance(kind, type) and issubclass(kind, StoreError):
                raise kind(text)
            raise StoreError(f"{self.path}: the store's writer process failed: {name}: {text}")
        if msg[0] == "done":
            _, index, committed, seconds = msg
            self.in_flight -= 1
            self.committed += committed
            for k, v in seconds.items():
                self.seconds[k] = self.seconds.get(k, 0.0) + v
            return [] if index is None else [index]
        return []


def serve(conn: Connection, fd: int) -> None:
    """The child: open the store (the parent holds its lock), apply each batch's operations, answer. The store's
    own exit does the rest: after StoreFull it abandons the file as the last commit left it, after another error
    it closes it without hiding that error."""
    path, provenance, shard, shape = conn.recv()
    ring = mmap.mmap(fd, int(np.prod(shape)))
    os.close(fd)
    buffers = np.frombuffer(ring, np.uint8).reshape(shape)
    open_clips: dict = {}
    try:
        with FeaturesStore(path, "a", provenance=provenance, shard=shard, take_lock=False) as store:
            try:
                conn.send(("ready",))
                serve_batches(conn, store, buffers, open_clips)
            finally:
                open_clips.clear()  # their h5py objects go before the file closes
        _send(conn, ("closed",))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        _send(conn, ("error", type(exc).__name__, str(exc)))


def serve_batches(conn: Connection, store: FeaturesStore, buffers: np.ndarray, open_clips: dict) -> None:
    """Apply batches until the parent says "close", or is gone (the clips in flight then stay uncommitted)."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, ConnectionResetError):
            return
        if msg[0] == "close":
            return
        _, index, n, ops, remaining = msg
        seconds: dict = {}

        def timed(phase: str, s: float) -> None:
            seconds[phase] = seconds.get(phase, 0.0) + s
        rows = None if index is None else buffers[index, :n]
        committed = apply_writes(store, open_clips, ops, rows, remaining, timed)
        conn.send(("done", index, committed, seconds))


def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except OSError:
        pass  # the parent is gone


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
