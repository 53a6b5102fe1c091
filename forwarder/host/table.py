"""What the workers of one instance share: one table in a shared memory file that gunicorn's master
makes before it forks, so that every worker, later replacements included, maps the same memory.
Its layout is `layout.py`; every region has one writer at a time, for real:

- **Slots**, one per worker, handed out by the master (`claim_slot` in `pre_fork`, `release_slot`
  in `child_exit`, which also clears what a dead worker had in flight). A worker writes only its
  own row: state, heartbeat, open connections, its queue's length and head, its changes.
- **Count planes** (`BackendCount`, `KeyCount`): one cell per worker per column; a worker writes
  only its own cells and readers sum them (requests in flight and their weight, answers, errors,
  tokens, a key's requests and tokens per minute, a backend's failures in a row, the writes to a
  column). No increment of one worker can be lost by another's.
- **The backend list and the API keys**, written by the list leader (the lowest ready slot)
  under their own sequence counter and lock (`seqlock.py`): a former leader cannot write, and a
  writer that dies mid-write leaves a region that readers give up on (they keep their last
  reading) until the next writer repairs it.
- **Backend columns**: the last poll (its poll owner writes it), the last time a request could not
  connect (any worker: last write wins), ejection state (under the ejection lock), the model list
  (the poll owner, under the column's counter and lock). Each cell is one aligned 8-byte word,
  written and read whole.

What is approximate, and why it is enough: a backend's poll figures are separate words, so a
reader may see `running` of one poll beside `waiting` of the next; a key's minute is a sliding
estimate (this minute's count plus the last one's share of the minute not yet passed); a moved
session's place is shared by every session whose hash falls there (the newest wins), and two
workers moving one session at once keep the last move; the last failure's reason is the last
write's.

Every change a worker's view depends on writes a fresh stamp (unique to the writer and the
moment, never an increment another worker's could undo) into the column's version and the
table's changes: a worker re-reads the table only when that moved. Greenlets switch only on
I/O, so a worker's own cells need no lock. Floats are seconds of `time.time()` (the brake's,
`time.monotonic()`); NaN stands for "unknown".
"""

import math
import mmap
import os
import time

from .layout import (COLUMN, KEY, KEY_DIGEST_BYTES, KEY_NAME_BYTES, MAGIC, MAX_BACKENDS,
                     MAX_KEYS, MAX_SLOTS, MODELS_BYTES, MOVED_SESSIONS, REGIONS, SIZE_WORDS,
                     SOURCE_BYTES, URL_BYTES, WORD, BackendCount, Column, ColumnState, Header,
                     KeyColumn, KeyCount, Slot, SlotState, FINGERPRINT)
from .seqlock import Busy, SeqLock

UNKNOWN = math.nan

# The failure reasons a column can hold, by code (0: none).
REASONS = (None, "connection refused", "timeout", "connection reset", "name not resolved",
           "connection closed", "connection failed", "closed without an answer")

# The lock bytes of the table's file: the list's, the keys', the ejections', then one per
# column's model list.
_LIST_LOCK, _KEYS_LOCK, _EJECTION_LOCK, _MODELS_LOCKS = range(4)

_HEADER = REGIONS["header"].at
_LIST_AT = REGIONS["list"].at
_KEY_LIST_AT = REGIONS["key_list"].at
_SLOTS_AT = REGIONS["slots"].at
_SLOT_WORDS = REGIONS["slots"].record_words
_BACKEND_COUNTS_AT = REGIONS["backend_counts"].at
_KEY_COUNTS_AT = REGIONS["key_counts"].at
_COLUMNS_AT = REGIONS["columns"].at
_COLUMN_WORDS = REGIONS["columns"].record_words
_KEYS_AT = REGIONS["keys"].at
_KEY_WORDS = REGIONS["keys"].record_words
_MOVED_AT = REGIONS["moved_sessions"].at
_URL_AT = COLUMN.text_at("url")
_SOURCE_AT = COLUMN.text_at("source")
_MODELS_AT = COLUMN.text_at("models")
_DIGEST_AT = KEY.text_at("digest")
_NAME_AT = KEY.text_at("name")
# A column's floats that start unknown.
_FIGURES = (Column.RUNNING, Column.WAITING, Column.KV_CACHE)
# What a worker zeroes of its own cells when a column it counted for goes to a new backend or
# key (never its requests in flight: a column is reused only once none are left).
_BACKEND_COUNTS_RESET = (BackendCount.REQUESTS, BackendCount.ERRORS, BackendCount.TOKENS,
                         BackendCount.FAILURES, BackendCount.FAILURES_EPOCH)
