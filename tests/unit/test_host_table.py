"""Unit tests of the host table (`forwarder/host/`), region by region: its layout, the slots, the
backend list and its columns' reuse, the keys, a key's minute, a backend's failures in a row,
affinity's moved sessions, and the sequence counters: one writer at a time, and a writer that dies
in the middle of a write stops no reader and is repaired by the next one.

Other processes are real ones (`os.fork`): the table's locks are held per process."""

import contextlib
import math
import os
import signal
import threading

import pytest

from forwarder.host import layout
from forwarder.host.layout import (BackendCount, Column, ColumnState, Header, KeyCount, Slot,
                                   SlotState)
from forwarder.host.seqlock import READ_PATIENCE_SECONDS
from forwarder.host.table import Busy, HostTable, NotLeader, TableMismatch

URLS = ["http://10.0.0.1:8101", "http://10.0.0.2:8101", "http://10.0.0.3:8101"]
MINUTE = 60 * 1_000_000  # a minute's start, in seconds, far from any edge case of the clock
held = []  # what a forked child holds, kept from the garbage collector (which would let go)


def table_with(urls=URLS, now=1000.0) -> HostTable:
    table = HostTable.private()
    table.write_list(list(urls), {}, now, quarantine=60)
    return table


def columns(table) -> dict:
    return {url: column for column, url, _ in table.read_list()}


@contextlib.contextmanager
def child(work):
    """Run `work(table)` in a forked child, which then waits to be killed; yields its pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            work()
            os.write(write, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1", "the child did not get through its work"
        yield pid
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def killed_in(work):
    """Run `work()` in a forked child killed in the middle of it (it exits from inside)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- the layout ----------------------------------------------------------------------------------

def test_regions_follow_each_other_and_the_size_is_derived():
    end = 0
    for region in layout.REGIONS.values():
        assert region.at == end
        end = region.end
    assert end == layout.SIZE_WORDS
    assert layout.COLUMN.words == len(Column) + (layout.URL_BYTES + layout.SOURCE_BYTES
                                                 + layout.MODELS_BYTES) // 8
    assert layout.COLUMN.text_at("source") == (len(Column) * 8) + layout.URL_BYTES


def test_a_table_of_another_layout_is_refused():
    table = HostTable.private()
    table.check()
    table.words[layout.REGIONS["header"].at + Header.FINGERPRINT] += 1
    with pytest.raises(TableMismatch):
        table.check()
    table.words[layout.REGIONS["header"].at + Header.FINGERPRINT] -= 1
    table.words[layout.REGIONS["header"].at + Header.MAGIC] = 0
    with pytest.raises(TableMismatch):
        table.attach(1, os.getpid())


# --- slots ---------------------------------------------------------------------------------------

def test_a_released_slot_loses_what_it_had_in_flight_but_not_what_it_counted():
    table = table_with()
    column = columns(table)[URLS[0]]
    table.acquire(column, 32)
    table.add_backend(BackendCount.REQUESTS, column, 3)
    table.set_own(Slot.QUEUED, 2)
    changes = table.changes
    table.release_slot(table.slot)
    assert table.in_flight(column) == 0 and table.in_flight_weight(column) == 0
    assert table.slot_sum(Slot.QUEUED) == 0
    assert table.backend_sum(BackendCount.REQUESTS, column) == 3  # like a Prometheus counter
    assert table.changes != changes
    assert table.claim_slot() == 0


def test_the_leader_is_the_lowest_ready_slot_and_a_draining_one_leads_no_more():
    table = HostTable.private()  # slot 0, ready
    first = table.claim_slot()
    table.refresh_slots_in_use()  # as every poller tick does
    assert table.leader() == 0
    table.set_own(Slot.STATE, SlotState.DRAINING)
    assert table.leader() == first  # only a starting one left
    with pytest.raises(NotLeader):
        table.write_list(URLS, {}, 0.0, 60)


# --- the backend list ----------------------------------------------------------------------------

def test_a_url_keeps_its_column_and_a_removed_ones_column_waits_out_its_quarantine():
    table = table_with(URLS, now=1000.0)
    before = columns(table)
    assert table.write_list(URLS[1:], {}, 1000.0, 60) == ([], [URLS[0]])
    assert columns(table) == {url: before[url] for url in URLS[1:]}
    freed = before[URLS[0]]
    new = "http://10.0.0.9:8101"
    table.write_list(URLS[1:] + [new], {}, 1030.0, 60)
    assert columns(table)[new] != freed  # 30 s after: still in quarantine
    table.write_list(URLS[1:], {}, 1100.0, 60)
    table.acquire(freed, 16)  # a request of the removed backend still runs
    table.write_list(URLS[1:] + ["http://10.0.0.10:8101"], {}, 1200.0, 60)
    assert columns(table)["http://10.0.0.10:8101"] != freed
    table.release(freed, 16)
    table.write_list(URLS[1:] + ["http://10.0.0.11:8101"], {}, 1300.0, 60)
    assert columns(table)["http://10.0.0.11:8101"] == freed


