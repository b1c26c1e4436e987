"""The collective ledger: what each rank issued, compared across ranks to catch desyncs.

The main thread only keeps books. Every collective overdrive issues (the ``rt.gather`` /
``reduce`` / ``broadcast`` family, checkpointing, export) is noted with
a short tag — the helper, the op, the dtype and shape — folded into a running CRC-32, and
kept in a short ring of recent entries. What DDP and FSDP2 issue by themselves is noted
as one entry per pass over the model (``EngineCollectives``, handed on by the pass): the
gradient sync of each backward (``rt.backward``; DDP keeps its C++ all-reduce, nothing
runs per bucket), FSDP2's all-gathers of each root forward (a pre-hook). *Points* enter
the ring too: an optimizer step (with the ``rt.accumulate`` micro-steps it took),
entering a collective helper (``rt.save``, ``rt.load``, ``rt.export``, ``rt.gather*``…),
the end of an ``rt.shard`` epoch; each remembers the hash it was reached with. That is a
few integer operations per step and no I/O.

A watchdog thread compares the ranks through the TCP store torchrun already runs — its
own client connection, never a collective that could hang itself. Every ``INTERVAL`` s
it publishes this rank's position (last point, collective count, the helper or phase it
is inside, the hash at the point) and reads its neighbours' (ranks r-1 and r+1):

* a neighbour at a point this rank has passed must have reached it with the same hash,
  and have issued no more collectives since than this rank had by its next point; at the
  same count of points and collectives the two hashes now must agree — else the ranks
  issued different collectives (*mismatch*);
* when this rank and a neighbour have both stood still at *different* positions for
  ``desync_timeout`` s, one waits for the other, which is elsewhere (*stall*).

Either finding is posted under one store key (the first wins); every rank then posts its
recent entries and builds the same ``DesyncError`` from them, naming the first divergent
entry of each rank. The main thread raises it at its next overdrive call, or inside an
overdrive collective it is waiting in (those wait in slices). A rank blocked where
Python cannot be interrupted (DDP's C++ all-reduce in backward, user code) logs the error
and exits after ``GRACE`` s, so the launch ends. Detection latency: a stall ≈
``desync_timeout`` + 2×``INTERVAL``; a mismatch ≈ 2×``INTERVAL`` after both ranks pass
the point where they differ.

An optimizer step with no synced backward since the last one (a rank skipped its
backward) waits in the store until its neighbours are seen there: its next collective
(an ``rt.reduce``, a checkpoint's) would otherwise meet another rank's gradient all-reduce of
another size, on which gloo aborts the process (SIGABRT, in its transport thread) before
any Python runs. When a collective raises a backend error anyway (gloo's timeout, a
connection reset), ``diagnose`` asks the other ranks' watchdogs for their entries
through the store (at most ``PROBE_WAIT`` s) and raises ``DesyncError`` from that error
when the ledgers disagree; when they agree the error is re-raised untouched.

The same thread watches the launcher: when ``overdrive launch`` (``OVERDRIVE_LAUNCHER_PID``)
is gone, the worker exits (its parent was SIGKILLed; nobody would stop it otherwise).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import itertools
import json
import logging
import os
import sys
import threading
import time
import zlib
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import DesyncError

log = logging.getLogger("overdrive")
_crc32 = zlib.crc32
_MICRO_KEYS = [b"s%d" % m for m in range(65)]  # an optimizer step's hash key by micro-steps

INTERVAL = 0.25  # s between the watchdog's store round trips
PROBE_WAIT = 1.5  # s a rank whose collective failed waits for the others' entries
GRACE = 3.0  # s a blocked main thread has to raise before the process exits
RING = 1024  # recent entries kept (and posted when a desync is found)
HISTORY = 4096  # recent points kept: (point, hash, collectives by then, entry index)
# helpers whose ranks wait for another by design, for as long as it takes (rank 0
# downloading a dataset first): never a stall
PATIENT = frozenset({"rt.main_process_first"})
NOTHING = "had issued nothing more"  # a rank's side of an entry it has not reached
_ALL_DUMPS = 64  # worlds up to this size read every rank's entries on a desync

# The ledger of the runtime helper running now (a context, not a process-wide setting):
# collectives issued inside ``with ledger.helper(...)`` are noted on it.
_CURRENT: contextvars.ContextVar["Ledger | None"] = contextvars.ContextVar(
    "overdrive_ledger", default=None)
_INSTANCES = itertools.count()  # ledgers made in this process: the same order on every rank


# --------------------------------------------------------------------------- entries
# An entry is a tuple: ("c", helper, op, dtype, shape, n) for collective #n, or
# ("p", point, n, op, micro) for a point reached after n collectives, the last an ``op``,
# and ``micro`` rt.accumulate micro-steps since the last step. A point is an optimizer
# step (an int) or a label ("rt.save", "rt.shard epoch 0 end").
# Formatted only when shown.


def describe(entry: tuple) -> str:
    if entry[0] == "c":
        _, helper, op, dtype, shape, n = entry
        what = f"{op} {dtype}{list(shape)}" if dtype else op
        return f"issued {what} #{n} in {helper}"
    _, point, n, op, micro = entry
    steps = f"{micro} micro-steps, " if micro else ""
    return f"{_label(point)} ({steps}{_last(n, op)})"


def _last(n: int, op: str = "collective") -> str:
    return f"after {op} #{n}" if n else "no collective yet"


def _label(point: Any) -> str:
    if isinstance(point, int):
        return f"at optimizer step {point}"
    return f"entered {point}" if str(point).startswith("rt.") and " " not in str(point) \
        else f"at {point}"


class Ledger:
    """One runtime's books (``rt._ledger``) and its watchdog thread."""

    def __init__(self, rank: int, world: int, store, desync_timeout: float | None, prefix: str):
        self.rank, self.world, self.store = rank, world, store
        self.timeout = desync_timeout
        self.prefix = prefix
        self.n = 0  # collectives noted
        self.last_op = "collective"  # the op of the last one
        self.hash = 0
        self.points = 0  # points passed
        self.live = (0, 0, 0)  # (points, collectives, hash) after the last entry
        self.inside: str | None = None  # helper / phase in progress
        self.at: tuple = (0, 0, 0, "start")  # (point, hash, n, label) of the last point
        self.entries: deque = deque(maxlen=RING)
        self.total = 0  # entries ever made: the index of the next one
        self.history: deque = deque(maxlen=HISTORY)
        # an engine's gradient sync (DDP, FSDP2): synced backwards noted since the last
        # optimizer step, and whether one ever was (then a step without one is checked)
        self.syncs, self.synced_once = 0, False
        self.micro = 0  # rt.accumulate micro-steps since the last optimizer step
        self._keys: dict[int, tuple] = {}  # id(SyncCollective) -> (hash key, op, fields)
        self._answered = 0  # probes (diagnose) this rank's watchdog has answered
        self.error: DesyncError | None = None
        self._raised = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._launcher = _launcher_pid()

    # -- the main thread's books -----------------------------------------------------
    def note(self, op: str, tensor: torch.Tensor | None = None, helper: str | None = None) -> None:
        """One collective: counted, hashed, kept in the ring."""
        if self.error is not None:
            self.raise_error()
        self.note_quietly(op, tensor, helper)

    def note_quietly(self, op: str, tensor: torch.Tensor | None = None,
                     helper: str | None = None) -> None:
        """``note`` that never raises: for collectives an engine issues from inside
        backward (DDP's comm hook), where an exception would surface as torch's
        RuntimeError; a desync found meanwhile is raised at the next overdrive call."""
        self.n += 1
        self.last_op = op
        helper = helper or self.inside or "overdrive"
        dtype = str(tensor.dtype).removeprefix("torch.") if tensor is not None else ""
        shape = tuple(tensor.shape) if tensor is not None else ()
        self.hash = _crc32(f"{helper}:{op}:{dtype}:{shape}".encode(), self.hash)
        self._add(("c", helper, op, dtype, shape, self.n))

    def note_engine(self, entry, *, synced: bool = False) -> None:
        """What an engine issues by itself in one pass (DDP's buckets of a backward,
        FSDP's units of a forward): one entry, its hash key and fields read once. ``synced``:
        a backward's gradient sync. Never raises (it may run inside a module hook).

        It runs on every (micro-)step, so ``_add`` is inlined: each object touched costs
        more here than in a warm loop (measured in place: ~4 µs a call before)."""
        known = self._keys.get(id(entry))
        if known is None:
            known = self._keys[id(entry)] = self._engine_fields(entry)
        key, op, fields = known
        n = self.n = self.n + 1
        self.last_op = op
        h = self.hash = _crc32(key, self.hash)
        total = self.total
        self.entries.append((total, fields + (n,)))
        self.total = total + 1
        self.live = (self.points, n, h)
        if synced:
            self.syncs += 1

    @staticmethod
    def _engine_fields(entry) -> tuple[bytes, str, tuple]:
        shape = (entry.numel,)
        return (f"{entry.where}:{entry.op}:{entry.dtype}:{shape}".encode(), entry.op,
                ("c", entry.where, entry.op, entry.dtype, shape))

    def point(self, point: Any) -> None:
        """A sync point: an optimizer step (an int) or a helper/epoch label.

        At an optimizer step the number of ``rt.accumulate`` micro-steps it took is part
        of the hash (a rank that skipped one disagrees). A step with no synced backward
        since the last one, on a runtime whose engine synced gradients before, waits
        until the neighbours are seen there too (``_confirm``): a rank that skipped its
        backward must not issue its next collective against another rank's gradient
        sync — gloo aborts the process on a size mismatch, before anything can report.
        """
        if self.error is not None:
            self.raise_error()
        points = self.points = self.points + 1
        micro = 0
        if type(point) is int:  # an optimizer step (_add inlined: see note_engine)
            micro = self.micro
            h = self.hash = _crc32(_MICRO_KEYS[micro] if micro < len(_MICRO_KEYS)
                                   else b"s%d" % micro, self.hash)
            syncs = self.syncs
            skipped = syncs == 0 and self.synced_once
            if syncs:
                self.synced_once = True
            self.micro = self.syncs = 0
        else:
            h = self.hash = _crc32(str(point).encode(), self.hash)
            skipped = False
        n, total = self.n, self.total
        self.history.append((points, h, n, total))
        self.at = (points, h, n, point)
        self.entries.append((total, ("p", point, n, self.last_op, micro)))
        self.total = total + 1
        self.live = (points, n, h)  # after ``at``: the watchdog reads them in this order
        if skipped:
            self._confirm()

    def _confirm(self) -> None:
        """Wait until every neighbour is seen at this point or past it (their hashes are
        compared on the way), or a desync is found and raised. Bounded by the watchdog's
        stall check (desync_timeout)."""
        mine = self.at[0]
        while True:
            self.check()
            behind = False
            for peer in self._peers():
                theirs = self._read_pos(peer)
                finding = None if theirs is None else self._diverged(peer, theirs)
                if finding is not None:
                    self._post(finding)
                    self._await_error()
                behind = behind or theirs is None or theirs[0] < mine
            if not behind or self._thread is None or not self._thread.is_alive():
                return
            time.sleep(INTERVAL / 5)

    def _await_error(self, cause: BaseException | None = None) -> None:
        """A finding is posted: wait for the watchdog to build the error, and raise it."""
        deadline = time.monotonic() + GRACE + 4 * INTERVAL
        while self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.error is not None:
            self._raised = True
            raise self.error from cause

    def _add(self, entry: tuple) -> None:
        self.entries.append((self.total, entry))
        self.total += 1
        self.live = (self.points, self.n, self.hash)  # one snapshot the watchdog reads

    def check(self) -> None:
        if self.error is not None:
            self.raise_error()

    def raise_error(self):
        self._raised = True
        raise self.error

    @contextlib.contextmanager
    def helper(self, name: str, *, entry_check: bool = False):
        """A collective helper: a point, and the ledger its collectives are noted on.

        ``entry_check``: wait in the store until every rank has entered it too before any
        collective is issued (for rt.save/load/export, whose collectives must not pair
        with another call's); a rank alone there gets the DesyncError within
        desync_timeout.
        """
        if self.inside is not None:  # nested (rt.save gathers): the outer helper owns it
            token = _CURRENT.set(self)
            try:
                yield
            finally:
                _CURRENT.reset(token)
            return
        self.point(name)
        self.inside = name
        token = _CURRENT.set(self)
        try:
            if entry_check:
                self._wait_for_all(name)
            yield
        finally:
            _CURRENT.reset(token)
            self.inside = None

    def _wait_for_all(self, name: str) -> None:
        key = f"{self.prefix}/enter/{self.points}"
        if self.store.add(key, 1) == self.world:
            self.store.set(key + "/all", "1")
        while True:
            self.check()
            try:
                self.store.wait([key + "/all"], datetime.timedelta(seconds=INTERVAL))
                return
            except Exception:  # noqa: BLE001 — the store's timeout; the watchdog decides
                if self._thread is None or not self._thread.is_alive():
                    raise DesyncError(f"{name}: the ranks did not all enter it and the "
                                      "ledger's watchdog is not running") from None

    def wait(self, work) -> None:
        """Wait for an async collective in slices, raising a desync found meanwhile."""
        if work is None:
            return
        slice_ = datetime.timedelta(seconds=INTERVAL)
        while True:
            try:
                work.wait(timeout=slice_)
                return
            except RuntimeError as err:
                if not _slice_expired(err):
                    self.check()
                    raise
                self.check()

    # -- a collective that failed ----------------------------------------------------
    def diagnose(self, err: BaseException) -> None:
        """A collective raised ``err``: when it is the backend's (gloo, NCCL) and the
        ranks' ledgers disagree — a rank is elsewhere, it issued other collectives — raise
        the ``DesyncError`` naming both sides, from ``err``. Returns when they agree (the
        caller re-raises ``err`` untouched) or nothing could be learnt in time.

        This rank posts its entries and asks the others' watchdogs for theirs through the
        store (a probe, answered within ``INTERVAL``), waiting at most ``PROBE_WAIT`` s;
        a rank that is gone (killed, aborted) does not answer and is not compared.
        """
        if self.error is not None:
            self._raised = True
            raise self.error from err
        if not _backend_error(err) or self.store is None:
            return
        try:
            dumps = self._probe()
        except Exception:  # noqa: BLE001 — the store is gone too: nothing to learn
            return
        finding = _failed_finding(self.rank, dumps, err)
        if finding is None:
            return
        self._post(finding)
        self._await_error(err)

    def _probe(self) -> dict[int, dict]:
        k = self.store.add(f"{self.prefix}/probes", 1) - 1
        base = f"{self.prefix}/probe/{k}"
        self.store.set(f"{base}/dump/{self.rank}", json.dumps(self._dump()))
        self.store.set(base, str(self.rank))
        peers = self._peers()
        keys = {r: f"{base}/dump/{r}" for r in peers}
        deadline = time.monotonic() + PROBE_WAIT
        while time.monotonic() < deadline and not self.store.check(list(keys.values())):
            time.sleep(0.02)
        dumps = {self.rank: self._dump()}
        for r, key in keys.items():
            if self.store.check([key]):
                dumps[r] = json.loads(self.store.get(key))
        return dumps

    def _answer_probes(self) -> None:
        """The watchdog's side of ``diagnose``: post this rank's entries for each probe."""
        while self.store.check([f"{self.prefix}/probe/{self._answered}"]):
            key = f"{self.prefix}/probe/{self._answered}/dump/{self.rank}"
            if not self.store.check([key]):
                self.store.set(key, json.dumps(self._dump()))
            self._answered += 1

    def _dump(self) -> dict:
        """What a desync message is built from: the position, the recent entries and the
        points' hashes (where the ranks' books first differ: ``_first_divergence``)."""
        # the watchdog calls this while the main thread appends: list() copies a deque in
        # one C call under the GIL, where iterating it in Python could meet an append
        # (RuntimeError: deque mutated during iteration) and end the watchdog
        entries, history = list(self.entries), list(self.history)
        first = entries[0][0] if entries else self.total
        return {"rank": self.rank, "pos": list(self._position()),
                "entries": [(i, describe(e), _helper_point(e)) for i, e in entries],
                "points": [(p, h, i) for p, h, _, i in history if i >= first]}

    # -- the watchdog ----------------------------------------------------------------
    def start(self) -> None:
        self._publish(self._position())
        self._thread = threading.Thread(target=self._watch, name="overdrive-ledger",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog and close its store client (at exit too: a client dropped
        by a thread the interpreter froze aborts the process)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * INTERVAL + 1.0)
        self.store = None

    def _position(self) -> tuple:
        """(point, collectives, inside, hash at the point, label, last op, hash now): the
        last one None when the main thread moved on between the reads."""
        for _ in range(3):
            points, n, now = self.live
            point, h, _, label = self.at
            if point == points:
                break
        else:
            now = None
        return (point, n, self.inside or "", h, _label(label), self.last_op, now)

    def _publish(self, pos: tuple) -> None:
        self.store.set(f"{self.prefix}/pos/{self.rank}", json.dumps(pos))

    def _peers(self) -> list[int]:
        return sorted({(self.rank - 1) % self.world, (self.rank + 1) % self.world} - {self.rank})

    def _watch(self) -> None:
        seen: dict[int, tuple] = {}  # rank -> (position, monotonic time it was first seen)
        mine, mine_since = None, time.monotonic()
        try:
            while not self._stop.wait(INTERVAL):
                self._check_launcher()
                if self.error is not None:
                    self._await_raise()
                    return
                if self.store.check([f"{self.prefix}/desync"]):
                    self._conclude()
                    continue
                self._answer_probes()
                pos = self._position()
                now = time.monotonic()
                if pos != mine:
                    mine, mine_since = pos, now
                    self._publish(pos)
                for peer in self._peers():
                    theirs = self._read_pos(peer)
                    if theirs is None:
                        continue
                    if seen.get(peer, (None,))[0] != theirs:
                        seen[peer] = (theirs, now)
                    finding = self._compare(mine, mine_since, peer, *seen[peer], now)
                    if finding is not None:
                        self._post(finding)
                        self._conclude()
                        break
        except Exception as err:  # noqa: BLE001 — a watchdog must never kill the run
            if not self._stop.is_set():
                log.debug("overdrive: ledger watchdog stopped: %s", err)

    def _read_pos(self, peer: int) -> tuple | None:
        key = f"{self.prefix}/pos/{peer}"
        if not self.store.check([key]):
            return None
        return tuple(json.loads(self.store.get(key)))

    def _diverged(self, peer: int, theirs: tuple) -> dict | None:
        """A mismatch with a neighbour's position, when this rank has passed its point:
        it reached it with another hash, or it has issued more collectives since than
        this rank had issued by its next point (one of them came before that point on
        its side, after it on this one)."""
        their_point, their_n, their_hash = theirs[0], theirs[1], theirs[3]
        points, n, now = self.live
        if (their_point, their_n) == (points, n) and None not in (theirs[6], now) \
                and theirs[6] != now:  # the same count of points and collectives, not the same ones
            return {"reason": "mismatch", "ranks": [self.rank, peer], "point": their_point}
        if their_point > self.at[0]:
            return None
        ours = self._at_point(their_point)
        if ours is not None and ours[0] != their_hash:
            return {"reason": "mismatch", "ranks": [self.rank, peer], "point": their_point}
        following = self._at_point(their_point + 1)
        if following is not None and their_n > following[1]:
            return {"reason": "mismatch", "ranks": [self.rank, peer], "point": their_point + 1}
        return None

    def _compare(self, mine: tuple, mine_since: float, peer: int, theirs: tuple,
                 theirs_since: float, now: float) -> dict | None:
        finding = self._diverged(peer, theirs)
        if finding is not None:
            return finding
        if self.timeout is None or mine[:3] == theirs[:3] or PATIENT & {mine[2], theirs[2]}:
            return None
        still = min(now - mine_since, now - theirs_since)
        if still >= self.timeout:
            return {"reason": "stall", "ranks": [self.rank, peer], "seconds": round(still, 1)}
        return None

    def _at_point(self, point: int) -> tuple[int, int] | None:
        """(hash, collectives issued) when this rank reached ``point`` (None: not kept)."""
        if point == 0:
            return 0, 0
        for p, h, n, _ in reversed(list(self.history)):  # a snapshot: see _dump
            if p == point:
                return h, n
            if p < point:
                break
        return None

    def _post(self, finding: dict) -> None:
        """Post the finding unless another rank posted one first (the first one wins)."""
        self.store.compare_set(f"{self.prefix}/desync", "", json.dumps(finding))

    def _conclude(self) -> None:
        """Every rank posts its entries, reads the others' and builds the same error."""
        finding = json.loads(self.store.get(f"{self.prefix}/desync"))
        self.store.set(f"{self.prefix}/dump/{self.rank}", json.dumps(self._dump()))
        self.store.add(f"{self.prefix}/acks", 1)
        deadline = time.monotonic() + GRACE
        while self.store.add(f"{self.prefix}/acks", 0) < self.world \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = range(self.world) if self.world <= _ALL_DUMPS else sorted(set(finding["ranks"]))
        dumps = {}
        for r in ranks:
            key = f"{self.prefix}/dump/{r}"
            if self.store.check([key]):
                dumps[r] = json.loads(self.store.get(key))
        self.error = DesyncError(desync_message(finding, dumps, self.timeout))
        log.error("overdrive: rank %d: DesyncError: %s", self.rank, self.error)

    def _await_raise(self) -> None:
        """Give the main thread GRACE s to raise; a main thread stuck where Python cannot
        interrupt it (a C++ collective, a sleep) ends the process instead."""
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline:
            if self._raised or self._stop.is_set():
                return
            time.sleep(0.05)
        print(f"overdrive: rank {self.rank}: the main thread is blocked; exiting on "
              f"DesyncError: {self.error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _check_launcher(self) -> None:
        if self._launcher is not None and not _alive(self._launcher):
            print(f"overdrive: rank {self.rank}: the launcher (pid {self._launcher}) is gone; "
                  "exiting", file=sys.stderr, flush=True)
            os._exit(1)


# --------------------------------------------------------------------------- messages


def desync_message(finding: dict, dumps: dict[int, dict], timeout: float | None) -> str:
    """What every rank raises: what was found, and where each rank is."""
    where = {r: _where(d) for r, d in dumps.items()}
    a, b = sorted(finding["ranks"])
    if finding["reason"] in ("mismatch", "failed"):
        head = f"ranks {a} and {b} issued different collectives" \
            if finding["reason"] == "mismatch" else \
            f"a collective failed on rank {finding['failed']} ({finding['error']}) because " \
            f"ranks {a} and {b} were not in the same one"
        alone = None
        if a in dumps and b in dumps:
            text, alone = _first_divergence(a, dumps[a], b, dumps[b])
            head += f"; first divergent entry: {text}"
    else:
        head = (f"ranks {a} and {b} have stood still at different places for "
                f"{finding['seconds']} s (desync_timeout={timeout})")
        alone = _alone(dumps)
        if a in dumps and b in dumps:  # stuck in different collectives: which ones
            text, _ = _first_divergence(a, dumps[a], b, dumps[b])
            if NOTHING not in text and text != "not in the recent entries":
                head += f"; first divergent entry: {text}"
    if alone:
        head = f"{alone}; {head}"
    shown = "; ".join(where[r] for r in sorted(where)[:8])
    more = f" (and {len(where) - 8} more)" if len(where) > 8 else ""
    missing = sorted(set(finding["ranks"]) - set(dumps))
    gone = f"; rank(s) {missing} did not answer" if missing else ""
    return f"{head}. Now: {shown}{more}{gone}"


def _where(dump: dict) -> str:
    point, n, inside, _, label, op = dump["pos"][:6]
    if inside:  # in a helper (its point is the last one) or in rt.backward after a step
        where = f"is in {inside}" if label == f"entered {inside}" else \
            f"is in {inside} ({label.removeprefix('at ')})"
    elif label.startswith("entered "):
        where = f"has left {label.removeprefix('entered ')}"
    else:
        where = label.replace("at ", "is at ", 1)
    return f"rank {dump['rank']} {where} ({_last(n, op)})"


def _helper_point(entry: tuple) -> str | None:
    """The helper an entry enters (a point such as "rt.save"), else None."""
    if entry[0] == "p" and isinstance(entry[1], str) and entry[1].startswith("rt.") \
            and " " not in entry[1]:
        return entry[1]
    return None


def _alone(dumps: dict[int, dict]) -> str | None:
    """"rt.save called on ranks [0] only" when some ranks wait inside a collective
    helper the others never entered."""
    inside = {r: d["pos"][2] for r, d in dumps.items()}
    helpers = {h for h in inside.values() if h.startswith("rt.") and h != "rt.backward"}
    for helper in sorted(helpers):
        ranks = [r for r, h in inside.items() if h == helper]
        if len(ranks) < len(dumps):
            return f"{helper} called on ranks {ranks} only; every rank must call it"
    return None


def _first_divergence(a: int, da: dict, b: int, db: dict) -> tuple[str, str | None]:
    """The first entry where two ranks differ, and "H called on ranks [r] only" when one
    of them entered a collective helper H there.

    The search starts at the last point whose hash both ranks agree on (their books are
    the same up to it), so a divergence found late — the ranks ran on meanwhile — is
    still named where it happened while both rings hold it; without such a point, at
    the first entry both rings hold (an entry one ring has dropped is not a difference).
    """
    ea = {e[0]: (e[1], e[2]) for e in da["entries"]}
    eb = {e[0]: (e[1], e[2]) for e in db["entries"]}
    start = _agreed_until(da.get("points", ()), db.get("points", ()))
    if start == -1:
        return f"older than the last {RING} entries kept", None
    if start is None:
        start = max(min(ea, default=0), min(eb, default=0))
    for i in sorted(i for i in set(ea) | set(eb) if i >= start):
        (ta, ha), (tb, hb) = ea.get(i, (NOTHING, None)), eb.get(i, (NOTHING, None))
        if ta != tb:
            alone = None
            if ha and ha != hb:
                alone = f"{ha} called on ranks [{a}] only; every rank must call it"
            elif hb and hb != ha:
                alone = f"{hb} called on ranks [{b}] only; every rank must call it"
            return f"rank {a} {ta}, rank {b} {tb} (entry #{i})", alone
    return "not in the recent entries", None


def _agreed_until(pa, pb) -> int | None:
    """The entry index of the last point two ranks' points lists ((point, hash, entry
    index), ascending) agree on before the first one that differs (or the last common
    one, when none differs: the divergence came after it); -1 when the first common
    point already differs (the divergence is older than the books); None when they share
    no point."""
    hb = {p: (h, i) for p, h, i in pb}
    last = None
    for p, h, i in pa:
        theirs = hb.get(p)
        if theirs is None:
            continue
        if theirs != (h, i):
            return -1 if last is None else last
        last = i
    return last


def _failed_finding(rank: int, dumps: dict[int, dict], err: BaseException) -> dict | None:
    """After a failed collective: the finding when another rank's ledger disagrees
    with this one's (an entry differs, or one has gone on: they were not in the same
    collective), else None — the ranks were in the same one; the error is the backend's."""
    mine = dumps[rank]
    for peer in sorted(set(dumps) - {rank}):
        theirs = dumps[peer]
        text, _ = _first_divergence(rank, mine, peer, theirs)
        if text != "not in the recent entries" or mine["pos"][:2] != theirs["pos"][:2]:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return {"reason": "failed", "ranks": sorted([rank, peer]), "failed": rank,
                    "error": _short(first)}
    return None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _backend_error(err: BaseException) -> bool:
    """An error of the communication backend (gloo, NCCL, the store), not of user code."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed"))


def _slice_expired(err: BaseException) -> bool:
    """``work.wait(timeout=...)``'s own expiry (the wait ends, the collective goes on), not
    the process group's timeout (gloo: "Timed out waiting ...ms for recv")."""
    text = str(err)
    return "timed out" in text.lower() and not _backend_error(err)


# --------------------------------------------------------------------------- wiring


def _launcher_pid() -> int | None:
    pid = os.environ.get("OVERDRIVE_LAUNCHER_PID")
    return int(pid) if pid and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _store_client():
    """A client of torchrun's TCP store of its own (the default group's store as a
    fallback): the watchdog's round trips never queue behind the main thread's."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        try:
            return dist.TCPStore(host, int(port), is_master=False,
                                 timeout=datetime.timedelta(seconds=60),
                                 wait_for_workers=False)
        except Exception:  # noqa: BLE001
            pass
    return dist.distributed_c10d._get_default_store()


def make_ledger(desync_timeout: float | None) -> Ledger | None:
    """The ledger of a new runtime under a process group of 2+ ranks (else None).
    OVERDRIVE_LEDGER=0 turns it off (benchmarks/step_overhead.py measures it that way)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if os.environ.get("OVERDRIVE_LEDGER", "1") == "0":
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"overdrive/ledger/{run}/{restart}/{next(_INSTANCES)}"
    ledger = Ledger(dist.get_rank(), dist.get_world_size(), _store_client(), desync_timeout,
                    prefix)
    ledger.start()
    return ledger


# --------------------------------------------------------------------------- collectives


def current() -> Ledger | None:
    return _CURRENT.get()


def collective(_name: str, _fn: Callable, *args: Any, tensor: torch.Tensor | None = None,
               **kwargs: Any) -> Any:
    """``_fn(*args, **kwargs)`` — a torch collective named ``_name`` — noted on the
    current ledger and, when it can be, waited for in slices (a desync found meanwhile is
    raised)."""
    ledger = _CURRENT.get()
    if ledger is None:
        return _fn(*args, **kwargs)
    ledger.note(_name, tensor)
    try:
        if tensor is None or tensor.device.type != "cpu":
            # objects and barriers: torch's own call. Accelerator collectives too: a timed
            # wait on NCCL blocks the host and may abort the communicator on expiry
            return _fn(*args, **kwargs)
        ledger.wait(_fn(*args, async_op=True, **kwargs))  # gloo: in slices
    except RuntimeError as err:
        ledger.diagnose(err)  # raises DesyncError when the ranks' ledgers disagree
        raise
    return None


def note(op: str, tensor: torch.Tensor | None = None) -> None:
    """Note a collective issued by code that calls torch itself."""
    ledger = _CURRENT.get()
    if ledger is not None:
        ledger.note(op, tensor)
