"""The slot engine's scheduler (issue 22.1) on its own: admission, placement, decode width, turns.

Plain numbers in, decisions out; the engine-level behaviour (a stream's decoding never separated by more
than the step budget of queued prefills) is in tests/test_engine.py.
"""

from __future__ import annotations

from daemon.backends.transformers.scheduler import Scheduler, SchedulerOptions, decode_widths


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interactive_requests_take_the_lowest_slots_and_queued_ones_the_rest_first() -> None:
    sched = Scheduler(16, SchedulerOptions(interactive_slots=4), reserve=True)
    free = list(range(16))
    assert sched.place([False, False], free) == [4, 5]
    assert sched.place([True], free) == [0]
    allowed = sched.admission(free, urgent_waiting=False, interactive_running=False)
    # issue 22.6: queued work may use the interactive slots too (kept empty, they left a burst's last prompts to a
    # second wave of their own); it takes them last, from the top down.
    assert allowed.queued_room == 13 and allowed.urgent_room == 0 and allowed.tokens is None
    assert sched.admission(free, urgent_waiting=True, interactive_running=False).urgent_room == 13
    assert sched.place([False] * 13, free) == [*range(6, 16), 3, 2, 1] and free == []


def test_a_queued_prompt_in_an_interactive_pack_takes_an_interactive_slot_when_none_above_is_free() -> None:
    # A queued retry waiting in front can share a pack with an interactive prompt while only the interactive
    # slots are free: it must still get a slot (it raised StopIteration and failed the slots' requests).
    sched = Scheduler(16, SchedulerOptions(interactive_slots=4), reserve=True)
    free = [0, 1, 2]
    assert sched.place([False, True], free) == [2, 0] and free == [1]


def test_an_interactive_prompt_takes_back_the_interactive_slot_a_queued_sequence_took_last() -> None:
    sched = Scheduler(16, SchedulerOptions(interactive_slots=4), reserve=True)
    # slot -> when its queued sequence was admitted: slots 3, 2, 1 filled last, in that order
    assert sched.victim({5: 1, 3: 7, 2: 8, 1: 9, 9: 10}) == 1
    # every interactive slot held by a sequence that gave its slot up before (not in ``queued``): the one
    # admitted last anywhere gives its slot up, rather than the question waiting for a wave to end (call Q2)
    assert sched.victim({5: 1, 9: 2}) == 9
    assert sched.victim({5: 1, 3: 7}, interactive=4) is None  # as many questions running as slots kept for them
    assert sched.victim({}) is None
    assert Scheduler(16, reserve=False).victim({0: 1}) is None  # a fixed list: nothing to make room for


def test_a_fixed_list_keeps_no_slot_back() -> None:
    sched = Scheduler(8, reserve=False)
    assert sched.place([False] * 8, list(range(8))) == list(range(8))


def test_small_engines_keep_a_quarter_at_most() -> None:
    assert Scheduler(4, SchedulerOptions(interactive_slots=4), reserve=True).reserved == 1
    assert Scheduler(2, SchedulerOptions(interactive_slots=4), reserve=True).reserved == 0


def test_turns_share_time_between_the_backlog_and_interactive_work() -> None:
    clock = Clock()
    sched = Scheduler(256, SchedulerOptions(step_tokens=2048, backlog_share=0.25), reserve=True, clock=clock)
    turns = []
    for _ in range(40):
        turn = sched.begin(interactive_running=True)
        turns.append(turn)
        clock.now += 0.1
        sched.end()
    backlog = turns.count("backlog") / len(turns)
    assert 0.2 <= backlog <= 0.3, turns
    # In the interactive turn no queued prompt is admitted and only the interactive slots decode.
    while sched.begin(interactive_running=True) != "interactive":
        clock.now += 0.1
        sched.end()
    assert sched.admission(range(4, 256), urgent_waiting=False, interactive_running=True).queued_room == 0
    assert sched.decode_width(busy=[0, 1, 9, 200], interactive=[0, 1], shrink=True) == 2
    clock.now += 0.1
    sched.end()
    while sched.begin(interactive_running=True) != "backlog":
        clock.now += 0.1
        sched.end()
    allowed = sched.admission(range(4, 256), urgent_waiting=False, interactive_running=True)
    assert allowed.queued_room == 252 and allowed.tokens == 2048
    assert sched.decode_width(busy=[0, 1, 9, 200], interactive=[0, 1], shrink=True) == 256


def test_without_interactive_work_everything_runs_unbounded() -> None:
    sched = Scheduler(64, reserve=True)
    assert sched.begin(interactive_running=False) is None
    assert sched.admission(range(4, 64), urgent_waiting=False, interactive_running=False).tokens is None
    assert sched.decode_width(busy=[4, 5, 6], interactive=[], shrink=True) == 8
    assert sched.decode_width(busy=[4], interactive=[], shrink=False) == 64


def test_the_widths_warmed_while_idle_are_every_width_a_shrinking_run_decodes_over() -> None:
    # Call S1: a width was captured the first time a run decoded over it, and a person's first question
    # waited for six captures as the backlog widened the batch.  The engine now captures
    # decode_widths(slots) while idle; a width the scheduler can choose and warming misses is a capture
    # (and a stall) under load again.
    for slots in (1, 3, 4, 48, 100, 256):
        clock = Clock()
        sched = Scheduler(slots, SchedulerOptions(interactive_slots=4), reserve=True, clock=clock)
        chosen = {sched.decode_width([busy], [], shrink=True) for busy in range(slots)}
        assert sched.begin(interactive_running=True) == "backlog"
        clock.now += 1
        sched.end()
        assert sched.begin(interactive_running=True) == "interactive"
        # Without a reserve (few slots) an interactive request may sit in any slot.
        chosen |= {sched.decode_width([busy], [i], shrink=True) for busy in range(slots) for i in range(slots)}
        assert chosen <= set(decode_widths(slots)), (slots, chosen - set(decode_widths(slots)))
        assert decode_widths(slots) == sorted(decode_widths(slots)) and decode_widths(slots)[-1] == slots
