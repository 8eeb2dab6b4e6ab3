"""The search index (issue 14): built from the jobs table, kept in step with the disk, never a stale hit.

Jobs are made the way the daemon makes them (``Queue.enqueue`` -> ``claim``
-> sidecar written -> ``finish``) on a real SQLite file, with real sidecar
files; the CLI is run as a real subprocess.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from daemon.store.queue import Candidate, Queue
from daemon.store.search import Filters, SearchIndex, fts_query, search
from tests.conftest import run_vlwatch, write_config


def finish_job(queue: Queue, source: Path, rule: str, sidecars: dict[str, str]) -> int:
    """Queue, claim and finish one job for ``source``, writing its sidecars (ext -> text)."""
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"\x89PNG fake " + os.fsencode(source.name))
    st = source.stat()
    (queued,) = queue.enqueue([Candidate(source, rule, f"h{time.time_ns()}", st.st_size, st.st_mtime_ns, redo=True,
                                         seen_at=time.time() + 1)])
    (job,) = queue.claim(10)
    assert job.id == queued.id
    written = []
    for ext, text in sidecars.items():
        path = source.parent / f"{source.name}.{rule}.{ext}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    queue.finish([(job.id, written, 0.1)])
    return job.id


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


def paths(hits) -> list[str]:
    return [str(h.path) for h in hits]


def test_index_is_built_from_sidecars_that_exist_and_reads_each_format(tmp_path: Path, state: Path) -> None:
    # issue 14: "built once for sidecars that exist already" (catch-up from an empty index)
    with Queue(state) as q:
        finish_job(q, tmp_path / "a.png", "ocr", {"md": "# Invoice\n\nquota exceeded on the **account**"})
        finish_job(q, tmp_path / "b.png", "code",
                   {"html": "<html><head><title>zebra</title><style>.giraffe{}</style></head>"
                            "<body><p>Sign&nbsp;in</p><img alt='company logo'><script>elephant()</script></body></html>"})
        finish_job(q, tmp_path / "c.png", "ground",
                   {"json": json.dumps({"boxes": [{"label": "red kettle", "bbox": [1, 2, 3, 4]}],
                                        "raw_answer": "```json\n[...]\n``` walrus"}),
                    "overlay.png": "not text"})
    hits = search(state, "quota")
    assert paths(hits) == [str(tmp_path / "a.png")]
    (hit,) = hits
    assert hit.rule == "ocr" and hit.sidecar == tmp_path / "a.png.ocr.md"
    assert [hit.snippet[s:e] for s, e in hit.highlights] == ["quota"]
    assert paths(search(state, "sign")) == [str(tmp_path / "b.png")]
    assert paths(search(state, "logo")) == [str(tmp_path / "b.png")]  # alt text is visible text
    for hidden in ("zebra", "giraffe", "elephant"):  # title, CSS and script are not what a page shows
        assert search(state, hidden) == [], hidden
    assert paths(search(state, "kettle")) == [str(tmp_path / "c.png")]
    assert paths(search(state, "walrus")) == [str(tmp_path / "c.png")]
    assert paths(search(state, "c.png")) == [str(tmp_path / "c.png")]  # the file name is searchable too
    with SearchIndex(state) as index:
        assert index.count() == 3  # the overlay is not indexed


def test_new_jobs_are_indexed_incrementally(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q, SearchIndex(state) as index:
        finish_job(q, tmp_path / "one.png", "ocr", {"md": "first apple"})
        assert paths(index.search("apple")) == [str(tmp_path / "one.png")]
        assert index.catch_up() == 0  # nothing new: nothing read again
        finish_job(q, tmp_path / "two.png", "ocr", {"md": "second apple"})
        assert sorted(paths(index.search("apple"))) == [str(tmp_path / "one.png"), str(tmp_path / "two.png")]


def test_a_replaced_sidecar_leaves_no_stale_hit(tmp_path: Path, state: Path) -> None:
    # issue 14: "a sidecar replaced ... leaves no stale hit"
    with Queue(state) as q, SearchIndex(state) as index:
        finish_job(q, tmp_path / "s.png", "ocr", {"md": "old banana text"})
        assert len(index.search("banana")) == 1
        # Rewritten on disk behind the index's back (another program, or a job not caught up yet).
        sidecar = tmp_path / "s.png.ocr.md"
        sidecar.write_text("new cherry words, longer than before")
        assert index.search("banana", catch_up=False) == []
        assert paths(index.search("cherry", catch_up=False)) == [str(tmp_path / "s.png")]


def test_a_newer_job_supersedes_the_older_ones_sidecars(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q, SearchIndex(state) as index:
        finish_job(q, tmp_path / "p.png", "shot", {"md": "mango"})
        assert len(index.search("mango")) == 1
        # The rule now writes html: the old .md stays on disk but is no longer this file's result.
        finish_job(q, tmp_path / "p.png", "shot", {"html": "<p>papaya</p>"})
        assert index.search("mango") == []
        assert [h.sidecar.name for h in index.search("papaya")] == ["p.png.shot.html"]


def test_a_deleted_source_or_sidecar_leaves_no_stale_hit(tmp_path: Path, state: Path) -> None:
    # issue 14: "... or its source deleted leaves no stale hit"
    with Queue(state) as q, SearchIndex(state) as index:
        finish_job(q, tmp_path / "gone.png", "ocr", {"md": "kiwi one"})
        finish_job(q, tmp_path / "nocar.png", "ocr", {"md": "kiwi two"})
        finish_job(q, tmp_path / "kept.png", "ocr", {"md": "kiwi three"})
        assert len(index.search("kiwi")) == 3
        (tmp_path / "gone.png").unlink()
        (tmp_path / "nocar.png.ocr.md").unlink()
        assert paths(index.search("kiwi")) == [str(tmp_path / "kept.png")]
        assert index.count() == 1  # the stale entries were deleted, not only hidden


def test_sweep_fixes_entries_without_a_query(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q, SearchIndex(state) as index:
        finish_job(q, tmp_path / "x.png", "ocr", {"md": "plum"})
        finish_job(q, tmp_path / "y.png", "ocr", {"md": "plum"})
        index.catch_up()
        (tmp_path / "x.png").unlink()
        assert index.sweep() == 1
        assert index.count() == 1


# (query, hits) against a sidecar reading "plum NEAR and OR name body": FTS5's syntax is
# searched for as words, every word is required, punctuation only parts words.
HOSTILE = [('"', 0), ('""', 0), ("'", 0), ("*", 0), ("**", 0), ("a*b", 0), ("NEAR(", 1), ("NEAR(a b", 0),
           ("a AND", 0), ("OR", 1), ("NOT x", 0), ("(", 0), (")", 0), ("^", 0), ("name:plum", 0), ("body:", 1),
           ("{name body}: plum", 1), ("-plum", 1), ("+", 0), ("a\x00b", 0), ("plum\x00body", 1), ("NEAR\x1b", 1),
           ("\ue000plum\ue001", 1), ("\\", 0), ("%", 0), ("_", 0), ('plum" OR "x', 0), ('plum" OR "body', 1),
           ("'; DROP TABLE jobs; --", 0), ("\u202e", 0), ("ünïcödé", 0), ("日本語", 0), (" " * 50, 0), ("x" * 5000, 0),
           ("pl*", 1), ("BODY name PLUM", 1)]


@pytest.mark.parametrize("query,expected", HOSTILE)
def test_hostile_queries_are_searched_as_words(tmp_path: Path, state: Path, query: str, expected: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # issue 14: user query text made safe for FTS5 syntax; issue 27: assert what comes back, not only its type
    with Queue(state) as q:
        finish_job(q, tmp_path / "h.png", "ocr", {"md": "plum NEAR and OR name body"})
    hits = search(state, query)
    assert paths(hits) == [str(tmp_path / "h.png")] * expected
    assert "failed" not in caplog.text  # a query FTS5 could not parse answers nothing, silently


def test_fts_query_quotes_every_word() -> None:
    assert fts_query("quota exceeded") == '"quota" "exceeded"'
    assert fts_query('NEAR("a" b*') == '"NEAR(" "a" "b"*'
    assert fts_query("*** ;;;") is None
    assert fts_query("") is None


def test_operators_are_searched_for_as_words(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q:
        finish_job(q, tmp_path / "op.png", "ocr", {"md": "this OR that"})
        finish_job(q, tmp_path / "other.png", "ocr", {"md": "this alone"})
    # FTS5 would read "this OR that" as either word; the user means all three words.
    assert paths(search(state, "this OR that")) == [str(tmp_path / "op.png")]
    assert sorted(paths(search(state, "th*"))) == sorted([str(tmp_path / "op.png"), str(tmp_path / "other.png")])


def test_filters_by_folder_rule_and_date(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q:
        finish_job(q, tmp_path / "scans" / "a.png", "ocr", {"md": "lemon"})
        finish_job(q, tmp_path / "scans" / "deep" / "b.png", "ocr", {"md": "lemon"})
        finish_job(q, tmp_path / "scansextra" / "c.png", "ocr", {"md": "lemon"})
        finish_job(q, tmp_path / "shots" / "d.png", "code", {"html": "<p>lemon</p>"})
    scans = sorted(paths(search(state, "lemon", filters=Filters(folder=tmp_path / "scans"))))
    assert scans == [str(tmp_path / "scans" / "a.png"), str(tmp_path / "scans" / "deep" / "b.png")]
    assert paths(search(state, "lemon", filters=Filters(rule="code"))) == [str(tmp_path / "shots" / "d.png")]
    now = time.time()
    assert len(search(state, "lemon", filters=Filters(since=now - 3600))) == 4
    assert search(state, "lemon", filters=Filters(until=now - 3600)) == []


def test_non_utf8_file_names_are_indexed(tmp_path: Path, state: Path) -> None:
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    with Queue(state) as q:
        finish_job(q, odd, "ocr", {"md": "espresso"})
    (hit,) = search(state, "espresso")
    assert hit.path == odd
    assert "\\xe9" in hit.as_dict()["path"]  # printable in JSON


def test_cli_search_json_and_text(tmp_path: Path, state: Path) -> None:
    with Queue(state) as q:
        finish_job(q, tmp_path / "inbox" / "err.png", "ocr", {"md": "Error: quota exceeded for project"})
    config = write_config(tmp_path, f"""
        state: {state}
        include: [ocr]
        watch:
          - path: {tmp_path / 'inbox'}
        """)
    r = run_vlwatch("search", "quota", "--json", "--config", config, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (hit,) = out["hits"]
    assert hit["path"] == str(tmp_path / "inbox" / "err.png")
    assert hit["rule"] == "ocr" and hit["sidecar"].endswith("err.png.ocr.md")
    assert "quota" in hit["snippet"]
    r = run_vlwatch("search", "quota", "--config", config, timeout=120)
    assert r.returncode == 0 and "err.png" in r.stdout and "quota exceeded" in r.stdout
    r = run_vlwatch("search", '"NEAR(', "--config", config, timeout=120)
    assert r.returncode == 0 and "no hits" in r.stderr
    r = run_vlwatch("search", "quota", "--since", "yesterday", "--config", config, timeout=120)
    assert r.returncode == 2 and "YYYY-MM-DD" in r.stderr


def test_cli_search_shows_model_text_escaped(tmp_path: Path, state: Path) -> None:
    # issue 27: a sidecar's text comes from the model; no escape sequence of it reaches the terminal
    with Queue(state) as q:
        finish_job(q, tmp_path / "inbox" / "evil.png", "ocr", {"md": "quota \x1b]0;pwned\x07 \x1b[2J\x9b1m done"})
    config = write_config(tmp_path, f"""
        state: {state}
        include: [ocr]
        watch:
          - path: {tmp_path / 'inbox'}
        """)
    for args in ((), ("--json",)):
        r = run_vlwatch("search", "quota", *args, "--config", config, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not any(c in r.stdout for c in "\x1b\x07\x9b"), repr(r.stdout)
        assert "pwned" in r.stdout
    r = run_vlwatch("search", "quota", "--config", config, timeout=120)
    assert "\\x1b]0;pwned\\x07" in r.stdout
