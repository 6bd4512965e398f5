"""The periodic actions fire at exactly their steps whatever the other frequencies are, and the loop's host
syncs are never further apart than max_bad_steps (tryon_ds/training/schedule.py; its real run with
frequencies that are not multiples of each other: tests/test_fault_checkpoint.py)."""
from hypothesis import given, settings, strategies as st

from tryon_ds.training.schedule import ACTIONS, Schedule

freq = st.integers(min_value=1, max_value=40)
off_or_freq = st.integers(min_value=0, max_value=40)  # validation, quality passes and previews may be off


def walk(schedule: Schedule, start: int):
    """What train.py's loop does: after each step, sync when the schedule says so, and only then run the
    actions due."""
    syncs, fired = [], {a: [] for a in ACTIONS}
    for step in range(start + 1, schedule.last_step + 1):
        if not schedule.sync(step):
            continue
        syncs.append(step)
        for action in schedule.due(step):
            fired[action].append(step)
    return syncs, fired


@settings(max_examples=500, deadline=None)
@given(every=st.fixed_dictionaries({a: off_or_freq if a in ("validate", "quality", "preview") else freq
                                    for a in ACTIONS}),
       max_bad=freq,
       start=st.integers(min_value=0, max_value=200), length=st.integers(min_value=1, max_value=300))
def test_each_action_at_every_multiple_of_its_own_frequency_and_at_the_last_step(every, max_bad, start, length):
    schedule = Schedule(start + length, every, max_bad)
    syncs, fired = walk(schedule, start)
    for action, f in every.items():
        expected = [s for s in range(start + 1, start + length + 1) if f and (s % f == 0 or s == start + length)]
        assert fired[action] == expected, (action, f)
    gaps = [b - a for a, b in zip([start, *syncs], syncs)]
    assert max(gaps) <= max_bad  # the loss window (max_bad_steps slots) never overflows
    assert syncs[-1] == start + length


def test_the_case_that_was_skipped():
    """checkpoint_freq=3 with log_freq=4 checkpointed only at step 12 when the loop looked at actions only
    at its log syncs."""
    schedule = Schedule(12, {"log": 4, "validate": 5, "quality": 0, "preview": 1000, "checkpoint": 3}, 20)
    _, fired = walk(schedule, 0)
    assert fired == {"log": [4, 8, 12], "validate": [5, 10, 12], "quality": [], "preview": [12],
                     "checkpoint": [3, 6, 9, 12]}
