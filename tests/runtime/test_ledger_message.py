"""The desync message from two ledgers' books, without processes: a divergence found
long after it happened (the ranks ran on meanwhile, past more entries than a short ring
would keep) is still named where it happened."""

from __future__ import annotations

import torch

from overdrive.runtime.ledger import Ledger, desync_message


def _reduce(ledger: Ledger) -> None:
    """rt.reduce's books: a helper point, the shape check's all_gather, the all_reduce."""
    with ledger.helper("rt.reduce"):
        ledger.note("all_gather", torch.zeros(2, dtype=torch.long))
        ledger.note("all_reduce", torch.zeros(()))


def _books(rank: int, steps: int, skip: int | None) -> Ledger:
    ledger = Ledger(rank, 2, None, None, "test")
    for step in range(1, steps + 1):
        ledger.point(step)  # the optimizer step
        if step != skip:
            _reduce(ledger)
    return ledger


def test_a_late_found_divergence_is_named_where_it_happened():
    a, b = _books(0, 200, None), _books(1, 201, 5)  # rank 1 skipped step 5's reduce
    assert a.total > 256  # more entries than the old ring of 256
    finding = {"reason": "mismatch", "ranks": [0, 1], "point": 400}
    text = desync_message(finding, {0: a._dump(), 1: b._dump()}, 5.0)
    head = text.split("first divergent entry: ")[1]
    assert head.startswith("rank 0 entered rt.reduce (after all_reduce #8), "
                           "rank 1 at optimizer step 6 (after all_reduce #8)"), text
    assert text.startswith("rt.reduce called on ranks [0] only"), text


def test_a_divergence_older_than_the_books_is_said_to_be():
    a, b = _books(0, 600, None), _books(1, 601, 5)  # 2,400 entries: step 5 is gone
    finding = {"reason": "mismatch", "ranks": [0, 1], "point": 1200}
    text = desync_message(finding, {0: a._dump(), 1: b._dump()}, 5.0)
    assert "first divergent entry: older than the last 1024 entries kept" in text, text


def test_books_that_share_no_point_compare_only_the_entries_both_hold():
    """A ring that dropped an entry is not a difference: the first entries of the rank
    further on are gone, not "issued nothing more"."""
    a, b = _books(0, 2000, None), _books(1, 20, None)
    finding = {"reason": "mismatch", "ranks": [0, 1], "point": 40}
    text = desync_message(finding, {0: a._dump(), 1: b._dump()}, 5.0)
    assert "(entry #0)" not in text, text


def test_the_watchdog_reads_the_books_while_the_main_thread_writes_them():
    """_dump (the watchdog's side of a desync) and _at_point copy the deques before
    walking them: walking one in Python while the main thread appends raised
    "deque mutated during iteration" and ended the watchdog, so its rank "did not
    answer" (seen in CI)."""
    import threading

    ledger = _books(0, 400, None)
    errors, stop = [], threading.Event()

    def read():
        try:
            while not stop.is_set():
                ledger._dump()
                ledger._at_point(ledger.points - 50)
        except Exception as err:  # noqa: BLE001 — the test reports it
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(401, 3000):
        ledger.point(step)
        _reduce(ledger)
    stop.set()
    reader.join()
    assert errors == []
