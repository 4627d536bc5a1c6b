"""The worker threads that run jobs, shared by every slot of every model (`_Workers`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

# How long a worker thread that is not the last one to go idle waits for another job before it ends (see _Workers).
WORKER_LINGER_S = 5.0


_Task = Callable[[], Callable[[], None]]  # a job for a worker thread: returns the report of its end


class _Workers:
    """The threads that run jobs, shared by every slot of every model: a job borrows a slot's llama.cpp context and
    one of these threads.

    llama.cpp's CPU backend runs on OpenMP, whose worker team belongs to the thread that calls it. A thread that
    lives on keeps its team: a new thread per job also started a team at every first decode, some milliseconds
    before the first token. But every idle team still counts for libgomp: once teams hold more threads than there
    are CPUs, it stops spinning between steps and each decode gets several times slower. So a job runs on the thread
    that went idle last (a steady stream of jobs keeps reusing one), a thread starts only for a job that finds none
    idle, and an idle thread ends after `linger_s` unless it is the one that went idle last.
    """

    def __init__(self, name: str, linger_s: float = WORKER_LINGER_S) -> None:
        self._name = name
        self._linger_s = linger_s
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the one that went idle last at the end
        self._all: set[_Worker] = set()
        self._started = 0
        self._closed = False

    def run(self, work: _Task) -> None:
        """Hand `work` to an idle thread, or to a new one; raises RuntimeError when no thread can start.

        `work` returns a report to make once the thread counts as idle again, so that whoever hears it and hands over
        the next job at once finds the thread idle rather than start another."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._idle:
                self._idle.pop().inbox.put(work)
                return
            self._started += 1
            worker = _Worker(self._serve, f"{self._name}-{self._started}")
            self._all.add(worker)
        worker.inbox.put(work)
        try:
            worker.thread.start()
        except RuntimeError:
            with self._lock:
                self._all.discard(worker)
            raise

    def close(self) -> None:
        """Let every thread finish the job it runs, if any, and end. Blocks."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
        for worker in workers:
            worker.inbox.put(None)
        for worker in workers:
            worker.thread.join()

    def _serve(self, worker: _Worker) -> None:
        work = worker.inbox.get()
        while work is not None:
            report = work()
            with self._lock:
                self._idle.append(worker)
            report()
            work = self._next(worker)

    def _next(self, worker: _Worker) -> _Task | None:
        while True:
            try:
                return worker.inbox.get(timeout=self._linger_s)
            except queue.Empty:
                with self._lock:
                    # Not idle any more: a job is on its way. Idle last: stay for the next job.
                    if worker in self._idle and self._idle[-1] is not worker:
                        self._idle.remove(worker)
                        self._all.discard(worker)
                        return None


class _Worker:
    def __init__(self, serve: Callable[[_Worker], None], name: str) -> None:
        self.inbox: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        # A daemon, so that an engine nobody closed does not keep the process alive; Engine.close ends it properly.
        self.thread = threading.Thread(target=serve, args=(self,), name=name, daemon=True)
