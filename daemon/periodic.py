"""The daemon's periodic chores, on an apscheduler ``BackgroundScheduler``.

- **rescan** every ``jobs.rescan``: events get lost (an overflowed inotify
  queue, a network mount, a folder re-created while nobody watched it), so
  the watched folders are walked again for files without an up-to-date
  sidecar, with the same code as ``vlwatch scan`` (paperless-ngx added the
  same after a file was stranded in a watcher gap, #13011 / PR #13013);
- **idle unload** once the model has had nothing to do for ``model.idle_unload``:
  GPU memory is freed and the next job loads it again;
- **prune** finished history older than ``jobs.keep_history``.

Deliberately not here: retries.  A failed job waits in the queue with a
``not_before`` time and the worker picks it up when that passes, so a retry
survives a restart and needs no timer.  The chores themselves live in the
service; this module only says *when* they run, each at most once at a
time, skipping runs missed while the machine slept instead of piling them up.
"""

from __future__ import annotations

import logging
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.config import Config

log = logging.getLogger(__name__)

#: How often history is pruned; it only has to keep up with days.
PRUNE_EVERY = 6 * 3600.0


def idle_check_interval(idle_unload: float) -> float:
    """Check for idleness often enough to unload within ~10% of ``idle_unload`` (1 s to 60 s)."""
    return max(1.0, min(60.0, idle_unload / 10))


class Periodic:
    """Runs the service's chores on a schedule taken from the config.

    Args:
        rescan: walk the watched folders for missed files.
        idle_check: unload the model if it has been idle long enough.
        prune: delete old history.
    """

    def __init__(self, *, rescan: Callable[[], None], idle_check: Callable[[], None], prune: Callable[[], None]) -> None:
        self._chores = {"rescan": rescan, "idle-unload": idle_check, "prune": prune}
        self._scheduler = BackgroundScheduler(
            daemon=True,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def start(self, config: Config) -> None:
        self.apply(config)
        self._scheduler.start()

    def apply(self, config: Config) -> None:
        """(Re)schedule every chore from ``config``; a chore whose interval is 0 is off."""
        intervals = {
            "rescan": config.jobs.rescan,
            "idle-unload": idle_check_interval(config.model.idle_unload) if config.model.idle_unload > 0 else 0.0,
            "prune": PRUNE_EVERY if config.jobs.keep_history > 0 else 0.0,
        }
        for name, seconds in intervals.items():
            if self._scheduler.get_job(name) is not None:
                self._scheduler.remove_job(name)
            if seconds > 0:
                self._scheduler.add_job(self._guarded(name), "interval", seconds=seconds, id=name, name=name)
                log.debug("chore %s every %gs", name, seconds)

    def _guarded(self, name: str) -> Callable[[], None]:
        chore = self._chores[name]

        def run() -> None:
            try:
                chore()
            except Exception:  # a failed chore is logged and tried again next time
                log.exception("chore %s failed", name)

        return run

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