_KEY_COUNTS_RESET = (KeyCount.MINUTE, KeyCount.REQUESTS_NOW, KeyCount.REQUESTS_BEFORE,
                     KeyCount.TOKENS_NOW, KeyCount.TOKENS_BEFORE, KeyCount.REQUESTS,
                     KeyCount.ERRORS, KeyCount.TOKENS)


_STAMP_MASK = (1 << 63) - 1


class TableMismatch(Exception):
    """The mapped table was not made with this layout (a worker of other code than its
    master's)."""


class NotLeader(Exception):
    """Only the list leader writes the list and the keys."""


def _backend_cell(count: int, column: int) -> int:
    return _BACKEND_COUNTS_AT + (count * MAX_BACKENDS + column) * MAX_SLOTS


def _key_cell(count: int, column: int) -> int:
    return _KEY_COUNTS_AT + (count * MAX_KEYS + column) * MAX_SLOTS


def _column_base(column: int) -> int:
    return _COLUMNS_AT + column * _COLUMN_WORDS


def _key_base(column: int) -> int:
    return _KEYS_AT + column * _KEY_WORDS


def _slot_base(slot: int) -> int:
    return _SLOTS_AT + slot * _SLOT_WORDS


def reason_code(reason: "str | None") -> int:
    """The code of a failure reason (`upstream.failure_reason`'s words)."""
    try:
        return REASONS.index(reason)
    except ValueError:
        return REASONS.index("connection failed")


