"""Tests of the host-side block manager: allocation, prefix caching, eviction, contiguity.

The invariant checks read the manager's private state (free runs, refcounts,
evictable list, hash maps): those are exactly what the invariants are about.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sluice.runtime.block_manager import BlockManager


def check_invariants(bm: BlockManager) -> None:
    """Every block is free, evictable or referenced (exactly one); structures agree."""
    pool = bm._free
    free: set[int] = set()
    for start, length in pool._length.items():
        run = set(range(start, start + length))
        assert length >= 1 and free.isdisjoint(run)
        free |= run
        assert pool._start_by_end[start + length] == start
        assert start + length not in pool._length, "adjacent free runs were not coalesced"
    assert len(pool._start_by_end) == len(pool._length)
    assert pool._by_size == sorted((length, start) for start, length in pool._length.items())
    assert pool.count == len(free)

    holders = Counter(block for seq in bm._seqs.values() for block in seq.blocks)
    for seq in bm._seqs.values():
        assert len(set(seq.blocks)) == len(seq.blocks)
    referenced = set(holders)
    evictable = set(bm._evictable)
    assert len(evictable) == len(bm._evictable)
    assert free | evictable | referenced == set(range(bm.num_blocks))
    assert not free & evictable and not free & referenced and not evictable & referenced
    assert all(bm._refcount[block] == holders[block] for block in range(bm.num_blocks))

    assert {block: h for h, block in bm._cached.items()} == bm._hash_of
    assert evictable <= set(bm._hash_of)
    assert not free & set(bm._hash_of)
    assert bm.num_free_blocks == len(free) + len(evictable)


def snapshot(bm: BlockManager) -> tuple:
    return (dict(bm._free._length), list(bm._evictable), dict(bm._cached), list(bm._refcount),
            {seq_id: list(seq.blocks) for seq_id, seq in bm._seqs.items()})


def run_prompt(bm: BlockManager, seq_id: str, tokens: list[int]) -> int:
    """begin + allocate + commit the whole prompt; returns the cached token count."""
    cached = bm.begin(seq_id, tokens)
    assert bm.allocate_slots(seq_id, len(tokens))
    bm.commit(seq_id, tokens, len(tokens))
    return cached


def test_allocate_grow_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.begin("a", list(range(10))) == 0
    assert bm.allocate_slots("a", 10)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 12) and bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 13) and bm.block_table("a") == [0, 1, 2, 3]
    assert bm.allocate_slots("a", 5) and len(bm.block_table("a")) == 4  # never shrinks
    assert bm.num_free_blocks == 4 and bm.usage == 0.5
    with pytest.raises(ValueError):
        bm.begin("a", [1])
    with pytest.raises(KeyError):
        bm.allocate_slots("nobody", 1)
    with pytest.raises(ValueError):
        bm.commit("a", list(range(20)), 17)  # only 16 slots allocated
    bm.free("a")
    bm.free("a")  # unknown id: no-op
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    check_invariants(bm)


def test_truncate_releases_the_blocks_past_the_tokens_kept():
    """Blocks reserved past a sequence's tokens (a rejected draft's positions) go
    back at once, tail first and coalesced; written, cached blocks it drops stay
    cached (evictable); a shorter table is left alone; bad input names its field."""
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    run_prompt(bm, "a", tokens)  # blocks 0, 1 full and cached; 2 holds token 8
    assert bm.allocate_slots("a", 9 + 10) and bm.block_table("a") == [0, 1, 2, 3, 4]
    bm.truncate("a", 10)  # the draft's first token accepted: 10 tokens, 3 blocks
    assert bm.block_table("a") == [0, 1, 2] and bm.num_free_blocks == 5
    assert bm._free._length == {3: 5}  # back in one run with the rest of the pool
    check_invariants(bm)
    bm.truncate("a", 12)  # holds fewer blocks already: nothing changes
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 13) and bm.block_table("a") == [0, 1, 2, 3]  # grows again
    bm.truncate("a", 4)  # past written blocks too: cached block 1 stays a hit
    assert bm.block_table("a") == [0] and list(bm._evictable) == [1]
    assert bm.lookup_prefix(tokens) == 8
    check_invariants(bm)
    with pytest.raises(ValueError, match="^num_tokens: "):
        bm.truncate("a", -1)
    with pytest.raises(KeyError):
        bm.truncate("nobody", 0)
    bm.commit("a", tokens, 4)
    bm.free("a")
    assert bm.num_free_blocks == 8
    check_invariants(bm)


def test_prefix_hit_shares_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    assert run_prompt(bm, "a", prompt) == 0
    assert run_prompt(bm, "b", prompt) == 8
    a, b = bm.block_table("a"), bm.block_table("b")
    assert b[:2] == a[:2] and b[2] != a[2]
    assert [bm._refcount[x] for x in a] == [2, 2, 1]
    assert bm.num_free_blocks == 4
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 8)
    bm.free("a")
    assert bm.num_free_blocks == 5  # the shared blocks are still held by b
    bm.free("b")
    assert bm.num_free_blocks == 8
    assert bm.lookup_prefix(prompt) == 8  # cached blocks outlive their sequences
    check_invariants(bm)


def test_hits_leave_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    run_prompt(bm, "a", prompt)
    assert bm.lookup_prefix(prompt) == 4  # both blocks cached, the last one is not a hit
    assert bm.lookup_prefix(prompt + [99]) == 8
    assert bm.lookup_prefix(prompt[:3]) == 0
    assert bm.lookup_prefix([]) == 0


def test_generated_tokens_become_hits():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(6))
    run_prompt(bm, "a", tokens)
    for token in (50, 51, 52):  # decode: one token at a time
        tokens.append(token)
        assert bm.allocate_slots("a", len(tokens))
        bm.commit("a", tokens, len(tokens))
    assert bm.lookup_prefix(tokens + [7]) == 8


def test_hash_is_chained_and_lookup_read_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    before = snapshot(bm)
    assert bm.lookup_prefix([9, 9, 3, 4, 5]) == 0  # same second block, other prefix
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == 4
    assert snapshot(bm) == before
    assert bm.prefix_cache_queries == 5


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 1, 1])
    run_prompt(bm, "b", [2, 2, 2])
    bm.free("a")
    bm.free("b")  # evictable, least recent first: a's, b's
    assert run_prompt(bm, "c", [1, 1, 0]) == 2  # a hit makes a's block most recent
    bm.free("c")
    run_prompt(bm, "d", [3, 3, 3, 3, 3, 3, 3])  # 4 blocks: both cached blocks evicted
    bm.free("d")
    assert bm.lookup_prefix([1, 1, 0]) == 0 and bm.lookup_prefix([2, 2, 0]) == 0

    bm = BlockManager(num_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 1, 1])
    run_prompt(bm, "b", [2, 2, 2])
    bm.free("a")
    bm.free("b")
    run_prompt(bm, "c", [1, 1, 0])
    bm.free("c")
    run_prompt(bm, "d", [3, 3, 3, 3, 3])  # 3 blocks: one eviction, b's (least recent)
    assert bm.lookup_prefix([1, 1, 0]) == 2 and bm.lookup_prefix([2, 2, 0]) == 0
    check_invariants(bm)


def test_free_evicts_tail_before_head():
    bm = BlockManager(num_blocks=4, block_size=1)
    run_prompt(bm, "a", [1, 2, 3, 4])
    bm.free("a")
    assert list(bm._evictable) == [3, 2, 1, 0]
    run_prompt(bm, "b", [7])  # one eviction: a's tail
    assert bm.lookup_prefix([1, 2, 3, 4, 0]) == 3


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=8, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4])
    bm.free("a")  # blocks 0 and 1 evictable
    bm.begin("b", [5, 6, 7])
    assert bm.allocate_slots("b", 6)  # blocks 2..4, evicting nothing
    bm.begin("c", [9, 9, 9])
    before = snapshot(bm)
    assert not bm.allocate_slots("c", 12)  # needs 6: 3 free + 2 evictable are too few
    assert snapshot(bm) == before
    assert bm.allocate_slots("c", 10)  # needs 5: the 3 free, then both evicted
    assert bm.num_free_blocks == 0 and not bm._evictable
    check_invariants(bm)


def test_lone_sequence_grows_contiguously():
    bm = BlockManager(num_blocks=64, block_size=4)
    bm.begin("a", [0])
    for n in range(1, 64 * 4 + 1):
        assert bm.allocate_slots("a", n)
    assert bm.block_groups("a") == [(0, 64)]
    assert not bm.allocate_slots("a", 64 * 4 + 1)


def test_growth_after_prefix_hit_extends_the_hit_run():
    bm = BlockManager(num_blocks=16, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")  # blocks 0, 1 cached; the partial block 2 back in the pool
    assert run_prompt(bm, "b", [1, 2, 3, 4, 9, 9, 9]) == 4
    assert bm.block_groups("b") == [(0, 4)]


def test_adjacency_then_best_fit():
    bm = BlockManager(num_blocks=16, block_size=1, enable_prefix_caching=False)
    for seq_id, length in [("a", 3), ("s1", 1), ("b", 1), ("s2", 1), ("c", 2), ("s3", 1),
                           ("rest", 7)]:
        bm.begin(seq_id, [0])
        assert bm.allocate_slots(seq_id, length)
    assert bm.block_groups("rest") == [(9, 7)] and bm.num_free_blocks == 0
    for seq_id in ("a", "b", "c"):
        bm.free(seq_id)  # free runs: (0, 3), (4, 1), (6, 2)

    assert bm.allocate_slots("s2", 2)  # extends s2 at 5 into 6 rather than best fit 4
    assert bm.block_groups("s2") == [(5, 2)]
    bm.free("s2")
    bm.begin("s2", [0])
    assert bm.allocate_slots("s2", 1)  # runs (0,3) (4,4): smallest fit is 3 long
    assert bm.block_groups("s2") == [(0, 1)]
    bm.free("s2")

    bm.begin("two", [0])
    assert bm.allocate_slots("two", 2)
    bm.begin("one", [0])
    assert bm.allocate_slots("one", 1)
    bm.free("s1")
    bm.begin("four", [0])
    assert bm.allocate_slots("four", 4)
    assert bm.block_groups("two") == [(0, 2)]  # runs were (0,3) (4,4)
    assert bm.block_groups("one") == [(2, 1)]
    assert bm.block_groups("four") == [(3, 4)]  # 3 freed by s1 coalesced with 4..7
    check_invariants(bm)


def test_scattered_allocation_takes_longest_runs_then_best_fit():
    bm = BlockManager(num_blocks=12, block_size=1, enable_prefix_caching=False)
    for seq_id, length in [("a", 5), ("s1", 1), ("b", 2), ("s2", 1), ("c", 3)]:
        bm.begin(seq_id, [0])
        assert bm.allocate_slots(seq_id, length)
    for seq_id in ("a", "b", "c"):
        bm.free(seq_id)  # free runs: (0, 5), (6, 2), (9, 3)
    bm.begin("big", [0])
    assert bm.allocate_slots("big", 7)  # no run of 7: the longest, then the best fit for 2
    assert bm.block_groups("big") == [(0, 5), (6, 2)]
    check_invariants(bm)


def test_duplicate_block_is_not_registered_twice():
    bm = BlockManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    for seq_id in ("a", "b"):  # computed concurrently: neither sees the other's blocks
        assert bm.begin(seq_id, prompt) == 0
        assert bm.allocate_slots(seq_id, len(prompt))
    bm.commit("a", prompt, 5)
    bm.commit("b", prompt, 5)
    assert sorted(bm._cached.values()) == bm.block_table("a")[:2]
    bm.free("b")
    assert not bm._evictable  # b's copies went straight back to the pool
    bm.free("a")
    assert bm.num_free_blocks == 8 and len(bm._evictable) == 2
    check_invariants(bm)


def test_reset_prefix_cache_keeps_referenced_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    run_prompt(bm, "a", [1, 2, 3])
    run_prompt(bm, "b", [4, 5, 6])
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.lookup_prefix([1, 2, 3]) == 0
    assert bm.lookup_prefix([4, 5, 6]) == 2
    assert bm.num_free_blocks == 6
    check_invariants(bm)


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    assert run_prompt(bm, "b", [1, 2, 3, 4, 5]) == 0
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == 0
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.free("a")
    bm.free("b")
    assert bm._free._length == {0: 8}


BASES = [[0, 1, 2, 3] * 4, [0, 1, 2, 3, 3, 2, 1, 0] * 2, [3] * 16]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random begin / allocate / commit / free / abort against a model of the engine.

    The model also tracks what each block's KV holds (the full prefix ending at
    it, for full blocks) so that every prefix hit can be checked for
    correctness, and asserts that no step ever writes into a shared block.
    """

    @initialize(num_blocks=st.integers(1, 40), block_size=st.integers(1, 4),
                caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.pending: dict[int, int] = {}  # allocated and written, not yet committed
        self.content: dict[int, tuple[int, ...] | None] = {}
        self.next_id = 0

    @precondition(lambda self: len(self.tokens) < 4)
    @rule(base=st.sampled_from(BASES), cut=st.integers(0, 16),
          extra=st.lists(st.integers(0, 3), max_size=5))
    def begin(self, base: list[int], cut: int, extra: list[int]) -> None:
        tokens = base[:cut] + extra or [0]
        bm, seq_id = self.bm, self.next_id
        self.next_id += 1
        expected = bm.lookup_prefix(tokens)
        cached = bm.begin(seq_id, tokens)
        assert cached == expected and cached % bm.block_size == 0 and cached < len(tokens)
        for i, block in enumerate(bm.block_table(seq_id)):
            assert self.content[block] == tuple(tokens[:(i + 1) * bm.block_size])
        self.tokens[seq_id] = tokens
        self.computed[seq_id] = cached

    @precondition(lambda self: set(self.computed) - set(self.pending))
    @rule(data=st.data(), chunk=st.integers(1, 8), sampled=st.integers(0, 3),
          then_commit=st.booleans())
    def schedule(self, data: st.DataObject, chunk: int, sampled: int, then_commit: bool) -> None:
        """One engine step for a sequence; without ``then_commit`` it stays in flight."""
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(set(self.computed) - set(self.pending))))
        tokens, start = self.tokens[seq_id], self.computed[seq_id]
        if start == len(tokens):
            tokens.append(sampled)  # decode: the last sampled token needs its KV
        end = min(len(tokens), start + chunk)
        needed = -(-end // bm.block_size) - len(bm.block_table(seq_id))
        before = snapshot(bm)
        if not bm.allocate_slots(seq_id, end):
            assert needed > bm.num_free_blocks and snapshot(bm) == before
            return
        table = bm.block_table(seq_id)
        assert len(table) == -(-end // bm.block_size)
        for i in range(start // bm.block_size, len(table)):
            assert bm._refcount[table[i]] == 1, "a step writes into a shared block"
            full = (i + 1) * bm.block_size <= end
            self.content[table[i]] = tuple(tokens[:(i + 1) * bm.block_size]) if full else None
        self.pending[seq_id] = end
        if then_commit:
            self.commit_seq(seq_id)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        self.commit_seq(data.draw(st.sampled_from(sorted(self.pending))))

    def commit_seq(self, seq_id: int) -> None:
        end = self.pending.pop(seq_id)
        self.bm.commit(seq_id, self.tokens[seq_id], end)
        self.computed[seq_id] = end

    @precondition(lambda self: self.computed)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        """Finish or abort a sequence (possibly mid-step, before its commit)."""
        seq_id = data.draw(st.sampled_from(sorted(self.computed)))
        self.bm.free(seq_id)
        del self.tokens[seq_id], self.computed[seq_id]
        self.pending.pop(seq_id, None)

    def decode_ready(self) -> list[int]:
        """Sequences not in flight whose every token is computed."""
        return sorted(s for s in set(self.computed) - set(self.pending)
                      if self.computed[s] == len(self.tokens[s]))

    @precondition(lambda self: self.decode_ready())
    @rule(data=st.data(), last=st.integers(0, 3),
          draft=st.lists(st.integers(0, 3), min_size=1, max_size=8),
          accepted=st.integers(0, 8), verified=st.integers(0, 3))
    def draft_step(self, data: st.DataObject, last: int, draft: list[int], accepted: int,
                   verified: int) -> None:
        """A decode step with a draft (speculative decoding): blocks for the last
        sampled token and the draft, the first ``accepted`` draft tokens and the
        target's token (``verified``) appended, then the table truncated to the tokens' blocks:
        its head stays, the blocks of rejected positions go back to the pool."""
        bm = self.bm
        seq_id = data.draw(st.sampled_from(self.decode_ready()))
        tokens, start = self.tokens[seq_id], self.computed[seq_id]
        before = snapshot(bm)
        if not bm.allocate_slots(seq_id, start + 1 + len(draft)):
            assert snapshot(bm) == before
            return
        table = bm.block_table(seq_id)
        assert all(bm._refcount[b] == 1 for b in table[start // bm.block_size:]), \
            "a step writes into a shared block"
        free = bm.num_free_blocks
        tokens += [last] + draft[:accepted] + [verified]
        self.computed[seq_id] = len(tokens) - 1  # the target's token is not fed yet
        bm.commit(seq_id, tokens, len(tokens) - 1)
        bm.truncate(seq_id, len(tokens))
        # a fully accepted draft's last token has no block yet (the next step's allocation)
        keep = min(len(table), -(-len(tokens) // bm.block_size))
        assert bm.block_table(seq_id) == table[:keep]
        assert bm.num_free_blocks == free + len(table) - keep
        for i in range(start // bm.block_size, keep):
            full = (i + 1) * bm.block_size < len(tokens)
            self.content[table[i]] = tuple(tokens[:(i + 1) * bm.block_size]) if full else None

    @precondition(lambda self: self.bm._evictable)
    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        check_invariants(self.bm)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq_id in list(self.computed):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        check_invariants(self.bm)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=100, stateful_step_count=100,
                                            deadline=None)


def test_admission_cost_counts_evictable_hits():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(13))  # 3 full blocks can be cached (the 13th token stays uncached)
    bm.begin("a", tokens)
    assert bm.allocate_slots("a", 13)
    bm.commit("a", tokens, 13)
    bm.free("a")  # its 3 hashed blocks are now evictable, still counted as free
    assert bm.num_free_blocks == 8
    # Re-admitting needs 1 new block for tokens 12..13 plus the 3 evictable hits it takes.
    assert bm.admission_cost(tokens + [99], 14) == 1 + 3
    bm.begin("b", tokens[:8] + [50, 51, 52, 53, 54])  # shares 2 blocks, now referenced
    assert bm.admission_cost(tokens + [99], 14) == 1 + 1
    assert bm.prefix_cache_queries == 13 + 13  # admission_cost queried nothing
