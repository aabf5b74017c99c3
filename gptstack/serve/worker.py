"""The thread that owns the model. Requests' sequences wait in a queue and join the engine's running batch
between decode steps; each token, and each sequence's end, is handed back through the callbacks they came with."""
from __future__ import annotations

import threading
from typing import Callable

from ..generate import Engine, Sequence

Done = Callable[[Sequence, "BaseException | None"], None]  # called once per sequence, from the engine's thread


class Worker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: list[Sequence] = []
        self.on_done: dict[Sequence, Done] = {}
        self.lock = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gptstack-engine", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence], on_done: Done) -> None:
        with self.lock:
            for s in seqs:
                self.on_done[s] = on_done
            self.waiting += seqs
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join()

    def stats(self) -> dict:
        e = self.engine
        k = e.cache.k  # read once: the engine's thread may free it meanwhile
        return {"slots": e.slots, "running": e.slots - e.free_slots(), "waiting": len(self.waiting), "decode_steps": e.steps,
                "batch_rows": e.rows, "cache_columns": e.valid.size(1), "cache_bytes": 0 if k is None else 2 * k.nbytes}

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.engine.busy and not self.waiting:
                    self.lock.wait()
                if self.stopping:
                    return
                dropped = [s for s in self.waiting if s.cancelled]
                waiting = [s for s in self.waiting if not s.cancelled]
                take = self.engine.free_slots()
                newcomers, self.waiting = waiting[:take], waiting[take:]
            for s in dropped:
                self._finish(s, None)
            try:
                if newcomers:
                    self.engine.admit(newcomers)
                finished = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail what was in flight, keep serving
                old = self.engine
                failed = [s for s in old.running if s is not None] + [s for s in newcomers if s.slot < 0]
                self.engine = Engine(old.model, old.slots, old.pad_id, old.decode)
                self.engine.steps = old.steps
                for s in failed:
                    self._finish(s, e)
                continue
            for s in finished:
                self._finish(s, None)

    def _finish(self, s: Sequence, error: BaseException | None) -> None:
        with self.lock:
            on_done = self.on_done.pop(s, None)
        if on_done is not None:
            on_done(s, error)
