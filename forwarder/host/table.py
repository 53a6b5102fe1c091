"""What the workers of one instance share: one anonymous shared mapping that gunicorn's master makes
before it forks, so that every worker, later replacements included, sees the same memory.

Nothing in it is guarded by a lock, because every cell has one writer at a time:

- **Slots**, one per worker, handed out by the master (`claim_slot` in `pre_fork`, `release_slot`
  in `child_exit`, which also clears what a dead worker left). A worker writes only its own row:
  its state, heartbeat, open connections, its queue's length and head, and, per backend column,
  the requests it has in flight there and their weight. Host-wide figures are sums over slots.
- **The backend list**, written only by the list leader (the lowest ready slot): which column is
  which base URL, in list order, under a sequence counter (`list_seq`: odd while writing).
- **Backend columns**: the last poll (written by the backend's poll owner), the last time a
  request could not connect (any worker: last writer wins), ejection state, the model list
  (owner, under its own sequence counter). Each cell is one aligned 8-byte word, written and read
  whole.

A counter (`changes`) moves on every write a worker's view depends on, so a worker re-reads the
table only when something changed. Greenlets switch only on I/O, so a worker's own cells need no
lock either. Floats are seconds of `time.time()`; NaN stands for "unknown".
"""

import math
import mmap
import os
import time

# The most workers one instance runs at once, a reload's old and new ones together.
MAX_SLOTS = 256
# The most backends one list may name; entries past it are logged and left out.
MAX_BACKENDS = 1024
# The most API keys (FORWARDER_API_KEYS and API_KEYS_FILE together).
MAX_KEYS = 1024
KEY_NAME_BYTES = 64
URL_BYTES = 512
SOURCE_BYTES = 256
MODELS_BYTES = 65536

UNKNOWN = math.nan

# Slot states.
FREE, STARTING, READY, DRAINING = 0, 1, 2, 3
# Column states.
UNUSED, LISTED, REMOVED = 0, 1, 2

# The failure reasons a column can hold, by code (0: none).
REASONS = (None, "connection refused", "timeout", "connection reset", "name not resolved",
           "connection closed", "connection failed", "closed without an answer")

# Header words.
(_MAGIC, _LIST_SEQ, _LIST_VERSION, _LIST_COUNT, _CHANGES, _POLL_WANTED, _KEYS_SEQ, _KEYS_VERSION,
 _KEYS_COUNT) = range(9)
_HEADER_WORDS = 16
_MAGIC_VALUE = 0x766C6C6D66776431

# Slot row words.
(S_STATE, S_PID, S_STARTED, S_HEARTBEAT, S_CONNECTIONS, S_QUEUED, S_HEAD_PRIORITY, S_HEAD_TURN,
 S_HEAD_ARRIVAL, S_QUEUE_SINCE) = range(10)
_SLOT_WORDS = 16

# Column words.
(C_STATE, C_URL_LEN, C_SOURCE_LEN, C_REMOVED_AT, C_POLL_OK, C_POLLED_AT, C_POLL_REASON,
 C_POLL_STATUS, C_RUNNING, C_WAITING, C_KV_CACHE, C_IN_FLIGHT_AT_POLL, C_DOWN_AT, C_DOWN_REASON,
 C_FAILURES, C_LAST_FAILURE, C_LAST_FAILURE_STATUS, C_EJECTED_UNTIL, C_EJECT_SECONDS,
 C_EJECT_REASON, C_EJECT_STATUS, C_MODELS_SEQ, C_MODELS_LEN, C_MODELS_READ_AT, C_VERSION) = range(25)
_COLUMN_WORDS = 32 + (URL_BYTES + SOURCE_BYTES + MODELS_BYTES) // 8
_URL_AT = 32 * 8
_SOURCE_AT = _URL_AT + URL_BYTES
_MODELS_AT = _SOURCE_AT + SOURCE_BYTES

