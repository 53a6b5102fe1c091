"""The host table's layout, declared once, as data: its limits, the words of each kind of record
(one enum per record: a word's index is its place in the record), and its regions in order. Every
offset and the table's size are derived from these, and checked when this module is imported; a
fingerprint of the whole declaration is written into the table beside its magic, and checked by
every process that maps it (`table.HostTable.check`).

A record's words are 8 bytes each (integers, or floats where the enum says so); text fields
follow a record's words, their size a multiple of 8. A *count plane* is one word per worker slot
for each column: a counter that several workers add to is kept per worker, each writing only its
own cell, and summed when read.
"""

import dataclasses
import enum
import hashlib

WORD = 8

# The most workers one instance runs at once, a reload's old and new ones together.
MAX_SLOTS = 256
# The most backends one list may name; entries past it are logged and left out.
MAX_BACKENDS = 1024
# The most API keys (FORWARDER_API_KEYS and API_KEYS_FILE together).
MAX_KEYS = 1024
# Affinity's moved sessions: one word a place, a session's place chosen by its hash.
MOVED_SESSIONS = 65536
URL_BYTES = 512
SOURCE_BYTES = 256
MODELS_BYTES = 65536
KEY_NAME_BYTES = 64
KEY_DIGEST_BYTES = 32

MAGIC = 0x766C6C6D66776432  # "vllmfwd2"


class Header(enum.IntEnum):
    """The table's first words."""

    MAGIC = 0
    FINGERPRINT = enum.auto()  # of this layout (`FINGERPRINT`)
    POLL_WANTED = enum.auto()  # float: when a request last waited for a backend
    # A stamp written with every change a worker's view depends on (`HostTable.changed`).
    CHANGES = enum.auto()
    # The backend list: sequence counter (odd while written), version, entries.
    LIST_SEQ = enum.auto()
    LIST_VERSION = enum.auto()
    LIST_COUNT = enum.auto()
    # The API keys, likewise.
    KEYS_SEQ = enum.auto()
    KEYS_VERSION = enum.auto()
    KEYS_COUNT = enum.auto()


class SlotState(enum.IntEnum):
    FREE = 0
    STARTING = 1
    READY = 2
    DRAINING = 3


class Slot(enum.IntEnum):
    """One worker's row: written by that worker only (and cleared by the master when it dies)."""

    STATE = 0  # SlotState
    PID = enum.auto()
    STARTED = enum.auto()  # float
    HEARTBEAT = enum.auto()  # float
    CONNECTIONS = enum.auto()
    QUEUED = enum.auto()
    HEAD_PRIORITY = enum.auto()
    HEAD_TURN = enum.auto()
    HEAD_ARRIVAL = enum.auto()  # float, monotonic
    QUEUE_SINCE = enum.auto()  # float, monotonic


class ColumnState(enum.IntEnum):
    UNUSED = 0
    LISTED = 1
    REMOVED = 2


class Column(enum.IntEnum):
    """What the instance knows of one backend. Floats are `time.time()` seconds or figures, NaN
    for "unknown"."""

    STATE = 0  # ColumnState, written by the list's writer
    GENERATION = enum.auto()  # bumped each time the column is given to a new URL
    VERSION = enum.auto()  # a stamp written with every change to the column
    URL_LEN = enum.auto()
    SOURCE_LEN = enum.auto()
    REMOVED_AT = enum.auto()  # float
    # The last poll, written by the backend's poll owner.
    POLL_OK = enum.auto()
    POLLED_AT = enum.auto()  # float
    POLL_REASON = enum.auto()
    POLL_STATUS = enum.auto()
    RUNNING = enum.auto()  # float
    WAITING = enum.auto()  # float
    KV_CACHE = enum.auto()  # float
    IN_FLIGHT_AT_POLL = enum.auto()
    # The last time a request could not connect to it (any worker; the last write wins).
    DOWN_AT = enum.auto()  # float
    DOWN_REASON = enum.auto()
    # The run of failed requests: a new epoch (any worker, after a success) ends it.
    FAILURE_EPOCH = enum.auto()
    LAST_FAILURE = enum.auto()
    LAST_FAILURE_STATUS = enum.auto()
    # Its ejection, written under the ejection lock.
    EJECTED_UNTIL = enum.auto()  # float
    EJECT_SECONDS = enum.auto()  # float
    EJECT_REASON = enum.auto()
    EJECT_STATUS = enum.auto()
    # Its `/v1/models` answer, written by the poll owner under its sequence counter.
    MODELS_SEQ = enum.auto()
    MODELS_LEN = enum.auto()
    MODELS_READ_AT = enum.auto()  # float


class KeyColumn(enum.IntEnum):
    """One API key, written by the keys' writer (the list leader)."""

    STATE = 0  # ColumnState
    GENERATION = enum.auto()
    REMOVED_AT = enum.auto()  # float
    NAME_LEN = enum.auto()
    MAX_CONCURRENT = enum.auto()
    REQUESTS_PER_MINUTE = enum.auto()
    TOKENS_PER_MINUTE = enum.auto()