def test_a_reused_column_is_fresh_and_each_worker_zeroes_its_own_counts_of_it():
    table = table_with(URLS[:1], now=0.0)
    column = columns(table)[URLS[0]]
    table.adopt_column(column)
    table.add_backend(BackendCount.REQUESTS, column, 7)
    table.set_float(column, Column.RUNNING, 5.0)
    generation = table.word(column, Column.GENERATION)
    table.write_list([], {}, 0.0, 60)
    table.write_list(["http://10.0.0.7:8101"], {}, 100.0, 60)
    assert columns(table)["http://10.0.0.7:8101"] == column
    assert table.word(column, Column.GENERATION) == generation + 1
    assert math.isnan(table.float(column, Column.RUNNING))
    assert table.backend_sum(BackendCount.REQUESTS, column) == 7  # until the worker adopts it
    table.adopt_column(column)
    assert table.backend_sum(BackendCount.REQUESTS, column) == 0


def test_an_unchanged_list_is_not_written_again():
    table = table_with()
    version = table.list_version
    assert table.write_list(URLS, {}, 1000.0, 60) == ([], [])
    assert table.list_version == version
    table.write_list(URLS, {URLS[0]: "dns+vllm:8000"}, 1000.0, 60)
    assert table.list_version == version + 1
    assert table.read_list()[0] == (columns(table)[URLS[0]], URLS[0], "dns+vllm:8000")


def test_a_list_too_long_is_refused_whole():
    table = table_with()
    with pytest.raises(ValueError):
        table.write_list([f"http://h{i}:1" for i in range(layout.MAX_BACKENDS + 1)], {}, 0.0, 60)
    assert [url for _, url, _ in table.read_list()] == URLS


# --- one writer at a time, and a writer that dies mid-write -------------------------------------

def test_a_second_process_cannot_write_while_one_writes():
    table = table_with()

    def hold_the_list():
        held.append(table._list_lock.exclusive())
        held[-1].__enter__()  # and never let go, until killed

    with child(hold_the_list):
        with pytest.raises(Busy):
            table.write_list(URLS[:1], {}, 1000.0, 60)
        assert [url for _, url, _ in table.read_list()] == URLS
    # Killed: the kernel let go of its lock.
    assert table.write_list(URLS[:1], {}, 1000.0, 60) == ([], URLS[1:])


def test_a_writer_killed_mid_write_stops_no_reader_and_the_next_writer_repairs_it():
    table = table_with()
    good = table.read_list()

    def die_halfway():
        original = HostTable._write_text

        def write_then_die(self, *args):
            original(self, *args)
            os.kill(os.getpid(), signal.SIGKILL)

        HostTable._write_text = write_then_die
        table.write_list(URLS + ["http://10.0.0.4:8101"], {}, 2000.0, 60)

    assert killed_in(die_halfway) == -signal.SIGKILL
    assert table.words[layout.REGIONS["header"].at + Header.LIST_SEQ] % 2 == 1

    # Readers give up at once instead of spinning, and keep what they had.
    answers = []
    reader = threading.Thread(target=lambda: answers.append(table.read_list()), daemon=True)
    reader.start()
    reader.join(timeout=2)
    assert not reader.is_alive(), "a reader spins on the dead writer's counter"
    assert answers == [None]

    # The next writer finds the counter odd under its lock: it writes the list anew.
    table.write_list(URLS + ["http://10.0.0.4:8101"], {}, 2000.0, 60)
    assert [url for _, url, _ in table.read_list()] == URLS + ["http://10.0.0.4:8101"]
    assert table.read_list()[:3] == good


def test_a_read_gives_up_after_its_patience():
    table = table_with()
    table.words[layout.REGIONS["header"].at + Header.LIST_SEQ] += 1  # a write under way
    assert table.read_list() is None
    assert READ_PATIENCE_SECONDS <= 0.05


def test_a_model_list_written_by_a_dead_writer_is_repaired_by_the_next():
    table = table_with()
    column = columns(table)[URLS[0]]
    table.write_models(column, b'{"data": []}', 1.0)
    seq, body = table.read_models(column)
    assert body == b'{"data": []}' and seq % 2 == 0
    table.words[layout.REGIONS["columns"].at + column * layout.COLUMN.words
                + Column.MODELS_SEQ] += 1
    assert table.read_models(column) is None
    assert table.write_models(column, b'{"data": []}', 2.0)  # same body, but repaired
    assert table.read_models(column)[1] == b'{"data": []}'


# --- the keys ------------------------------------------------------------------------------------

KEY_A = ("team-a", b"a" * 32, 2, 60, 1000)
KEY_B = ("team-b", b"b" * 32, 0, 0, 0)


def test_a_key_keeps_its_column_and_its_counts_when_the_keys_change():
    table = HostTable.private()
    assert table.write_keys([KEY_A], 0.0, 120)
    (column_a, *_), = table.read_keys()
    table.add_key(KeyCount.IN_FLIGHT, column_a, 1)
    assert table.write_keys([KEY_B, ("team-a2", *KEY_A[1:])], 0.0, 120)
    keys = {name: column for column, name, *_ in table.read_keys()}
    assert keys["team-a2"] == column_a
    assert table.key_sum(KeyCount.IN_FLIGHT, column_a) == 1
    assert not table.write_keys([KEY_B, ("team-a2", *KEY_A[1:])], 0.0, 120)


