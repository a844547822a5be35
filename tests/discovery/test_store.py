"""TTLStore, with an injected clock: exact expiry, caps, memory that follows
the live values (expiry without touching a key, heap rebuilds), no operation
that scans everything, and a differential test against a plain model."""

from __future__ import annotations

import random
import time

import pytest

from fastnat.discovery.store import StoreFull, TTLStore


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(**caps: int) -> tuple[TTLStore, Clock]:
    clock = Clock()
    return TTLStore(clock=clock, **caps), clock


def test_expiry_is_exact() -> None:
    store, clock = make()
    store.announce("k", "v", 10.0)
    clock.now += 9.999
    assert store.lookup("k") == ["v"]
    clock.now += 0.001  # exactly ttl after the announce: gone
    assert store.lookup("k") == []
    assert len(store) == 0 and store.value_count == 0


def test_renewal_moves_the_expiry_both_ways() -> None:
    store, clock = make()
    store.announce("k", "v", 10.0)
    clock.now += 8
    store.announce("k", "v", 10.0)  # now expires at +18
    clock.now += 9
    assert store.lookup("k") == ["v"]
    store.announce("k", "v", 0.5)  # shorter: expires at +17.5
    clock.now += 0.5
    assert store.lookup("k") == []
    assert store.value_count == 0


def test_withdraw() -> None:
    store, clock = make()
    store.announce("k", "a", 10)
    store.announce("k", "b", 10)
    store.withdraw("k", "a")
    store.withdraw("k", "a")
    store.withdraw("nothing", "a")
    assert store.lookup("k") == ["b"]
    store.withdraw("k", "b")
    assert len(store) == 0 and store.value_count == 0
    # the withdrawn value's heap entry is stale and harmless
    store.announce("k", "a", 100)
    clock.now += 10
    assert store.lookup("k") == ["a"]


def test_lookup_limit_and_order() -> None:
    store, _ = make()
    for i in range(10):
        store.announce("k", f"v{i}", 10)
    assert store.lookup("k", 3) == ["v0", "v1", "v2"]
    assert len(store.lookup("k")) == 10


