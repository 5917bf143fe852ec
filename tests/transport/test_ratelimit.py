from __future__ import annotations

import pytest

from transport.ratelimit import KeyedBuckets, TokenBucket


def test_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # one token back after 0.5 s at 2/s
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert not bucket.take(100.0, amount=0.5)


def test_keyed_buckets_limit_each_key_on_its_own():
    buckets = KeyedBuckets(rate=1.0, burst=2.0)
    assert [buckets.allow("a", 0) for _ in range(3)] == [True, True, False]
    assert buckets.allow("b", 0)
    assert buckets.allow("a", 1.0) and not buckets.allow("a", 1.0)


def test_a_full_table_forgets_refilled_keys_and_refuses_new_ones_otherwise():
    buckets = KeyedBuckets(rate=1.0, burst=1.0, max_keys=2)
    assert buckets.allow("a", 0) and buckets.allow("b", 0)
    # Neither has refilled: a spray of new sources is refused, not given fresh buckets.
    assert not buckets.allow("c", 0.5)
    # After a second both are full again and forgotten; the new key gets in.
    assert buckets.allow("c", 1.0)
    assert len(buckets) == 1


def test_bad_parameters():
    with pytest.raises(ValueError):
        KeyedBuckets(rate=0, burst=1)
    with pytest.raises(ValueError):
        KeyedBuckets(rate=1, burst=0.5)
