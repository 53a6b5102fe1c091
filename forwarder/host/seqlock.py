"""A sequence counter and its writer's lock: one writer at a time per guarded region, for real,
and readers that never wait long, not even on a writer that died in the middle of a write.

- **The writer** takes the region's lock, an fcntl record lock on one byte of the table's file:
  held per process, released by the kernel when the process dies, and never waited for (a
  writer that finds it taken raises `Busy` and writes at its next turn). It makes the counter
  odd, writes, and makes it even. A writer that finds the counter odd under the lock knows that
  the last writer died mid-write (gunicorn kills a worker that misses its heartbeat, the OOM
  killer kills anything): `repairing` tells it to write the whole region anew.
- **A reader** reads while the counter is even and has not moved across the read. One that finds
  it odd, or moving, for READ_PATIENCE_SECONDS gives up (`None`) and keeps what it read last;
  a dead writer's region stays unreadable only until the next writer repairs it.

Greenlets of one worker never interleave a write (it does no I/O), so the lock is only between
processes.
"""

import contextlib
import fcntl
import time

# How long a reader retries a region being written before it keeps what it read last. Writes
# take microseconds; only a writer that died leaves a region unreadable for longer.
READ_PATIENCE_SECONDS = 0.02


class Busy(Exception):
    """Another process is writing the region."""


class SeqLock:
    """The sequence counter at word `seq_word` of `words`, and the lock on byte `lock_byte` of
    the file `fd`."""

    __slots__ = ("_words", "_seq", "_fd", "_byte")

    def __init__(self, words, seq_word: int, fd: int, lock_byte: int):
        self._words = words
        self._seq = seq_word
        self._fd = fd
        self._byte = lock_byte

    @property
    def seq(self) -> int:
        return self._words[self._seq]

    def read(self, read):
        """What `read()` returns, read while no write was under way; None when none could be
        within READ_PATIENCE_SECONDS. A torn read may raise inside `read`: it is read again."""
        words, at = self._words, self._seq
        deadline = None
        while True:
            seq = words[at]
            if seq % 2 == 0:
                try:
                    value = read()
                except Exception:
                    if words[at] == seq:
                        raise  # nothing moved under it: a real error
                else:
                    if words[at] == seq:
                        return value
            now = time.monotonic()
            if deadline is None:
                deadline = now + READ_PATIENCE_SECONDS
            elif now >= deadline:
                return None
            time.sleep(0)  # under gevent, the worker's other greenlets run meanwhile

    @contextlib.contextmanager
    def write(self):
        """Hold the region for a write; yields whether it must be repaired (written whole, its
        last writer having died mid-write). `Busy` when another process holds it."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._byte)
        except OSError:
            raise Busy() from None
        words, at = self._words, self._seq
        try:
            repairing = words[at] % 2 == 1
            if not repairing:
                words[at] += 1
            yield repairing
            words[at] += 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._byte)

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the lock alone (no counter: the region's words are each written whole). `Busy`
        when another process holds it."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._byte)
        except OSError:
            raise Busy() from None
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._byte)