def test_expiry_without_touching_the_key() -> None:
    """Keys nobody looks at again leave memory as other operations go on."""
    store, clock = make()
    for i in range(1000):
        store.announce(f"idle{i}", "v", 5.0)
    store.announce("busy", "v", 1000.0)
    assert len(store) == 1001
    clock.now += 5.0
    for _ in range(1000 // 64 + 1):
        store.lookup("busy")
    assert len(store) == 1 and store.value_count == 1
    # and the heap followed
    assert store.heap_size <= 2


def test_each_call_expires_a_bounded_number() -> None:
    """One call does not pay for a mass expiry: at most 64 values go per call."""
    store, clock = make()
    for i in range(640):
        store.announce(f"k{i}", "v", 1.0)
    clock.now += 1.0
    store.lookup("other")
    assert store.value_count == 640 - 64


def test_renewals_do_not_grow_the_heap() -> None:
    store, clock = make()
    for _ in range(20_000):
        store.announce("k", "v", 60.0)
        clock.now += 0.001
    assert store.value_count == 1
    assert store.heap_size <= 1025 + 1, store.heap_size


def test_heap_shrinks_when_everything_is_withdrawn() -> None:
    store, _ = make()
    for i in range(3000):
        store.announce(f"k{i}", "v", 3600.0)
    for i in range(3000):
        store.withdraw(f"k{i}", "v")
    store.lookup("k0")
    assert store.value_count == 0 and len(store) == 0
    # rebuilt on the way down: what is left is below the rebuild threshold
    assert store.heap_size <= 1024, "stale heap entries kept although nothing is left"


def test_heap_rebuild_keeps_expiries() -> None:
    store, clock = make()
    for i in range(2000):
        store.announce("short", f"s{i % 5}", 10.0)  # 5 values, renewed: stale entries pile up
    store.announce("long", "l", 20.0)
    assert store.heap_size < 1100
    clock.now += 9.9
    assert len(store.lookup("short")) == 5
    clock.now += 0.1
    assert store.lookup("short") == []
    assert store.lookup("long") == ["l"]
    clock.now += 10.0
    assert store.lookup("long") == []
    assert store.value_count == 0


def test_key_cap() -> None:
    store, _ = make(max_keys=3)
    for k in "abc":
        store.announce(k, "v", 10)
    with pytest.raises(StoreFull, match="maximum of 3 keys"):
        store.announce("d", "v", 10)
    store.announce("a", "v2", 10)  # existing key
    store.withdraw("b", "v")
    store.announce("d", "v", 10)
    with pytest.raises(StoreFull):
        store.announce("e", "v", 10)


def test_key_cap_frees_expired_keys_with_many_values() -> None:
    """A key whose (many) values all expired does not count against the cap,
    even though each call removes only a few expired values."""
    store, clock = make(max_keys=2, max_values_per_key=1000)
    for i in range(500):
        store.announce("big", f"v{i}", 1.0)
    store.announce("other", "v", 100.0)
    clock.now += 1.0
    store.announce("new", "v", 10)
    assert store.lookup("new") == ["v"] and store.lookup("big") == []


def test_values_per_key_cap() -> None:
    store, clock = make(max_values_per_key=2)
    store.announce("k", "a", 1)
    store.announce("k", "b", 10)
    with pytest.raises(StoreFull, match="maximum of 2 values"):
        store.announce("k", "c", 10)
    store.announce("k", "a", 1)  # renewal
    clock.now += 1
    store.announce("k", "c", 10)  # "a" expired: room
    assert sorted(store.lookup("k")) == ["b", "c"]


def test_operations_cost_does_not_grow_with_the_store() -> None:
    """No operation scans every key: a lookup in a store of 50,000 keys costs
    about what it costs in a store of 100."""

    def per_call(store: TTLStore) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(500):
                store.lookup("k0")
                store.announce("k0", "v", 3600.0)
            best = min(best, time.perf_counter() - start)
        return best / 1000

    small, _ = make()
    large, _ = make()
    for i in range(100):
        small.announce(f"k{i}", "v", 3600.0)
    for i in range(50_000):
        large.announce(f"k{i}", "v", 3600.0)
    ratio = per_call(large) / per_call(small)
    assert ratio < 10, f"an operation on 50,000 keys costs {ratio:.0f}x one on 100"


def test_against_a_model() -> None:
    """Random operations at random times; the store answers as a plain
    dict of expiries does, and its counts stay exact."""
    rng = random.Random(20240605)
    store, clock = make(max_keys=8, max_values_per_key=4)
    model: dict[str, dict[str, float]] = {}

    def live(key: str) -> dict[str, float]:
        return {v: e for v, e in model.get(key, {}).items() if e > clock.now}

    for step in range(20_000):
        clock.now += rng.choice((0.0, 0.001, 0.01, 0.1, 0.5))
        key = f"k{rng.randrange(12)}"
        value = f"v{rng.randrange(6)}"
        op = rng.random()
        if op < 0.5:
            ttl = rng.choice((0.05, 0.3, 1.0, 5.0))
            keys_live = sum(1 for k in model if live(k))
            values = live(key)
            full = (not values and keys_live >= 8) or (values and value not in values and len(values) >= 4)
            if full:
                with pytest.raises(StoreFull):
                    store.announce(key, value, ttl)
            else:
                store.announce(key, value, ttl)
                model.setdefault(key, {})
                model[key] = {**live(key), value: clock.now + ttl}
        elif op < 0.8:
            assert sorted(store.lookup(key)) == sorted(live(key)), f"step {step}"
        else:
            store.withdraw(key, value)
            model[key] = {v: e for v, e in live(key).items() if v != value}
        held = store._data  # the values held (some may be expired, not yet removed)
        assert store.value_count == sum(len(v) for v in held.values()), f"step {step}"
        assert len(store) == len(held)
        assert store.heap_size <= max(1025, 4 * (store.value_count + 1) + 1)