class BackendCount(enum.IntEnum):
    """Count planes of the backend columns: each worker writes only its own cell."""

    IN_FLIGHT = 0
    WEIGHT = enum.auto()
    REQUESTS = enum.auto()
    ERRORS = enum.auto()
    TOKENS = enum.auto()
    # This worker's failures in the column's current failure run, and which run they are of.
    FAILURES = enum.auto()
    FAILURES_EPOCH = enum.auto()
    # The column's generation this worker's cells were last zeroed for.
    GENERATION_SEEN = enum.auto()


class KeyCount(enum.IntEnum):
    """Count planes of the key columns: requests in flight; this minute's number and the last
    one's (the minute in MINUTE) of requests and of tokens; requests answered, failed, tokens."""

    IN_FLIGHT = 0
    MINUTE = enum.auto()
    REQUESTS_NOW = enum.auto()
    REQUESTS_BEFORE = enum.auto()
    TOKENS_NOW = enum.auto()
    TOKENS_BEFORE = enum.auto()
    REQUESTS = enum.auto()
    ERRORS = enum.auto()
    TOKENS = enum.auto()
    GENERATION_SEEN = enum.auto()


def _words(size_bytes: int) -> int:
    assert size_bytes % WORD == 0, "text fields are whole words"
    return size_bytes // WORD


# Text fields after a column's words, and after a key's: (name, bytes).
COLUMN_TEXTS = (("url", URL_BYTES), ("source", SOURCE_BYTES), ("models", MODELS_BYTES))
KEY_TEXTS = (("digest", KEY_DIGEST_BYTES), ("name", KEY_NAME_BYTES))


@dataclasses.dataclass(frozen=True)
class Record:
    """A record: its words (`fields`), then its text fields; sizes and offsets derived."""

    fields: type
    texts: tuple = ()

    @property
    def words(self) -> int:
        return len(self.fields) + sum(_words(size) for _, size in self.texts)

    def text_at(self, name: str) -> int:
        """The byte offset of a text field within the record."""
        at = len(self.fields) * WORD
        for text, size in self.texts:
            if text == name:
                return at
            at += size
        raise KeyError(name)


COLUMN = Record(Column, COLUMN_TEXTS)
KEY = Record(KeyColumn, KEY_TEXTS)


@dataclasses.dataclass(frozen=True)
class Region:
    """`records` records of `record_words` words each, from word `at`."""

    name: str
    records: int
    record_words: int
    at: int = 0

    @property
    def words(self) -> int:
        return self.records * self.record_words

    @property
    def end(self) -> int:
        return self.at + self.words


def _lay_out(*declared: "tuple[str, int, int]") -> "dict[str, Region]":
    regions, at = {}, 0
    for name, records, record_words in declared:
        regions[name] = Region(name, records, record_words, at)
        at += records * record_words
    return regions


REGIONS = _lay_out(
    ("header", 1, len(Header)),
    ("list", 1, MAX_BACKENDS),  # the listed columns, in list order
    ("key_list", 1, MAX_KEYS),  # the keys' columns, in order
    ("slots", MAX_SLOTS, len(Slot)),
    ("backend_counts", len(BackendCount) * MAX_BACKENDS, MAX_SLOTS),
    ("key_counts", len(KeyCount) * MAX_KEYS, MAX_SLOTS),
    ("columns", MAX_BACKENDS, COLUMN.words),
    ("keys", MAX_KEYS, KEY.words),
    ("moved_sessions", 1, MOVED_SESSIONS),
)
SIZE_WORDS = max(region.end for region in REGIONS.values())
FINGERPRINT = int.from_bytes(hashlib.blake2b(repr((
    [(r.name, r.records, r.record_words, r.at) for r in REGIONS.values()],
    [list(record.__members__) for record in (Header, Slot, Column, KeyColumn, BackendCount,
                                             KeyCount)],
    COLUMN_TEXTS, KEY_TEXTS)).encode(), digest_size=7).digest(), "big")


def _check() -> None:
    """Regions follow each other without gap or overlap, each record fits its fields."""
    end = 0
    for region in REGIONS.values():
        assert region.at == end, f"region {region.name} does not start where the last ends"
        assert region.records > 0 and region.record_words > 0, region.name
        end = region.end
    assert end == SIZE_WORDS
    assert REGIONS["slots"].record_words >= len(Slot)
    assert REGIONS["columns"].record_words == len(Column) + sum(_words(s) for _, s in COLUMN_TEXTS)
    assert KEY.text_at("name") + KEY_NAME_BYTES == KEY.words * WORD
    assert max(MAX_BACKENDS, MAX_KEYS) < 1 << 16, "a moved session's word holds a column in 16 bits"


_check()
