"""One rank's error ends every rank within seconds, and the error is printed once.

An exception on one rank inside a collective path (a shape check in the dispatch, a bad node id, a lock
held by another run on rank 0) leaves the other ranks blocked in their next collective until the process
group times out (30 min), or printing "connection closed by peer" tracebacks that bury the real error;
under NCCL, or across nodes where no launcher kills the survivors, they simply wait.

`FailFast` uses the rendezvous store every rank already shares (MASTER_ADDR:MASTER_PORT, a second client
connection of its own): a failing rank publishes `{rank, exit code, message}` under one key (the first
publisher wins; a different message from a later one is printed too), waits until every other rank has
seen it (at most `grace_s`), and exits with its code. On every rank a daemon thread polls that key
(`poll_s`); when it appears the rank prints one line naming the failed rank and leaves at once with the
same exit code, from whatever collective it was blocked in (`os._exit`: nothing there can be cleaned up
safely); rank 0, which hosts the store, first waits (at most `grace_s`) until the failed rank is done
with it. A store that goes away (rank 0 finished and exited) stops the watcher quietly.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

KEY, SEEN, DONE = "unirestorer/fail_fast/error", "unirestorer/fail_fast/seen", "unirestorer/fail_fast/done"


class FailFast:
    def __init__(self, rank: int, world_size: int, poll_s: float = 0.2, grace_s: float = 5.0) -> None:
        self.rank, self.world, self.poll_s, self.grace_s = rank, world_size, poll_s, grace_s
        self.store: dist.TCPStore | None = None
        self._stop = threading.Event()
        self._counted = threading.Lock()
        self._has_counted = False
        self._thread: threading.Thread | None = None

    def start(self) -> FailFast:
        """Connect to the rendezvous store and start watching (no-op for a world of one)."""
        if self.world <= 1:
            return self
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                                   is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
        self._thread = threading.Thread(target=self._watch, name="fail-fast", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Normal end: stop watching (call before the process group is destroyed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)

    def _count_seen(self) -> None:
        with self._counted:
            if not self._has_counted and self.store is not None:
                self._has_counted = True
                self.store.add(SEEN, 1)

    def _watch(self) -> None:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                              is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
        while not self._stop.wait(self.poll_s):
            try:
                if not store.check([KEY]):
                    continue
                report = json.loads(store.get(KEY))
            except Exception:  # the store's host (rank 0) is gone: a normal end, or a crash the launcher sees
                return
            if report["rank"] == self.rank or self._stop.is_set():
                continue
            print(f"[rank {self.rank}] stopping: rank {report['rank']} failed (exit {report['code']}); "
                  f"its error is printed above", file=sys.stderr, flush=True)
            try:
                self._count_seen()
                if self.rank == 0:  # rank 0 hosts the store: stay until the failed rank is done with it
                    deadline = time.monotonic() + self.grace_s
                    while not store.check([DONE]) and time.monotonic() < deadline:
                        time.sleep(self.poll_s / 2)
            finally:
                os._exit(report["code"])

    def fail(self, code: int, message: str) -> int:
        """This rank failed: print `message` (unless another rank already printed the same), make every
        rank stop, then return `code` (the caller exits with it)."""
        if self.store is None:
            print(message, file=sys.stderr, flush=True)
            return code
        self.stop()  # this rank's own watcher must not exit it while it reports
        mine = json.dumps({"rank": self.rank, "code": code, "message": message})
        try:
            first = json.loads(self.store.compare_set(KEY, "", mine))
        except Exception:  # the store's host is gone (rank 0 died first): nobody else is left to tell
            print(message, file=sys.stderr, flush=True)
            return code
        if first["rank"] == self.rank or _gist(first["message"]) != _gist(message):
            print(message, file=sys.stderr, flush=True)
        try:
            self._count_seen()
            if first["rank"] == self.rank:  # keep the store up until every rank has read the error
                deadline = time.monotonic() + self.grace_s
                while int(self.store.add(SEEN, 0)) < self.world and time.monotonic() < deadline:
                    time.sleep(self.poll_s / 2)
            self.store.set(DONE, str(self.rank))
        except Exception:  # the host (rank 0) read the error and left, taking the store with it
            pass
        return code


def _gist(message: str) -> str:
    """The message without its `[rank N]` prefix (ranks failing the same way print it once)."""
    last = message.strip().splitlines()[-1] if message.strip() else ""
    return last.split("] ", 1)[1] if last.startswith("[rank ") and "] " in last else last