def test_a_removed_keys_column_waits_out_its_quarantine_and_in_flight_requests():
    table = HostTable.private()
    table.write_keys([KEY_A], 0.0, 120)
    (column_a, *_), = table.read_keys()
    table.adopt_key_column(column_a)
    table.add_key(KeyCount.IN_FLIGHT, column_a, 1)
    table.add_key(KeyCount.REQUESTS, column_a, 5)
    table.write_keys([], 10.0, 120)
    table.write_keys([KEY_B], 100.0, 120)
    assert table.read_keys()[0][0] != column_a  # in quarantine
    table.write_keys([], 100.0, 120)
    table.write_keys([KEY_B], 500.0, 120)
    assert table.read_keys()[0][0] != column_a  # a request of team-a still runs
    table.add_key(KeyCount.IN_FLIGHT, column_a, -1)
    table.write_keys([], 500.0, 120)
    table.write_keys([KEY_B], 600.0, 120)
    assert table.read_keys()[0][0] == column_a
    assert table.key_sum(KeyCount.REQUESTS, column_a) == 5
    table.adopt_key_column(column_a)  # what each worker does when it sees the new key
    assert table.key_sum(KeyCount.REQUESTS, column_a) == 0


# --- a key's minute ------------------------------------------------------------------------------

def test_a_keys_minute_counts_this_minute_and_the_rest_of_the_last_one():
    table = HostTable.private()
    start = MINUTE
    table.count_per_minute(KeyCount.REQUESTS_NOW, 0, 10, start + 1)
    assert table.per_minute(KeyCount.REQUESTS_NOW, 0, start + 59) == 10
    # A quarter into the next minute, three quarters of the last one's count still weigh.
    table.count_per_minute(KeyCount.REQUESTS_NOW, 0, 4, start + 75)
    assert table.per_minute(KeyCount.REQUESTS_NOW, 0, start + 75) == pytest.approx(4 + 7.5)
    # A minute later the first minute is gone; two minutes later, everything.
    assert table.per_minute(KeyCount.REQUESTS_NOW, 0, start + 150) == pytest.approx(4 * 0.5)
    assert table.per_minute(KeyCount.REQUESTS_NOW, 0, start + 180) == 0


def test_a_keys_minute_adds_every_workers_counts():
    table = HostTable.private()
    other = table.claim_slot()
    table.count_per_minute(KeyCount.TOKENS_NOW, 3, 100, MINUTE + 10)
    mine = table.slot
    table.slot = other  # this process writes the other worker's cells for a moment
    table.count_per_minute(KeyCount.TOKENS_NOW, 3, 50, MINUTE + 20)
    table.slot = mine
    table.refresh_slots_in_use()
    assert table.per_minute(KeyCount.TOKENS_NOW, 3, MINUTE + 30) == 150
    assert table.per_minute(KeyCount.REQUESTS_NOW, 3, MINUTE + 30) == 0


# --- a backend's failures in a row ---------------------------------------------------------------

def test_failures_in_a_row_add_up_over_workers_and_any_success_ends_the_run():
    table = table_with()
    column = columns(table)[URLS[0]]
    other = table.claim_slot()
    table.refresh_slots_in_use()
    mine = table.slot
    assert table.count_failure(column) == 1
    table.slot = other
    assert table.count_failure(column) == 2
    table.end_failure_run(column)  # the other worker's request succeeded
    table.slot = mine
    assert table.failure_run(column) == 0
    assert table.count_failure(column) == 1  # a new run, whatever this worker counted before


def test_the_ejection_lock_is_one_process_at_a_time():
    table = table_with()

    def hold():
        held.append(table.ejecting())
        held[-1].__enter__()

    with child(hold):
        with pytest.raises(Busy):
            with table.ejecting():
                pass
    with table.ejecting():
        pass


# --- affinity's moved sessions -------------------------------------------------------------------

def test_a_moved_session_is_found_by_its_own_hash_only_and_comes_back_home():
    table = HostTable.private()
    session = 0x1234_5678_9ABC_DEF0
    table.move(session, 7)
    assert table.moved_to(session) == 7
    same_place = session + layout.MOVED_SESSIONS * 2 ** 20  # another session, the same place
    assert table.moved_to(same_place) is None
    table.move(same_place, None)  # another session's return leaves this one's move alone
    assert table.moved_to(session) == 7
    table.move(same_place, 3)  # the newer one takes the place over
    assert table.moved_to(session) is None and table.moved_to(same_place) == 3
    table.move(same_place, None)
    assert table.moved_to(same_place) is None


# --- changes ------------------------------------------------------------------------------------

def test_every_change_moves_the_stamp_of_the_table_and_of_its_column():
    table = table_with()
    column = columns(table)[URLS[0]]
    stamps = set()
    for _ in range(100):
        table.changed(column)
        stamps.add((table.changes, table.version(column)))
    assert len(stamps) == 100
    assert table.word(column, Column.STATE) == ColumnState.LISTED