# Key column words.
K_STATE, K_NAME_LEN, K_MAX_CONCURRENT, K_REQUESTS_PER_MINUTE, K_TOKENS_PER_MINUTE = range(5)
_K_DIGEST = 8  # 4 words
_K_NAME = 12  # KEY_NAME_BYTES // 8 words
_KEY_WORDS = 24

# Per-slot counters, one plane of [column][slot] words each: a worker writes its own cells.
# Backend planes: requests in flight, their weight; requests answered, failed, tokens metered.
B_IN_FLIGHT, B_WEIGHT, B_REQUESTS, B_ERRORS, B_TOKENS = range(5)
# Key planes: requests in flight; this minute's number and the last one's (the minute in K_MINUTE)
# of requests and of tokens; requests answered, failed, tokens metered.
(K_IN_FLIGHT, K_MINUTE, K_REQUESTS_NOW, K_REQUESTS_BEFORE, K_TOKENS_NOW, K_TOKENS_BEFORE,
 K_REQUESTS, K_ERRORS, K_TOKENS) = range(9)
_BACKEND_PLANES = 5
_KEY_PLANES = 9

_LIST_AT = _HEADER_WORDS
_KEY_LIST_AT = _LIST_AT + MAX_BACKENDS
_SLOTS_AT = _KEY_LIST_AT + MAX_KEYS
_BACKEND_CELLS_AT = _SLOTS_AT + MAX_SLOTS * _SLOT_WORDS
_KEY_CELLS_AT = _BACKEND_CELLS_AT + _BACKEND_PLANES * MAX_BACKENDS * MAX_SLOTS
_COLUMNS_AT = _KEY_CELLS_AT + _KEY_PLANES * MAX_KEYS * MAX_SLOTS
_KEYS_AT = _COLUMNS_AT + MAX_BACKENDS * _COLUMN_WORDS
# Affinity's moved sessions: where a session that had to leave its home went, one word a place,
# a session's place chosen by its hash (a newer session in the same place takes it over).
MOVED_SESSIONS = 65536
_MOVED_AT = _KEYS_AT + MAX_KEYS * _KEY_WORDS
_SIZE_WORDS = _MOVED_AT + MOVED_SESSIONS


def _backend_cell(plane: int, column: int) -> int:
    return _BACKEND_CELLS_AT + (plane * MAX_BACKENDS + column) * MAX_SLOTS


def _key_cell(plane: int, column: int) -> int:
    return _KEY_CELLS_AT + (plane * MAX_KEYS + column) * MAX_SLOTS


