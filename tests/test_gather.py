"""training/gather.py: the buckets the raw weights and the EMA travel to rank 0 in (a real engine's gathers are
exercised in test_engine.py and test_zero3_gather.py)."""
from hypothesis import given, strategies as st

from tryon_ds.training.gather import in_buckets, streamed


@given(st.lists(st.integers(0, 50)), st.integers(1, 120))
def test_buckets_keep_the_order_and_close_as_soon_as_they_are_full(sizes, bucket_numel):
    items = list(enumerate(sizes))
    buckets = list(in_buckets(items, lambda item: item[1], bucket_numel))
    assert [item for bucket in buckets for item in bucket] == items
    assert all(bucket for bucket in buckets)
    for bucket in buckets[:-1]:
        total = sum(size for _, size in bucket)
        assert total >= bucket_numel and total - bucket[-1][1] < bucket_numel
    if buckets:
        assert sum(size for _, size in buckets[-1][:-1]) < bucket_numel


def test_rank_0_gets_the_parts_as_they_come_or_as_one_dict_and_the_others_nothing():
    def parts():
        yield {"a": 1}
        yield {}
        yield {"b": 2}

    seen = []
    assert streamed(True, parts()) == {"a": 1, "b": 2}
    assert streamed(True, parts(), seen.append) is None and seen == [{"a": 1}, {"b": 2}]
    assert streamed(False, parts()) is None
