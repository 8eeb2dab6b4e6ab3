"""A simulated slot engine for the feed's host cost: ``VLWATCH_PLUGINS=benchmarks.sim_gpu_backend``.

Registers ``sim-gpu``: a backend that runs its own admission loop
(``serve(feed)``) as the transformers slot engine does, with the GPU's work
replaced by sleeps (which release the GIL, as waiting on a CUDA sync does):
each decode step of ``SIM_STEP_MS`` advances every slot by one token, each
admitted prompt costs ``SIM_PREFILL_MS`` before its slot starts, a slot
finishes after ``SIM_TOKENS`` tokens.  Everything the loop does besides
sleeping is the feed's cost on the GPU thread (``next``, ``deliver``,
``more``): with a real GPU that time is the GPU idling between steps.

``SIM_REPORT`` names a JSON file written at the end of each ``serve``: wall
seconds, steps, answers, seconds spent in each feed call, the slowest call.
Used by ``benchmarks/feed_overhead.py``; never by the tests.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from daemon.backends import Answer, Feed, Request, register
from daemon.backends.base import BaseBackend, Capabilities
from daemon.config import ModelConfig


def _ms(name: str, default: float) -> float:
    return float(os.environ.get(name, default)) / 1000


class SimGpuBackend(BaseBackend):
    name = "sim-gpu"
    capabilities = Capabilities(serve=True)

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self.slots = int(os.environ.get("SIM_SLOTS", 256))
        self.step = _ms("SIM_STEP_MS", 20)
        self.prefill = _ms("SIM_PREFILL_MS", 70)
        self.tokens = int(os.environ.get("SIM_TOKENS", 64))
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def auto_batch_size(self, **_: object) -> int:
        return self.slots

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self._loaded = True
        time.sleep(self.prefill * len(requests) + self.step * self.tokens)
        return [Answer(text="sim", new_tokens=self.tokens) for _ in requests]

    def serve(self, feed: Feed) -> None:
        self._loaded = True
        spent = {"next": 0.0, "deliver": 0.0, "more": 0.0, "wait": 0.0}
        slowest = {"call": "", "seconds": 0.0}
        active: dict[object, int] = {}  # key -> tokens left
        steps = answers = 0
        started = time.perf_counter()
        begun, first_item, idle_steps = time.time(), None, 0
        last_delivered = None

        def timed(call: str, fn, *args):  # noqa: ANN001, ANN202
            t = time.perf_counter()
            out = fn(*args)
            dt = time.perf_counter() - t
            spent[call] += dt
            if dt > slowest["seconds"]:
                slowest.update(call=call, seconds=dt)
            return out

        while not feed.stopping():
            admitted = 0
            while len(active) < self.slots and admitted < 3:  # a prefill round takes about three images
                item = timed("next", feed.next)
                if item is None:
                    break
                active[item.key] = self.tokens
                admitted += 1
                first_item = first_item or time.time()
            if admitted:
                time.sleep(self.prefill * admitted)
            if not active:
                if not timed("more", feed.more):
                    break
                timed("wait", feed.wait, 0.05)
                continue
            time.sleep(self.step)
            steps += 1
            idle_steps += len(active) < self.slots and admitted == 0  # slots free, nothing came
            for key in list(active):
                active[key] -= 1
                if active[key] <= 0:
                    del active[key]
                    timed("deliver", feed.deliver, key, Answer(text="sim answer", new_tokens=self.tokens))
                    answers += 1
                    last_delivered = time.time()
        report = os.environ.get("SIM_REPORT")
        if report:
            wall = time.perf_counter() - started
            with open(report, "a", encoding="utf-8") as f:
                f.write(json.dumps({"wall_s": wall, "steps": steps, "answers": answers, "spent_s": spent,
                                    "slowest": slowest, "step_s": self.step, "prefill_s": self.prefill,
                                    "serve_started_at": begun, "first_item_at": first_item,
                                    "steps_without_admission": idle_steps,
                                    "last_delivered_at": last_delivered}) + "\n")

    def unload(self) -> None:
        self._loaded = False


register("sim-gpu", SimGpuBackend)
