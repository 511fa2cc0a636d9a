"""fabric.dataplane.udp.gso_runs: which datagrams one UDP GSO send may carry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.dataplane.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, gso_runs


def test_equal_sizes_with_a_shorter_tail() -> None:
    assert gso_runs([100, 100, 100, 50, 100, 100]) == [(0, 4), (4, 6)]


def test_limits_on_segments_and_bytes() -> None:
    assert gso_runs([10] * 70) == [(0, 64), (64, 70)]
    assert gso_runs([30000] * 3) == [(0, 2), (2, 3)]


def test_growing_sizes_break_runs() -> None:
    assert gso_runs([5, 7, 7]) == [(0, 1), (1, 3)]
    assert gso_runs([]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([32, 48, 1452, 1500, 60000]) | st.integers(1, 65000), max_size=200))
def test_runs_cover_everything_and_obey_gso_rules(sizes: list[int]) -> None:
    runs = gso_runs(sizes)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(sizes)))
    for a, b in runs:
        seg = sizes[a:b]
        assert 1 <= len(seg) <= GSO_MAX_SEGMENTS
        if len(seg) > 1:
            assert all(s == seg[0] for s in seg[:-1]) and seg[-1] <= seg[0]
            assert sum(seg) <= GSO_MAX_BYTES
