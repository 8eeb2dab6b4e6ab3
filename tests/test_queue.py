"""The durable queue: migrations, idempotent enqueue, claiming, retries, recovery.

These run on a real SQLite file in tmp_path; no model is involved.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.store.keys import content_hash
from daemon.store.migrations import MIGRATIONS, migrate
from daemon.store.queue import Candidate, Queue
from daemon.store.state import StateLock


def cand(path: str = "/w/a.png", rule: str = "describe", digest: str = "h1", **kw: object) -> Candidate:
    return Candidate(Path(path), rule, digest, kw.pop("size", 10), kw.pop("mtime_ns", 1), **kw)  # type: ignore[arg-type]


@pytest.fixture
def queue(tmp_path: Path):
    with Queue(tmp_path / "state" / "state.db") as q:
        yield q


# ------------------------------------------------------------------ migrations


def test_migrations_from_blank_database(tmp_path: Path) -> None:
    db_path = tmp_path / "state.db"
    Queue(db_path).close()
    db = sqlite3.connect(db_path)
    names = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [m.__name__ for m in MIGRATIONS]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "meta", "_migrations"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Opening again applies nothing.
    assert migrate(db) == []


def test_every_migration_function_is_registered_in_order() -> None:
    # A migration written without its @migration decorator (a merge once lost
    # m020's) silently never runs: every m### function must be in MIGRATIONS, in name order.
    import daemon.store.migrations as q

    defined = sorted(name for name in vars(q) if name[:1] == "m" and name[1:4].isdigit() and name[4:5] == "_")
    assert [m.__name__ for m in MIGRATIONS] == defined


def test_migrations_from_the_first_schema_keep_data(tmp_path: Path) -> None:
    db_path = tmp_path / "state.db"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    MIGRATIONS[0](db)
    db.execute("INSERT INTO _migrations VALUES (?, 0)", (MIGRATIONS[0].__name__,))
    db.execute("INSERT INTO jobs (path, rule, hash, size, mtime_ns, state, queued_at)"
               " VALUES ('/w/old.png', 'describe', 'h0', 1, 1, 'done', 0)")
    db.close()
    with Queue(db_path) as q:
        assert [j.path for j in q.history()] == [Path("/w/old.png")]
        q.set_meta("model", {"loaded": True})  # a table from a later migration
        assert q.meta()["model"] == {"loaded": True}


# --------------------------------------------------------------------- enqueue


def test_enqueue_is_idempotent_on_path_rule_and_hash(queue: Queue) -> None:
    assert len(queue.enqueue([cand()])) == 1
    assert queue.enqueue([cand()]) == []  # queued already
    assert len(queue.enqueue([cand(rule="ocr")])) == 1  # another rule is another job
    [job] = queue.claim(1)
    assert queue.enqueue([cand()]) == []  # running already
    queue.finish([(job.id, [Path("/w/a.png.describe.md")], 0.1)])
    assert queue.enqueue([cand()]) == []  # done with these bytes
    assert queue.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 0}


def test_new_bytes_while_queued_update_the_job(queue: Queue) -> None:
    [first] = queue.enqueue([cand(digest="h1")])
    [again] = queue.enqueue([cand(digest="h2", size=20)])
    job = queue.job(again.id)
    assert again.id == first.id and job is not None and job.hash == "h2" and job.size == 20
    assert len(queue.history()) == 1


def test_back_to_the_bytes_being_processed_drops_the_queued_job(queue: Queue) -> None:
    queue.enqueue([cand(digest="A")])
    [running] = queue.claim(1)
    queue.enqueue([cand(digest="B")])  # changed while running...
    assert queue.enqueue([cand(digest="A")]) == []  # ...and back: the running job covers it
    assert [(j.id, j.state) for j in queue.history()] == [(running.id, "running")]


def test_the_sidecar_check_is_only_asked_when_it_matters(queue: Queue) -> None:
    asked = []

    def missing() -> bool:
        asked.append(1)
        return True

    queue.enqueue([cand(redo=missing, seen_at=time.time())])  # new: no need to ask
    assert asked == []
    [job] = queue.claim(1)
    queue.finish([(job.id, [], 0.1)])
    assert len(queue.enqueue([cand(redo=missing, seen_at=time.time() + 1)])) == 1
    assert asked == [1]


def test_new_bytes_after_done_or_while_running_are_a_new_job(queue: Queue) -> None:
    queue.enqueue([cand(digest="h1")])
    [job] = queue.claim(1)
    [second] = queue.enqueue([cand(digest="h2")])  # changed while running
    assert second.id != job.id
    queue.finish([(job.id, [], 0.1)])
    # A -> B -> A: the sidecar now holds B's answer, so A's bytes are new again.
    [b] = queue.claim(1)
    queue.finish([(b.id, [], 0.1)])
    assert len(queue.enqueue([cand(digest="h1")])) == 1


def test_redo_only_when_the_sidecar_is_missing_and_not_rewritten_since(queue: Queue) -> None:
    queue.enqueue([cand()])
    [job] = queue.claim(1)
    seen_before = time.time()
    time.sleep(0.01)
    queue.finish([(job.id, [], 0.1)])
    # The scan saw the sidecar missing before the job finished: no redo.
    assert queue.enqueue([cand(redo=True, seen_at=seen_before)]) == []
    # Missing after it finished (the user deleted it): redo.
    assert len(queue.enqueue([cand(redo=True, seen_at=time.time())])) == 1


def test_touch_keeps_the_job_and_records_the_new_mtime(queue: Queue) -> None:
    queue.enqueue([cand(mtime_ns=1)])
    [job] = queue.claim(1)
    queue.finish([(job.id, [], 0.1)])
    assert queue.enqueue([cand(mtime_ns=5)]) == []
    assert queue.latest(Path("/w/a.png"), "describe").mtime_ns == 5  # type: ignore[union-attr]


def test_ten_thousand_files_queue_in_one_fast_transaction(queue: Queue) -> None:
    batch = [cand(path=f"/w/{i}.png", digest=str(i)) for i in range(10_000)]
    start = time.perf_counter()
    assert len(queue.enqueue(batch)) == 10_000
    elapsed = time.perf_counter() - start
    assert queue.counts()["queued"] == 10_000
    assert elapsed < 5.0, f"enqueue of 10,000 took {elapsed:.2f}s"  # ~0.3s on an idle laptop


# ----------------------------------------------------------- claim and results


def test_claim_is_fifo_counts_attempts_and_respects_backoff(queue: Queue) -> None:
    queue.enqueue([cand(path=f"/w/{i}.png") for i in range(3)])
    jobs = queue.claim(2)
    assert [j.path.name for j in jobs] == ["0.png", "1.png"]
    assert all(j.state == "running" and j.attempts == 1 for j in jobs)
    queue.fail(jobs[0].id, "boom", retry_at=time.time() + 60)
    assert [j.path.name for j in queue.claim(5)] == ["2.png"]  # 0.png waits for its backoff
    assert queue.next_due() == pytest.approx(time.time() + 60, abs=2)
    [retried] = queue.claim(5, now=time.time() + 61)
    assert retried.id == jobs[0].id and retried.attempts == 2 and retried.error == "boom"
    queue.fail(retried.id, "boom again", retry_at=None)
    [failed] = queue.failures()
    assert failed.state == "failed" and failed.error == "boom again"


def test_release_gives_the_attempt_back(queue: Queue) -> None:
    queue.enqueue([cand()])
    [job] = queue.claim(1)
    queue.release([job.id], not_before=time.time() + 30)
    again = queue.job(job.id)
    assert again is not None and again.state == "queued" and again.attempts == 0
    assert queue.claim(1) == []


def test_drop_forgets_the_job(queue: Queue) -> None:
    queue.enqueue([cand()])
    [job] = queue.claim(1)
    queue.drop(job.id)
    assert queue.history() == []


def test_retry_requeues_failed_jobs_with_fresh_attempts(queue: Queue) -> None:
    queue.enqueue([cand(path="/w/a.png"), cand(path="/w/b.png")])
    for job in queue.claim(2):
        queue.fail(job.id, "bad", retry_at=None)
    a, b = queue.failures()[::-1]
    assert [j.id for j in queue.retry([a.id])] == [a.id]
    assert queue.job(a.id).state == "queued" and queue.job(a.id).attempts == 0  # type: ignore[union-attr]
    assert [j.id for j in queue.retry(None)] == [b.id]
    assert queue.retry(None) == []


# -------------------------------------------------------------------- recovery


def test_recover_requeues_interrupted_jobs_or_finishes_written_ones(queue: Queue) -> None:
    queue.enqueue([cand(path=f"/w/{i}.png") for i in range(3)])
    a, b, c = queue.claim(3)
    # c has been interrupted as often as it may be: it is failed, not retried forever.
    with queue._tx() as db:
        db.execute("UPDATE jobs SET attempts = 3 WHERE id = ?", (c.id,))
    counts = queue.recover(3, written=lambda job: job.id == a.id)
    assert counts == {"done": 1, "queued": 1, "failed": 1}
    assert queue.job(a.id).state == "done"  # type: ignore[union-attr]
    assert queue.job(b.id).state == "queued"  # type: ignore[union-attr]
    assert "stopped while processing" in (queue.job(c.id).error or "")  # type: ignore[union-attr]


def test_prune_keeps_what_the_sidecars_were_made_from(queue: Queue, tmp_path: Path) -> None:
    live = tmp_path / "live.png"
    live.write_bytes(b"x")
    for digest in ("h1", "h2"):
        queue.enqueue([cand(path=str(live), digest=digest), cand(path="/gone/x.png", digest=digest)])
        for job in queue.claim(5):
            queue.finish([(job.id, [], 0.1)])
    queue.enqueue([cand(path="/w/failed.png")])
    [bad] = queue.claim(1)
    queue.fail(bad.id, "bad", retry_at=None)
    assert queue.prune(3600) == 0  # nothing is old yet
    assert queue.prune(-1) == 4
    [kept] = queue.history()
    assert kept.path == live and kept.hash == "h2"


def test_counts_failures_and_meta(queue: Queue) -> None:
    assert queue.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}
    queue.set_meta("backend", {"available": False, "error": "refused"})
    assert queue.meta() == {"backend": {"available": False, "error": "refused"}}
    queue.set_meta("backend", None)
    assert queue.meta() == {}


def test_a_second_connection_sees_the_daemons_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Queue(path) as daemon, Queue(path) as status:
        daemon.enqueue([cand()])
        assert status.counts()["queued"] == 1
        assert status.retry(None) == []


def test_a_name_that_is_not_utf8_is_stored_and_does_not_spoil_the_batch(queue: Queue) -> None:
    import os

    odd = Path("/w") / os.fsdecode(b"scan-\xe9t\xe9.png")  # Latin-1 bytes from an old NAS
    queued = queue.enqueue([cand(path=str(odd)), cand(path="/w/plain.png")])
    assert [q.path for q in queued] == [odd, Path("/w/plain.png")]
    assert queue.latest(odd, "describe") is not None
    assert queue.enqueue([cand(path=str(odd))]) == []  # found again by its bytes: idempotent
    [job, _] = queue.claim(2)
    queue.fail(job.id, f"{odd}: cannot decode", retry_at=None)
    [failed] = queue.failures()
    assert failed.path == odd and "\\xe9" in (failed.error or "")


def test_content_hash_is_blake2b_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "f"
    f.write_bytes(b"hello" * 1000)
    assert content_hash(f) == hashlib.blake2b(b"hello" * 1000, digest_size=20).hexdigest()


def test_state_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    first, second = StateLock(state), StateLock(state)
    assert first.holder() is None
    assert first.acquire()
    assert not second.acquire()
    assert second.holder() == __import__("os").getpid()
    first.release()
    assert second.holder() is None
    assert second.acquire()
    second.release()


# ------------------------------------------------------------------- property

ops = st.lists(
    st.tuples(
        st.sampled_from(["enqueue", "claim", "finish", "fail", "release"]),
        st.sampled_from(["/w/a.png", "/w/b.png"]),
        st.sampled_from(["h1", "h2", "h3"]),
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_never_two_pending_jobs_for_one_file_and_rule(tmp_path_factory: pytest.TempPathFactory, steps) -> None:
    """Whatever order events come in, a (path, rule) has at most one queued job,
    and no bytes are queued or running twice."""
    with Queue(tmp_path_factory.mktemp("prop") / "state.db") as q:
        for op, path, digest, flag in steps:
            if op == "enqueue":
                q.enqueue([cand(path=path, digest=digest, redo=flag, seen_at=time.time())])
            elif op == "claim":
                q.claim(1)
            elif running := q.running():
                job = running[0]
                if op == "finish":
                    q.finish([(job.id, [], 0.0)])
                elif op == "fail":
                    q.fail(job.id, "x", retry_at=0.0 if flag else None)
                else:
                    q.release([job.id])
            jobs = q.history()
            queued = [(j.path, j.rule) for j in jobs if j.state == "queued"]
            assert len(queued) == len(set(queued))
            active = [(j.path, j.rule, j.hash) for j in jobs if j.state in ("queued", "running")]
            assert len(active) == len(set(active))


# issue 10.21: enqueue looks up a batch's newest jobs together (not one query per file); it must
# decide exactly as if the files came one by one, a file met twice in one batch included.
batch = st.lists(st.tuples(st.sampled_from(["/w/a.png", "/w/b.png", "/w/\udce9.png"]),
                           st.sampled_from(["describe", "ocr"]), st.sampled_from(["h1", "h2", "h3"]),
                           st.booleans()), max_size=10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(batch, st.sampled_from(["claim", "finish", "none"])), max_size=5))
def test_a_batch_is_queued_exactly_as_its_files_one_by_one(tmp_path_factory: pytest.TempPathFactory,
                                                          rounds) -> None:
    folder = tmp_path_factory.mktemp("batch")
    seen_at = time.time()
    with Queue(folder / "batched.db") as batched, Queue(folder / "single.db") as single:
        for files, then in rounds:
            cands = [cand(path=p, rule=r, digest=h, redo=redo, seen_at=seen_at) for p, r, h, redo in files]
            got = batched.enqueue(cands)
            want = [q for c in cands for q in single.enqueue([c])]
            assert got == want
            for q in (batched, single):
                if then == "claim":
                    q.claim(2)
                elif then == "finish" and (running := q.running()):
                    q.finish([(running[0].id, [], 0.0)])
        table = lambda q: [(j.id, j.path, j.rule, j.hash, j.state) for j in q.history()]  # noqa: E731
        assert table(batched) == table(single)


def test_the_due_count_stops_where_asked(queue: Queue) -> None:
    # issue 10.21: the worker asks "none?" and "a batch yet?" per queued batch, not for a full count
    queue.enqueue([cand(path=f"/w/{i}.png") for i in range(5)])
    assert queue.due_count() == 5
    assert queue.due_count(limit=1) == 1 and queue.due_count(limit=3) == 3 and queue.due_count(limit=10) == 5