class HostTable:
    """The shared table, seen through typed views. `slot` is this process's row, or None in the
    master."""

    def __init__(self, fd: int, memory: mmap.mmap):
        self.fd = fd
        self._memory = memory
        self.bytes = memoryview(memory)
        self.words = self.bytes.cast("q")
        self.floats = self.bytes.cast("d")
        self.slot = None
        # Rows in use are the first `_slots_in_use` ones: sums go no further.
        self._slots_in_use = MAX_SLOTS
        self._list_lock = SeqLock(self.words, _HEADER + Header.LIST_SEQ, fd, _LIST_LOCK)
        self._keys_lock = SeqLock(self.words, _HEADER + Header.KEYS_SEQ, fd, _KEYS_LOCK)
        self._ejection_lock = SeqLock(self.words, _HEADER + Header.LIST_SEQ, fd,
                                      _EJECTION_LOCK)
        self._models_locks = {}
        # A failure run's epoch is made of this worker's slot and a number of its own.
        self._epochs = 0
        self._last_stamp = 0

    @classmethod
    def create(cls) -> "HostTable":
        """A new, empty table in a memory file of its own (in gunicorn's master, before the
        first fork)."""
        fd = os.memfd_create("vllm-forwarder-host-table", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE_WORDS * WORD)
        table = cls(fd, mmap.mmap(fd, SIZE_WORDS * WORD))
        table.words[_HEADER + Header.MAGIC] = MAGIC
        table.words[_HEADER + Header.FINGERPRINT] = FINGERPRINT
        return table

    @classmethod
    def private(cls) -> "HostTable":
        """A table of this process alone (a unit test, a plain WSGI server), slot 0 its own."""
        table = cls.create()
        table.attach(table.claim_slot(), os.getpid())
        table.set_own(Slot.STATE, SlotState.READY)
        return table

    def check(self) -> None:
        """TableMismatch unless the table was made with this layout."""
        header = self.words[_HEADER:_HEADER + len(Header)]
        if header[Header.MAGIC] != MAGIC or header[Header.FINGERPRINT] != FINGERPRINT:
            raise TableMismatch("the host table was made by other code (restart, do not "
                                "reload, after an upgrade)")

    # --- slots (the master hands them out) ---------------------------------------------------

    def claim_slot(self) -> int:
        """The lowest free slot, marked as starting; ValueError when none is free."""
        words = self.words
        for slot in range(MAX_SLOTS):
            base = _slot_base(slot)
            if words[base + Slot.STATE] == SlotState.FREE:
                self._clear_slot(slot)
                words[base + Slot.STATE] = SlotState.STARTING
                self.floats[base + Slot.STARTED] = time.time()
                self.floats[base + Slot.HEARTBEAT] = time.time()
                return slot
        raise ValueError(f"all {MAX_SLOTS} worker slots are taken")

    def release_slot(self, slot: int) -> None:
        """The worker of `slot` is gone: what it had in flight, open or queued is over."""
        self._clear_slot(slot)
        self.words[_slot_base(slot) + Slot.STATE] = SlotState.FREE
        self.changed()

    def _clear_slot(self, slot: int) -> None:
        base = _slot_base(slot)
        for word in Slot:
            if word != Slot.STATE:
                self.words[base + word] = 0
        for count in (BackendCount.IN_FLIGHT, BackendCount.WEIGHT):
            for column in range(MAX_BACKENDS):
                self.words[_backend_cell(count, column) + slot] = 0
        for column in range(MAX_KEYS):
            self.words[_key_cell(KeyCount.IN_FLIGHT, column) + slot] = 0

    def attach(self, slot: int, pid: int) -> None:
        """This process is the worker of `slot`."""
        self.check()
        self.slot = slot
        self.words[_slot_base(slot) + Slot.PID] = pid
        self.refresh_slots_in_use()

    def refresh_slots_in_use(self) -> None:
        words = self.words
        highest = 0
        for slot in range(MAX_SLOTS):
            if words[_slot_base(slot) + Slot.STATE] != SlotState.FREE:
                highest = slot + 1
        self._slots_in_use = max(highest, (self.slot or 0) + 1)

    def slot_word(self, slot: int, word: int) -> int:
        return self.words[_slot_base(slot) + word]

    def slot_float(self, slot: int, word: int) -> float:
        return self.floats[_slot_base(slot) + word]

    def set_own(self, word: int, value: int) -> None:
        self.words[_slot_base(self.slot) + word] = value

    def set_own_float(self, word: int, value: float) -> None:
        self.floats[_slot_base(self.slot) + word] = value

    def add_own(self, word: int, delta: int) -> None:
        self.words[_slot_base(self.slot) + word] += delta

    def live_slots(self) -> "list[int]":
        """The slots of running workers, in order."""
        words = self.words
        return [slot for slot in range(self._slots_in_use)
                if words[_slot_base(slot) + Slot.STATE] != SlotState.FREE]

    def slot_sum(self, word: int) -> int:
        """`word` summed over every slot in use (open connections, queued requests)."""
        words = self.words
        return sum(words[_slot_base(slot) + word] for slot in range(self._slots_in_use))

    def serving_slots(self) -> "list[int]":
        """The slots that poll and lead: the live workers not draining (the draining ones,
        when no other is left)."""
        live = self.live_slots()
        serving = [slot for slot in live
                   if self.slot_word(slot, Slot.STATE) in (SlotState.STARTING, SlotState.READY)]
        return serving or [slot for slot in live
                           if self.slot_word(slot, Slot.STATE) == SlotState.DRAINING]

    def leader(self) -> "int | None":
        """The list leader: the lowest ready slot (the lowest starting one, when none is ready
        yet), so that a worker restarted into a lower slot does not take over from a leader at
        work."""
        serving = self.serving_slots()
        ready = [slot for slot in serving if self.slot_word(slot, Slot.STATE) == SlotState.READY]
        return (ready or serving or [None])[0]

    # --- changes ---------------------------------------------------------------------------------

    def changed(self, column: "int | None" = None) -> None:
        """Tell every worker that something its view depends on was written (in `column`)."""
        now = max(time.monotonic_ns(), self._last_stamp + 1)
        self._last_stamp = now
        stamp = (now << 9 | (MAX_SLOTS if self.slot is None else self.slot)) & _STAMP_MASK
        if column is not None:
            self.words[_column_base(column) + Column.VERSION] = stamp
        self.words[_HEADER + Header.CHANGES] = stamp

    @property
    def changes(self) -> int:
        return self.words[_HEADER + Header.CHANGES]

    def version(self, column: int) -> int:
        """The stamp of the last change to the backend column `column`."""
        return self.words[_column_base(column) + Column.VERSION]

    # --- counts, per backend column ------------------------------------------------------------

    def acquire(self, column: int, weight: int) -> None:
        slot = self.slot
        self.words[_backend_cell(BackendCount.IN_FLIGHT, column) + slot] += 1
        self.words[_backend_cell(BackendCount.WEIGHT, column) + slot] += weight

    def release(self, column: int, weight: int) -> None:
        slot = self.slot
        self.words[_backend_cell(BackendCount.IN_FLIGHT, column) + slot] -= 1
        self.words[_backend_cell(BackendCount.WEIGHT, column) + slot] -= weight

    def in_flight(self, column: int) -> int:
        """Requests every worker has in flight to the backend of `column`."""
        start = _backend_cell(BackendCount.IN_FLIGHT, column)
        return sum(self.words[start:start + self._slots_in_use])

    def in_flight_weight(self, column: int) -> int:
        start = _backend_cell(BackendCount.WEIGHT, column)
        return sum(self.words[start:start + self._slots_in_use])

    def add_backend(self, count: int, column: int, delta: int) -> None:
        """Add to this worker's cell of a backend count."""
        self.words[_backend_cell(count, column) + self.slot] += delta

    def backend_sum(self, count: int, column: int) -> int:
        start = _backend_cell(count, column)
        return sum(self.words[start:start + self._slots_in_use])

    def adopt_column(self, column: int) -> None:
        """This worker now counts for the backend the column holds: its own counts of the
        column's last backend, if any, are zeroed."""
        generation = self.words[_column_base(column) + Column.GENERATION]
        seen = _backend_cell(BackendCount.GENERATION_SEEN, column) + self.slot
        if self.words[seen] != generation:
            for count in _BACKEND_COUNTS_RESET:
                self.words[_backend_cell(count, column) + self.slot] = 0
            self.words[seen] = generation

    # --- a backend's failures in a row -----------------------------------------------------------

    def failure_run(self, column: int) -> int:
        """Failed requests in a row to the backend of `column`, all workers together."""
        epoch = self.words[_column_base(column) + Column.FAILURE_EPOCH]
        epochs = _backend_cell(BackendCount.FAILURES_EPOCH, column)
        counts = _backend_cell(BackendCount.FAILURES, column)
        words = self.words
        return sum(words[counts + slot] for slot in range(self._slots_in_use)
                   if words[epochs + slot] == epoch)

    def count_failure(self, column: int) -> int:
        """One more failed request to the backend of `column`; the run's length now."""
        epoch = self.words[_column_base(column) + Column.FAILURE_EPOCH]
        at_epoch = _backend_cell(BackendCount.FAILURES_EPOCH, column) + self.slot
        at_count = _backend_cell(BackendCount.FAILURES, column) + self.slot
        if self.words[at_epoch] != epoch:
            self.words[at_epoch] = epoch
            self.words[at_count] = 0
        self.words[at_count] += 1
        return self.failure_run(column)

    def end_failure_run(self, column: int) -> None:
        """A request to the backend of `column` succeeded (or it was ejected): a new run."""
        if self.failure_run(column):
            self._epochs += 1
            self.words[_column_base(column) + Column.FAILURE_EPOCH] = \
                (self._epochs << 8 | self.slot) & (1 << 62) - 1 or 1

    def ejecting(self):
        """The ejection lock: held while one worker decides and writes an ejection (`Busy` when
        another does)."""
        return self._ejection_lock.exclusive()

    # --- counts, per key column ------------------------------------------------------------------

    def add_key(self, count: int, column: int, delta: int) -> None:
        """Add to this worker's cell of a key count."""
        self.words[_key_cell(count, column) + self.slot] += delta

    def key_sum(self, count: int, column: int) -> int:
        start = _key_cell(count, column)
        return sum(self.words[start:start + self._slots_in_use])

    def adopt_key_column(self, column: int) -> None:
        """This worker now counts for the key the column holds (see `adopt_column`)."""
        generation = self.words[_key_base(column) + KeyColumn.GENERATION]
        seen = _key_cell(KeyCount.GENERATION_SEEN, column) + self.slot
        if self.words[seen] != generation:
            for count in _KEY_COUNTS_RESET:
                self.words[_key_cell(count, column) + self.slot] = 0
            self.words[seen] = generation

    def per_minute(self, now_count: int, column: int, now: float) -> float:
        """A key's requests (KeyCount.REQUESTS_NOW) or tokens (TOKENS_NOW) over the last 60 s,
        all workers together: this minute's, plus the last one's in the share of the minute not
        yet passed (the sliding-window estimate)."""
        minute = int(now // 60)
        into = now / 60 - minute
        minutes = _key_cell(KeyCount.MINUTE, column)
        current = _key_cell(now_count, column)
        before = _key_cell(now_count + 1, column)
        words = self.words
        this, last = 0, 0
        for slot in range(self._slots_in_use):
            at = words[minutes + slot]
            if at == minute:
                this += words[current + slot]
                last += words[before + slot]
            elif at == minute - 1:
                last += words[current + slot]
        return this + last * (1.0 - into)

    def count_per_minute(self, now_count: int, column: int, amount: int, now: float) -> None:
        """Add `amount` to this worker's count of this minute (REQUESTS_NOW, TOKENS_NOW)."""
        minute = int(now // 60)
        slot = self.slot
        minutes = _key_cell(KeyCount.MINUTE, column) + slot
        at = self.words[minutes]
        if at != minute:
            for count in (KeyCount.REQUESTS_NOW, KeyCount.TOKENS_NOW):
                current = _key_cell(count, column) + slot
                self.words[_key_cell(count + 1, column) + slot] = \
                    self.words[current] if at == minute - 1 else 0
                self.words[current] = 0
            self.words[minutes] = minute
        self.words[_key_cell(now_count, column) + slot] += amount

    # --- the backend list (the leader writes it) ---------------------------------------------

    @property
    def list_version(self) -> int:
        return self.words[_HEADER + Header.LIST_VERSION]

    def read_list(self) -> "list[tuple[int, str, str | None]] | None":
        """(column, base URL, `dns+` source or None) of every listed backend, in list order;
        None when the list could not be read (a write under way too long, or a dead writer's)."""
        return self._list_lock.read(self._listed)

    def _listed(self):
        words = self.words
        count = words[_HEADER + Header.LIST_COUNT]
        return [(column, self._text(_column_base(column), _URL_AT, Column.URL_LEN),
                 self._text(_column_base(column), _SOURCE_AT, Column.SOURCE_LEN) or None)
                for column in words[_LIST_AT:_LIST_AT + count]]

    def write_list(self, urls: "list[str]", sources: "dict[str, str]",
                   now: float, quarantine: float) -> "tuple[list[str], list[str]]":
        """Make the list exactly `urls` (at most MAX_BACKENDS; ValueError past it): a URL already
        listed keeps its column, a new one takes a column no worker still has requests on that
        was freed at least `quarantine` seconds ago. (added, removed). `NotLeader` unless this
        worker leads, `Busy` while another process writes."""
        if len(urls) > MAX_BACKENDS:
            raise ValueError(f"more than {MAX_BACKENDS} backends")
        with self._list_lock.exclusive():
            if self.slot != self.leader():
                raise NotLeader()
            repairing = self._list_lock.seq % 2 == 1
            if repairing:
                # The order may be half written: the columns themselves say which are listed.
                listed = [(column, self._text(_column_base(column), _URL_AT, Column.URL_LEN),
                           None) for column in range(MAX_BACKENDS)
                          if self.word(column, Column.STATE) == ColumnState.LISTED]
            else:
                listed = self._listed()
            current = {url: column for column, url, _ in listed}
            wanted = set(urls)
            removed = [url for url in current if url not in wanted]
            added = [url for url in urls if url not in current]
            if not repairing and self.list_version and not added and not removed and [
                    url for _, url, _ in listed] == urls and all(
                    (source or "") == (sources.get(url) or "") for _, url, source in listed):
                return [], []
            with self._list_lock.write():
                for url in removed:
                    base = _column_base(current[url])
                    self.words[base + Column.STATE] = ColumnState.REMOVED
                    self.floats[base + Column.REMOVED_AT] = now
                columns = []
                for url in urls:
                    column = current.get(url)
                    if column is None:
                        column = self._free_column(now, quarantine)
                        self._reset_column(column, url)
                    base = _column_base(column)
                    source = sources.get(url) or ""
                    if repairing or self._text(base, _SOURCE_AT, Column.SOURCE_LEN) != source:
                        self._write_text(base, _SOURCE_AT, Column.SOURCE_LEN, source,
                                         SOURCE_BYTES)
                    columns.append(column)
                self._write_order(_LIST_AT, Header.LIST_COUNT, Header.LIST_VERSION, columns)
        self.changed()
        return [] if repairing else added, [] if repairing else removed

    def _write_order(self, at: int, count_word: int, version_word: int, columns) -> None:
        """A list's columns, in order, and a new version of it (under its sequence counter)."""
        words = self.words
        for index, column in enumerate(columns):
            words[at + index] = column
        words[_HEADER + count_word] = len(columns)
        words[_HEADER + version_word] += 1

    def _free_column(self, now: float, quarantine: float) -> int:
        words, floats = self.words, self.floats
        for column in range(MAX_BACKENDS):
            base = _column_base(column)
            state = words[base + Column.STATE]
            if state == ColumnState.UNUSED or (
                    state == ColumnState.REMOVED and now - floats[base + Column.REMOVED_AT]
                    >= quarantine and self.in_flight(column) == 0):
                return column
        raise ValueError(f"more than {MAX_BACKENDS} backends")

    def _reset_column(self, column: int, url: str) -> None:
        base = _column_base(column)
        generation = self.words[base + Column.GENERATION] + 1
        for word in Column:
            if word != Column.VERSION:
                self.words[base + word] = 0
        self.words[base + Column.GENERATION] = generation
        for word in _FIGURES:
            self.floats[base + word] = UNKNOWN
        self._write_text(base, _URL_AT, Column.URL_LEN, url, URL_BYTES)
        self.words[base + Column.STATE] = ColumnState.LISTED

    def _text(self, base: int, at: int, length_word: int) -> str:
        start = base * WORD + at
        return bytes(self.bytes[start:start + self.words[base + length_word]]).decode()

    def _write_text(self, base: int, at: int, length_word: int, text: str, limit: int) -> None:
        data = text.encode()[:limit]
        start = base * WORD + at
        self.bytes[start:start + len(data)] = data
        self.words[base + length_word] = len(data)

    # --- the API keys (the leader writes them) -------------------------------------------------

    @property
    def keys_version(self) -> int:
        return self.words[_HEADER + Header.KEYS_VERSION]

    def read_keys(self) -> "list[tuple[int, str, bytes, int, int, int]] | None":
        """(column, name, SHA-256 digest, max_concurrent, requests_per_minute,
        tokens_per_minute) of every key, in order (a limit of 0 is none); None when they could
        not be read."""
        return self._keys_lock.read(self._keys)

    def _keys(self):
        words = self.words
        count = words[_HEADER + Header.KEYS_COUNT]
        return [self._key(column) for column in words[_KEY_LIST_AT:_KEY_LIST_AT + count]]

    def _key(self, column: int):
        base = _key_base(column)
        at = base * WORD
        name = self._text(base, _NAME_AT, KeyColumn.NAME_LEN)
        digest = bytes(self.bytes[at + _DIGEST_AT:at + _DIGEST_AT + KEY_DIGEST_BYTES])
        return (column, name, digest, self.words[base + KeyColumn.MAX_CONCURRENT],
                self.words[base + KeyColumn.REQUESTS_PER_MINUTE],
                self.words[base + KeyColumn.TOKENS_PER_MINUTE])

    def write_keys(self, keys: "list[tuple[str, bytes, int, int, int]]", now: float,
                   quarantine: float) -> bool:
        """Make the keys exactly `keys`, each (name, digest, max_concurrent,
        requests_per_minute, tokens_per_minute): a key already known (by its digest) keeps its
        column, and with it its counts; a new one takes a column no worker has requests on,
        freed at least `quarantine` seconds ago. True if anything changed; ValueError past
        MAX_KEYS; `NotLeader`, `Busy` as for the list."""
        if len(keys) > MAX_KEYS:
            raise ValueError(f"more than {MAX_KEYS} keys")
        with self._keys_lock.exclusive():
            if self.slot != self.leader():
                raise NotLeader()
            repairing = self._keys_lock.seq % 2 == 1
            if repairing:
                listed = [self._key(column) for column in range(MAX_KEYS)
                          if self.words[_key_base(column) + KeyColumn.STATE]
                          == ColumnState.LISTED]
            else:
                listed = self._keys()
            if not repairing and self.keys_version and [entry[1:] for entry in listed] == \
                    [(name, digest, *limits) for name, digest, *limits in keys]:
                return False
            current = {digest: column for column, _, digest, *_ in listed}
            wanted = {digest for _, digest, *_ in keys}
            with self._keys_lock.write():
                for digest, column in current.items():
                    if digest not in wanted:
                        base = _key_base(column)
                        self.words[base + KeyColumn.STATE] = ColumnState.REMOVED
                        self.floats[base + KeyColumn.REMOVED_AT] = now
                columns = []
                for name, digest, *limits in keys:
                    column = current.get(digest)
                    if column is None:
                        column = current[digest] = self._free_key_column(now, quarantine)
                    self._write_key(column, name, digest, limits)
                    columns.append(column)
                self._write_order(_KEY_LIST_AT, Header.KEYS_COUNT, Header.KEYS_VERSION, columns)
        self.changed()
        return True

    def _free_key_column(self, now: float, quarantine: float) -> int:
        for column in range(MAX_KEYS):
            base = _key_base(column)
            state = self.words[base + KeyColumn.STATE]
            if state == ColumnState.UNUSED or (
                    state == ColumnState.REMOVED
                    and now - self.floats[base + KeyColumn.REMOVED_AT] >= quarantine
                    and self.key_sum(KeyCount.IN_FLIGHT, column) == 0):
                self.words[base + KeyColumn.GENERATION] += 1
                return column
        raise ValueError(f"more than {MAX_KEYS} keys")

    def _write_key(self, column: int, name: str, digest: bytes, limits) -> None:
        base = _key_base(column)
        at = base * WORD
        self._write_text(base, _NAME_AT, KeyColumn.NAME_LEN, name, KEY_NAME_BYTES)
        self.bytes[at + _DIGEST_AT:at + _DIGEST_AT + KEY_DIGEST_BYTES] = digest
        (self.words[base + KeyColumn.MAX_CONCURRENT],
         self.words[base + KeyColumn.REQUESTS_PER_MINUTE],
         self.words[base + KeyColumn.TOKENS_PER_MINUTE]) = limits
        self.words[base + KeyColumn.STATE] = ColumnState.LISTED

    # --- backend columns -------------------------------------------------------------------------

    def word(self, column: int, word: int) -> int:
        return self.words[_column_base(column) + word]

    def float(self, column: int, word: int) -> float:
        return self.floats[_column_base(column) + word]

    def set_word(self, column: int, word: int, value: int) -> None:
        self.words[_column_base(column) + word] = value

    def set_float(self, column: int, word: int, value: float) -> None:
        self.floats[_column_base(column) + word] = value

    def _models_lock(self, column: int) -> SeqLock:
        lock = self._models_locks.get(column)
        if lock is None:
            lock = self._models_locks[column] = SeqLock(
                self.words, _column_base(column) + Column.MODELS_SEQ, self.fd,
                _MODELS_LOCKS + column)
        return lock

    def write_models(self, column: int, body: "bytes | None", now: float) -> bool:
        """Store the backend's `/v1/models` answer (None: unreadable); True if it changed. The
        writer then calls `changed(column)`. `Busy` while another process writes it."""
        base = _column_base(column)
        lock = self._models_lock(column)
        data = b"" if body is None else body[:MODELS_BYTES]
        length = -1 if body is None or len(body) > MODELS_BYTES else len(data)
        with lock.exclusive():
            self.floats[base + Column.MODELS_READ_AT] = now
            repairing = lock.seq % 2 == 1
            if not repairing and length == self.words[base + Column.MODELS_LEN] and (
                    length <= 0 or self._models(column) == data):
                return False
            with lock.write():
                start = base * WORD + _MODELS_AT
                self.bytes[start:start + len(data)] = data
                self.words[base + Column.MODELS_LEN] = length
        return True

    def read_models(self, column: int) -> "tuple[int, bytes | None] | None":
        """(the model list's sequence number, the stored `/v1/models` answer or None while
        unknown or unreadable); None when it could not be read."""
        lock = self._models_lock(column)
        return lock.read(lambda: (lock.seq, self._models(column)))

    def _models(self, column: int) -> "bytes | None":
        base = _column_base(column)
        length = self.words[base + Column.MODELS_LEN]
        start = base * WORD + _MODELS_AT
        return bytes(self.bytes[start:start + length]) if length > 0 else None

    def models_seq(self, column: int) -> int:
        return self.words[_column_base(column) + Column.MODELS_SEQ]

    # --- affinity's moved sessions --------------------------------------------------------------

    # A place holds the upper 47 bits of the session's 64-bit hash and its column + 1, in one
    # word, written and read whole: no worker ever sees half of another's write.

    def moved_to(self, session_hash: int) -> "int | None":
        """The column a session moved to, or None."""
        word = self.words[_MOVED_AT + session_hash % MOVED_SESSIONS]
        if word and word >> 16 == session_hash >> 17:
            return (word & 0xFFFF) - 1
        return None

    def move(self, session_hash: int, column: "int | None") -> None:
        """Remember where a session moved (None: it is back home)."""
        place = _MOVED_AT + session_hash % MOVED_SESSIONS
        tag = session_hash >> 17
        if column is not None:
            self.words[place] = (tag << 16) | (column + 1)
        elif self.words[place] >> 16 == tag:
            self.words[place] = 0

    # --- asking for polls ----------------------------------------------------------------------

    def want_polls(self, now: float) -> None:
        """A request waits for a backend: poll the unhealthy ones now."""
        self.floats[_HEADER + Header.POLL_WANTED] = now

    @property
    def polls_wanted_at(self) -> float:
        return self.floats[_HEADER + Header.POLL_WANTED]


_table = None


def shared() -> HostTable:
    """This process's table: made on first use, and inherited by the processes forked after."""
    global _table
    if _table is None:
        _table = HostTable.create()
    return _table


__all__ = ("Busy", "HostTable", "NotLeader", "REASONS", "TableMismatch", "UNKNOWN",
           "reason_code", "shared")