class HostTable:
    """The shared mapping, seen through typed views. `slot` is this process's row, or None in the
    master."""

    def __init__(self, memory: mmap.mmap):
        self._memory = memory
        self.bytes = memoryview(memory)
        self.words = self.bytes.cast("q")
        self.floats = self.bytes.cast("d")
        self.slot = None
        # Rows in use are the first `_slots_in_use` ones: sums go no further.
        self._slots_in_use = MAX_SLOTS

    @classmethod
    def create(cls) -> "HostTable":
        """A new, empty table (in gunicorn's master, before the first fork)."""
        table = cls(mmap.mmap(-1, _SIZE_WORDS * 8))
        table.words[_MAGIC] = _MAGIC_VALUE
        return table

    @classmethod
    def private(cls) -> "HostTable":
        """A table of this process alone (a unit test, a plain WSGI server), slot 0 its own."""
        table = cls.create()
        table.attach(table.claim_slot(), os.getpid())
        table.set_own(S_STATE, READY)
        return table

    # --- slots (the master hands them out) ---------------------------------------------------

    def claim_slot(self) -> int:
        """The lowest free slot, marked as starting; ValueError when none is free."""
        words = self.words
        for slot in range(MAX_SLOTS):
            base = _SLOTS_AT + slot * _SLOT_WORDS
            if words[base + S_STATE] == FREE:
                self._clear_slot(slot)
                words[base + S_STATE] = STARTING
                self.floats[base + S_STARTED] = time.time()
                self.floats[base + S_HEARTBEAT] = time.time()
                return slot
        raise ValueError(f"all {MAX_SLOTS} worker slots are taken")

    def release_slot(self, slot: int) -> None:
        """The worker of `slot` is gone: what it had in flight, open or queued is over."""
        self._clear_slot(slot)
        self.words[_SLOTS_AT + slot * _SLOT_WORDS + S_STATE] = FREE
        self.changed()

    def _clear_slot(self, slot: int) -> None:
        base = _SLOTS_AT + slot * _SLOT_WORDS
        for word in range(1, _SLOT_WORDS):
            self.words[base + word] = 0
        for plane in (B_IN_FLIGHT, B_WEIGHT):
            for column in range(MAX_BACKENDS):
                self.words[_backend_cell(plane, column) + slot] = 0
        for column in range(MAX_KEYS):
            self.words[_key_cell(K_IN_FLIGHT, column) + slot] = 0

    def attach(self, slot: int, pid: int) -> None:
        """This process is the worker of `slot`."""
        self.slot = slot
        self.words[_SLOTS_AT + slot * _SLOT_WORDS + S_PID] = pid
        self.refresh_slots_in_use()

    def refresh_slots_in_use(self) -> None:
        words = self.words
        highest = 0
        for slot in range(MAX_SLOTS):
            if words[_SLOTS_AT + slot * _SLOT_WORDS + S_STATE] != FREE:
                highest = slot + 1
        self._slots_in_use = max(highest, (self.slot or 0) + 1)

    def slot_word(self, slot: int, word: int) -> int:
        return self.words[_SLOTS_AT + slot * _SLOT_WORDS + word]

    def slot_float(self, slot: int, word: int) -> float:
        return self.floats[_SLOTS_AT + slot * _SLOT_WORDS + word]

    def set_own(self, word: int, value: int) -> None:
        self.words[_SLOTS_AT + self.slot * _SLOT_WORDS + word] = value

    def set_own_float(self, word: int, value: float) -> None:
        self.floats[_SLOTS_AT + self.slot * _SLOT_WORDS + word] = value

    def add_own(self, word: int, delta: int) -> None:
        self.words[_SLOTS_AT + self.slot * _SLOT_WORDS + word] += delta

    def live_slots(self) -> "list[int]":
        """The slots of running workers, in order."""
        words = self.words
        return [slot for slot in range(self._slots_in_use)
                if words[_SLOTS_AT + slot * _SLOT_WORDS + S_STATE] != FREE]

    def slot_sum(self, word: int) -> int:
        """`word` summed over every live slot (open connections, queued requests)."""
        words = self.words
        return sum(words[_SLOTS_AT + slot * _SLOT_WORDS + word]
                   for slot in range(self._slots_in_use))

    # --- in flight, per backend column ---------------------------------------------------------

    def acquire(self, column: int, weight: int) -> None:
        slot = self.slot
        self.words[_backend_cell(B_IN_FLIGHT, column) + slot] += 1
        self.words[_backend_cell(B_WEIGHT, column) + slot] += weight

    def release(self, column: int, weight: int) -> None:
        slot = self.slot
        self.words[_backend_cell(B_IN_FLIGHT, column) + slot] -= 1
        self.words[_backend_cell(B_WEIGHT, column) + slot] -= weight

    def in_flight(self, column: int) -> int:
        """Requests every worker has in flight to the backend of `column`."""
        start = _backend_cell(B_IN_FLIGHT, column)
        return sum(self.words[start:start + self._slots_in_use])

    def in_flight_weight(self, column: int) -> int:
        start = _backend_cell(B_WEIGHT, column)
        return sum(self.words[start:start + self._slots_in_use])

    def add_backend(self, plane: int, column: int, delta: int) -> None:
        """Add to this worker's cell of a backend plane."""
        self.words[_backend_cell(plane, column) + self.slot] += delta

    def backend_sum(self, plane: int, column: int) -> int:
        start = _backend_cell(plane, column)
        return sum(self.words[start:start + self._slots_in_use])

    def add_key(self, plane: int, column: int, delta: int) -> None:
        """Add to this worker's cell of a key plane."""
        self.words[_key_cell(plane, column) + self.slot] += delta

    def key_sum(self, plane: int, column: int) -> int:
        start = _key_cell(plane, column)
        return sum(self.words[start:start + self._slots_in_use])

    def per_minute(self, plane_now: int, column: int, now: float) -> float:
        """A key's requests (K_REQUESTS_NOW) or tokens (K_TOKENS_NOW) over the last 60 s, all
        workers together: this minute's, plus the last one's in the share of the minute not
        yet passed (the sliding-window estimate)."""
        minute = int(now // 60)
        into = now / 60 - minute
        minutes = _key_cell(K_MINUTE, column)
        current = _key_cell(plane_now, column)
        before = _key_cell(plane_now + 1, column)
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

    def count_per_minute(self, plane_now: int, column: int, amount: int, now: float) -> None:
        """Add `amount` to this worker's count of this minute (K_REQUESTS_NOW, K_TOKENS_NOW)."""
        minute = int(now // 60)
        slot = self.slot
        minutes = _key_cell(K_MINUTE, column) + slot
        at = self.words[minutes]
        if at != minute:
            for plane in (K_REQUESTS_NOW, K_TOKENS_NOW):
                current = _key_cell(plane, column) + slot
                self.words[_key_cell(plane + 1, column) + slot] = \
                    self.words[current] if at == minute - 1 else 0
                self.words[current] = 0
            self.words[minutes] = minute
        self.words[_key_cell(plane_now, column) + slot] += amount

    # --- the backend list (the leader writes it) ---------------------------------------------

    @property
    def list_version(self) -> int:
        return self.words[_LIST_VERSION]

    def read_list(self) -> "list[tuple[int, str, str | None]]":
        """(column, base URL, `dns+` source or None) of every listed backend, in list order."""
        words = self.words
        while True:
            seq = words[_LIST_SEQ]
            if seq % 2 == 0:
                entries = [(column, self._text(column, _URL_AT, C_URL_LEN),
                            self._text(column, _SOURCE_AT, C_SOURCE_LEN) or None)
                           for column in words[_LIST_AT:_LIST_AT + words[_LIST_COUNT]]]
                if words[_LIST_SEQ] == seq:
                    return entries
            time.sleep(0)

    def write_list(self, urls: "list[str]", sources: "dict[str, str]",
                   now: float, quarantine: float) -> "tuple[list[str], list[str]]":
        """Make the list exactly `urls` (at most MAX_BACKENDS; ValueError past it): a URL already
        listed keeps its column, a new one takes a column no worker still has requests on that
        was freed at least `quarantine` seconds ago. (added, removed)."""
        words = self.words
        listed = self.read_list()
        current = {url: column for column, url, _ in listed}
        if len(urls) > MAX_BACKENDS:
            raise ValueError(f"more than {MAX_BACKENDS} backends")
        wanted = set(urls)
        removed = [url for url in current if url not in wanted]
        added = [url for url in urls if url not in current]
        if words[_LIST_VERSION] and not added and not removed and [
                url for _, url, _ in listed] == urls and all(
                (source or "") == (sources.get(url) or "") for _, url, source in listed):
            return [], []
        words[_LIST_SEQ] += 1
        try:
            for url in removed:
                base = _column_base(current[url])
                words[base + C_STATE] = REMOVED
                self.floats[base + C_REMOVED_AT] = now
            columns = []
            for url in urls:
                column = current.get(url)
                if column is None:
                    column = self._free_column(now, quarantine)
                    self._reset_column(column, url)
                source = sources.get(url) or ""
                if self._text(column, _SOURCE_AT, C_SOURCE_LEN) != source:
                    self._write_text(column, _SOURCE_AT, C_SOURCE_LEN, source, SOURCE_BYTES)
                columns.append(column)
            self._write_order(_LIST_AT, _LIST_COUNT, _LIST_VERSION, columns)
        finally:
            words[_LIST_SEQ] += 1
        self.changed()
        return added, removed

    def _write_order(self, at: int, count_word: int, version_word: int, columns) -> None:
        """A list's columns, in order, and a new version of it (under its sequence counter)."""
        words = self.words
        for index, column in enumerate(columns):
            words[at + index] = column
        words[count_word] = len(columns)
        words[version_word] += 1

    def _free_column(self, now: float, quarantine: float) -> int:
        words, floats = self.words, self.floats
        for column in range(MAX_BACKENDS):
            base = _column_base(column)
            state = words[base + C_STATE]
            if state == UNUSED or (state == REMOVED and now - floats[base + C_REMOVED_AT]
                                   >= quarantine and self.in_flight(column) == 0):
                return column
        raise ValueError(f"more than {MAX_BACKENDS} backends")

    def _reset_column(self, column: int, url: str) -> None:
        base = _column_base(column)
        for word in range(32):
            self.words[base + word] = 0
        for word in (C_RUNNING, C_WAITING, C_KV_CACHE):
            self.floats[base + word] = UNKNOWN
        self._write_text(column, _URL_AT, C_URL_LEN, url, URL_BYTES)
        self.words[base + C_STATE] = LISTED

    def _text(self, column: int, at: int, length_word: int) -> str:
        start = _column_base(column) * 8 + at
        length = self.words[_column_base(column) + length_word]
        return bytes(self.bytes[start:start + length]).decode()

    def _write_text(self, column: int, at: int, length_word: int, text: str, limit: int) -> None:
        data = text.encode()[:limit]
        start = _column_base(column) * 8 + at
        self.bytes[start:start + len(data)] = data
        self.words[_column_base(column) + length_word] = len(data)

    # --- the API keys (the leader writes them) -------------------------------------------------

    @property
    def keys_version(self) -> int:
        return self.words[_KEYS_VERSION]

    def read_keys(self) -> "list[tuple[int, str, bytes, int, int, int]]":
        """(column, name, SHA-256 digest, max_concurrent, requests_per_minute,
        tokens_per_minute) of every key, in order; a limit of 0 is none."""
        words = self.words
        while True:
            seq = words[_KEYS_SEQ]
            if seq % 2 == 0:
                keys = [self._key(column)
                        for column in words[_KEY_LIST_AT:_KEY_LIST_AT + words[_KEYS_COUNT]]]
                if words[_KEYS_SEQ] == seq:
                    return keys
            time.sleep(0)

    def _key(self, column: int):
        base = _KEYS_AT + column * _KEY_WORDS
        at = base * 8
        name = bytes(self.bytes[at + _K_NAME * 8:at + _K_NAME * 8 + self.words[base + K_NAME_LEN]])
        digest = bytes(self.bytes[at + _K_DIGEST * 8:at + _K_DIGEST * 8 + 32])
        return (column, name.decode(), digest, self.words[base + K_MAX_CONCURRENT],
                self.words[base + K_REQUESTS_PER_MINUTE], self.words[base + K_TOKENS_PER_MINUTE])

    def write_keys(self, keys: "list[tuple[str, bytes, int, int, int]]") -> bool:
        """Make the keys exactly `keys`, each (name, digest, max_concurrent,
        requests_per_minute, tokens_per_minute): a key already known (by its digest) keeps its
        column, and with it its counts; a new one takes a column no worker has requests on.
        True if anything changed; ValueError past MAX_KEYS."""
        words = self.words
        listed = self.read_keys()
        current = {digest: column for column, _, digest, *_ in listed}
        if words[_KEYS_VERSION] and [entry[1:] for entry in listed] == \
                [(name, digest, *limits) for name, digest, *limits in keys]:
            return False
        if len(keys) > MAX_KEYS:
            raise ValueError(f"more than {MAX_KEYS} keys")
        wanted = {digest for _, digest, *_ in keys}
        taken = {column for digest, column in current.items() if digest in wanted}
        words[_KEYS_SEQ] += 1
        try:
            columns = []
            for name, digest, *limits in keys:
                column = current.get(digest)
                if column is None:
                    column = next(c for c in range(MAX_KEYS) if c not in taken
                                  and c not in current.values()
                                  and self.key_sum(K_IN_FLIGHT, c) == 0)
                    taken.add(column)
                    for plane in range(_KEY_PLANES):
                        start = _key_cell(plane, column)
                        for slot in range(MAX_SLOTS):
                            words[start + slot] = 0
                base = _KEYS_AT + column * _KEY_WORDS
                at = base * 8
                data = name.encode()[:KEY_NAME_BYTES]
                self.bytes[at + _K_NAME * 8:at + _K_NAME * 8 + len(data)] = data
                words[base + K_NAME_LEN] = len(data)
                self.bytes[at + _K_DIGEST * 8:at + _K_DIGEST * 8 + 32] = digest
                (words[base + K_MAX_CONCURRENT], words[base + K_REQUESTS_PER_MINUTE],
                 words[base + K_TOKENS_PER_MINUTE]) = limits
                words[base + K_STATE] = LISTED
                columns.append(column)
            self._write_order(_KEY_LIST_AT, _KEYS_COUNT, _KEYS_VERSION, columns)
        finally:
            words[_KEYS_SEQ] += 1
        self.changed()
        return True

    # --- backend columns -------------------------------------------------------------------------

    def word(self, column: int, word: int) -> int:
        return self.words[_column_base(column) + word]

    def float(self, column: int, word: int) -> float:
        return self.floats[_column_base(column) + word]

    def set_word(self, column: int, word: int, value: int) -> None:
        self.words[_column_base(column) + word] = value

    def set_float(self, column: int, word: int, value: float) -> None:
        self.floats[_column_base(column) + word] = value

    def changed(self, column: "int | None" = None) -> None:
        """Tell every worker that something its view depends on was written (in `column`)."""
        if column is not None:
            self.words[_column_base(column) + C_VERSION] += 1
        self.words[_CHANGES] += 1

    @property
    def changes(self) -> int:
        return self.words[_CHANGES]

    def write_models(self, column: int, body: "bytes | None", now: float) -> bool:
        """Store the backend's `/v1/models` answer (None: unreadable); True if it changed. The
        writer then calls `changed(column)`."""
        base = _column_base(column)
        data = b"" if body is None else body[:MODELS_BYTES]
        length = -1 if body is None or len(body) > MODELS_BYTES else len(data)
        self.floats[base + C_MODELS_READ_AT] = now
        if length == self.words[base + C_MODELS_LEN] and (
                length <= 0 or self.read_models(column) == data):
            return False
        self.words[base + C_MODELS_SEQ] += 1
        start = base * 8 + _MODELS_AT
        self.bytes[start:start + len(data)] = data
        self.words[base + C_MODELS_LEN] = length
        self.words[base + C_MODELS_SEQ] += 1
        return True

    def read_models(self, column: int) -> "bytes | None":
        """The stored `/v1/models` answer, or None while unknown or unreadable."""
        base = _column_base(column)
        while True:
            seq = self.words[base + C_MODELS_SEQ]
            length = self.words[base + C_MODELS_LEN]
            if seq % 2 == 0:
                start = base * 8 + _MODELS_AT
                data = bytes(self.bytes[start:start + max(length, 0)]) if length > 0 else None
                if self.words[base + C_MODELS_SEQ] == seq:
                    return data
            time.sleep(0)

    def models_seq(self, column: int) -> int:
        return self.words[_column_base(column) + C_MODELS_SEQ]

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
        self.floats[_POLL_WANTED] = now

    @property
    def polls_wanted_at(self) -> float:
        return self.floats[_POLL_WANTED]


def _column_base(column: int) -> int:
    return _COLUMNS_AT + column * _COLUMN_WORDS


def reason_code(reason: "str | None") -> int:
    """The code of a failure reason (`upstream.failure_reason`'s words)."""
    try:
        return REASONS.index(reason)
    except ValueError:
        return REASONS.index("connection failed")


_table = None


def shared() -> HostTable:
    """This process's table: made on first use, and inherited by the processes forked after."""
    global _table
    if _table is None:
        _table = HostTable.create()
    return _table
