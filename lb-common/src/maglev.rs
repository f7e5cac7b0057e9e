//! Weighted Maglev table builder.
//!
//! A VIP's table is an array of `M` (prime) slots, each holding the id of the backend that owns
//! it; the datapath sends a new flow to `table[maglev_index(flow_hash, M)]`. The table must be a
//! pure function of the backend *addresses*, weights and `M`, so that every balancer node behind
//! the same ECMP group builds the same table and a flow keeps its backend whichever node it hits.
//!
//! Construction follows the Maglev paper (each backend walks its own permutation of the slots and
//! claims the next free one when it gets a turn), with two additions for weights:
//! * each backend's slot count is fixed up front by largest-remainder apportionment, so shares
//!   are exact (within one slot of `M * w / W`), not approximate;
//! * turns are handed out in proportion to weight (a credit scheme), so heavy and light backends
//!   fill their permutations' preferred slots at the same pace, which keeps disruption low.
//!
//! See `docs/maglev.md` for the design note and measured disruption.

use alloc::collections::BinaryHeap;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

use crate::{is_prime, MAX_TABLE_SIZE, MIN_TABLE_SIZE};

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Identity that drives the permutation: the backend's address bytes (IPv4 in the first 4
    /// bytes, rest zero), hashed together with `family`. Never the id, so that nodes that number
    /// backends differently still agree on which address owns which slot.
    pub addr: [u8; 16],
    /// `FAMILY_V4` or `FAMILY_V6`; part of the identity.
    pub family: u8,
    /// Value written into the slots this backend owns (its backend id, never 0).
    pub id: u32,
    /// Relative weight; 0 = owns no slot.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Debug, PartialEq, Eq)]
pub enum BuildError {
    /// Maglev permutations only cover every slot when the size is prime.
    SizeNotPrime(u32),
    /// Outside `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
    SizeOutOfRange(u32),
    /// Id 0 marks an empty slot, so no backend may use it.
    ZeroId,
    /// Two backends with the same (family, address), or the same id.
    DuplicateBackend,
}

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BuildError::SizeNotPrime(n) => write!(f, "maglev table size {n} is not prime"),
            BuildError::SizeOutOfRange(n) => write!(
                f,
                "maglev table size {n} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"
            ),
            BuildError::ZeroId => write!(f, "backend id 0 is reserved for empty slots"),
            BuildError::DuplicateBackend => write!(f, "duplicate backend address or id"),
        }
    }
}

impl core::error::Error for BuildError {}

/// Seeds of the two permutation hashes. Fixed forever: changing them (or the hash) reshuffles
/// every table, and nodes running different versions would disagree during an upgrade.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_5f31; // "maglev_1"
const SEED_SKIP: u64 = 0x6d61_676c_6576_5f32; // "maglev_2"

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// splitmix64's finalizer: FNV-1a alone mixes the last bytes poorly, and addresses in one
/// subnet differ only there.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeded 64-bit hash of a backend's identity (family byte, then the 16 address bytes).
fn identity_hash(b: &Backend, seed: u64) -> u64 {
    let mut h = FNV_OFFSET_BASIS ^ seed;
    for &byte in core::iter::once(&b.family).chain(b.addr.iter()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(FNV_PRIME);
    }
    splitmix64(h ^ seed)
}

/// Slots each backend must own: `floor(M*w/W)`, plus one for the `M - sum` largest remainders
/// (ties to the earlier backend in identity order). Exact shares, summing to exactly `M`, so
/// the population loop knows when to stop and cannot drift.
fn quotas(sorted: &[Backend], m: u64) -> Vec<u64> {
    let weights: Vec<u32> = sorted.iter().map(|b| b.weight).collect();
    quotas_of(&weights, m)
}

/// The slots each backend owns in a table of `size` slots ([`build`] fills exactly these), for
/// backends whose weights are given in identity order (family, then address bytes): a check
/// that every backend with weight gets a slot needs no table.
pub fn slot_counts(weights_in_identity_order: &[u32], size: u32) -> Vec<u64> {
    quotas_of(weights_in_identity_order, u64::from(size))
}

fn quotas_of(weights: &[u32], m: u64) -> Vec<u64> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let mut q = vec![0u64; weights.len()];
    if total == 0 {
        return q;
    }
    let mut remainders = Vec::with_capacity(weights.len());
    let mut assigned = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 {
            continue;
        }
        // m <= 2^20 and w < 2^32: no overflow.
        let p = m * u64::from(w);
        q[i] = p / total;
        assigned += q[i];
        remainders.push((p % total, i));
    }
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    // The leftover is below the number of non-zero remainders, so weight-0 backends (not even
    // in the list) never get one.
    for &(_, i) in remainders.iter().take((m - assigned) as usize) {
        q[i] += 1;
    }
    q
}

/// Round in which a backend of weight `w` takes its `k`-th slot (1-based) under the credit
/// scheme "each round add `w` to the credit; while credit >= `max_w`, take a slot and subtract
/// `max_w`". As `w <= max_w` it takes at most one slot per round, and after `r` rounds it has
/// taken `floor(r*w/max_w)`, so the `k`-th take falls in round `ceil(k*max_w/w)`. Computing it
/// directly skips rounds in which nobody takes anything (a very light backend waiting for credit)
/// without changing the result.
fn take_round(k: u64, w: u64, max_w: u64) -> u64 {
    // k <= 2^20 and max_w < 2^32: no overflow.
    (k * max_w).div_ceil(w)
}

/// Builds a table of `size` slots; each slot holds a backend id, 0 where no backend has weight.
///
/// The result depends only on the set of (family, address, weight) and on `size`: not on the
/// order of `backends` and not on the ids, which only label the slots.
pub fn build(backends: &[Backend], size: u32) -> Result<Vec<u32>, BuildError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        return Err(BuildError::SizeOutOfRange(size));
    }
    if !is_prime(size) {
        return Err(BuildError::SizeNotPrime(size));
    }
    if backends.iter().any(|b| b.id == 0) {
        return Err(BuildError::ZeroId);
    }
    // Identity order, so that the caller's order cannot matter.
    let mut sorted = backends.to_vec();
    sorted.sort_unstable_by_key(|b| (b.family, b.addr));
    if sorted
        .windows(2)
        .any(|w| (w[0].family, w[0].addr) == (w[1].family, w[1].addr))
    {
        return Err(BuildError::DuplicateBackend);
    }
    // A shared id would make two backends indistinguishable in the table.
    let mut ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(BuildError::DuplicateBackend);
    }

    let m = u64::from(size);
    let mut table = vec![0u32; size as usize];
    let quota = quotas(&sorted, m);
    let max_w = sorted
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(0);
    if max_w == 0 {
        return Ok(table);
    }

    // Each backend's position in its permutation (offset + j*skip) % M, kept as the current
    // slot and advanced by `skip` so that no multiplication or division is needed per step.
    let mut cursor: Vec<u64> = Vec::with_capacity(sorted.len());
    let mut skip: Vec<u64> = Vec::with_capacity(sorted.len());
    for b in &sorted {
        cursor.push(identity_hash(b, SEED_OFFSET) % m);
        skip.push(identity_hash(b, SEED_SKIP) % (m - 1) + 1);
    }
    let mut taken = vec![0u64; sorted.len()];

    // Turns in (round, identity order): a min-heap replaces scanning all backends every round,
    // so the cost is O(M log N) plus the permutation walks, whatever the weights.
    let mut turns = BinaryHeap::with_capacity(sorted.len());
    for (i, b) in sorted.iter().enumerate() {
        if quota[i] > 0 {
            turns.push(Reverse((take_round(1, u64::from(b.weight), max_w), i)));
        }
    }
    while let Some(Reverse((_, i))) = turns.pop() {
        // Next unclaimed slot in i's permutation. One exists: the permutation visits every
        // slot (M prime, 0 < skip < M) and the quotas sum to M, so while i is below its quota
        // some slot is free.
        let mut slot = cursor[i];
        while table[slot as usize] != 0 {
            slot += skip[i];
            if slot >= m {
                slot -= m;
            }
        }
        table[slot as usize] = sorted[i].id;
        cursor[i] = slot;
        taken[i] += 1;
        if taken[i] < quota[i] {
            let r = take_round(taken[i] + 1, u64::from(sorted[i].weight), max_w);
            turns.push(Reverse((r, i)));
        }
    }
    debug_assert!(table.iter().all(|&s| s != 0));
    Ok(table)
}

/// Number of slots that differ between two tables of the same size (for the disruption budget).
/// Tables of different sizes share no slot meaningfully; the extra slots count as changed.
pub fn slots_changed(a: &[u32], b: &[u32]) -> usize {
    let common = a.iter().zip(b).filter(|(x, y)| x != y).count();
    common + a.len().abs_diff(b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_TABLE_SIZE, FAMILY_V4, FAMILY_V6};
    use std::collections::HashMap;

    const M: u32 = DEFAULT_TABLE_SIZE;

    fn v4(i: u32) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0] = 10;
        a[1..4].copy_from_slice(&i.to_be_bytes()[1..]);
        a
    }

    fn backend(i: u32, weight: u32) -> Backend {
        Backend {
            addr: v4(i),
            family: FAMILY_V4,
            id: i + 1,
            weight,
        }
    }

    fn equal(n: u32) -> Vec<Backend> {
        (0..n).map(|i| backend(i, 100)).collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// Fixed-seed LCG (Knuth's MMIX constants), so the "random" inputs are reproducible.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.next() as usize % (i + 1);
                v.swap(i, j);
            }
        }
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        for n in [3u32, 10, 100] {
            let t = build(&equal(n), M).unwrap();
            let c = counts(&t);
            assert_eq!(c.len(), n as usize, "every backend owns slots");
            assert!(!c.contains_key(&0), "no empty slot");
            let max = *c.values().max().unwrap();
            let min = *c.values().min().unwrap();
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
        }
    }

    fn check_shares(bs: &[Backend], size: u32) {
        let t = build(bs, size).unwrap();
        let c = counts(&t);
        let total: f64 = bs.iter().map(|b| b.weight as f64).sum();
        for b in bs {
            let got = *c.get(&b.id).unwrap_or(&0) as f64;
            let exact = size as f64 * b.weight as f64 / total;
            let share = got / size as f64;
            let want = b.weight as f64 / total;
            assert!(
                (share - want).abs() <= 0.01,
                "id {} share {share} want {want}",
                b.id
            );
            assert!(
                (got - exact).abs() < 1.0,
                "id {} got {got} slots, exact quota {exact}",
                b.id
            );
        }
    }

    #[test]
    fn weighted_shares_are_exact() {
        let bs: Vec<Backend> = [1, 2, 3, 7]
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(i as u32, w))
            .collect();
        check_shares(&bs, M);
        check_shares(&bs, 251);

        let mut rng = Lcg(0x1b1b_5eed);
        let bs: Vec<Backend> = (0..100)
            .map(|i| backend(i, 1 + rng.next() % 1000))
            .collect();
        check_shares(&bs, M);
        check_shares(&bs, 1_009);
    }

    #[test]
    fn extreme_weights_are_exact_and_fast() {
        // One huge weight among tiny ones: a naive round loop would spin ~2^32 empty rounds per
        // light take once the heavy backend is full.
        let mut bs: Vec<Backend> = (0..100).map(|i| backend(i, 1)).collect();
        bs[37].weight = u32::MAX;
        check_shares(&bs, M);
        let bs: Vec<Backend> = (0..100).map(|i| backend(i, u32::MAX)).collect();
        check_shares(&bs, crate::MAX_TABLE_SIZE);
    }

    /// (fraction of all slots that changed, fraction that changed among slots neither table gives
    /// to the backend that came or went).
    fn disruption(before: &[u32], after: &[u32], moved_id: u32) -> (f64, f64) {
        let m = before.len() as f64;
        let total = slots_changed(before, after);
        let others = before
            .iter()
            .zip(after)
            .filter(|(a, b)| a != b && **a != moved_id && **b != moved_id)
            .count();
        (total as f64 / m, others as f64 / m)
    }

    /// Bounds on (changed fraction / ideal 1/N). Plain Maglev (which this is, for equal weights)
    /// moves some slots between surviving backends too, more so as N/M grows: measured over every
    /// removal and 20 additions at M = 65537, the ratio is 1.02-1.05 for N = 10 and 1.50-1.66 for
    /// N = 100 (1.24 at M = 262139, 1.11 at M = 1048573), so the bounds leave a small margin.
    #[test]
    fn removing_or_adding_a_backend_moves_about_one_nth() {
        for (n, bound) in [(10u32, 1.1), (100, 1.8)] {
            let all = equal(n);
            let before = build(&all, M).unwrap();
            for gone in [0, n / 3, n - 1] {
                let rest: Vec<Backend> = all.iter().copied().filter(|b| b.id != gone + 1).collect();
                let after = build(&rest, M).unwrap();
                let (total, others) = disruption(&before, &after, gone + 1);
                let ideal = 1.0 / n as f64;
                println!(
                    "remove 1 of {n}: changed {total:.4} (ideal {ideal:.4}, ratio {:.3}), \
                     of which not the removed backend's: {others:.4}",
                    total / ideal
                );
                assert!(
                    total >= ideal * 0.9,
                    "the removed backend's slots must move"
                );
                assert!(total <= ideal * bound, "n={n}: changed {total}");
            }

            let mut more = all.clone();
            more.push(backend(n, 100));
            let after = build(&more, M).unwrap();
            let (total, others) = disruption(&before, &after, n + 1);
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "add 1 to {n}: changed {total:.4} (ideal {ideal:.4}, ratio {:.3}), \
                 of which not given to the new backend: {others:.4}",
                total / ideal
            );
            assert!(total >= ideal * 0.9);
            assert!(total <= ideal * bound, "n={n}: changed {total}");
        }
    }

    #[test]
    fn weight_change_moves_close_to_the_minimum() {
        let all = equal(10);
        let before = build(&all, M).unwrap();
        let mut halved = all.clone();
        halved[4].weight = 50;
        let after = build(&halved, M).unwrap();
        // The fewest slots any table could change: every slot a backend must give up.
        let (cb, ca) = (counts(&before), counts(&after));
        let minimum: usize = cb
            .iter()
            .map(|(id, &n)| n.saturating_sub(*ca.get(id).unwrap_or(&0)))
            .sum();
        let changed = slots_changed(&before, &after);
        println!(
            "halve 1 of 10: changed {:.4}, minimum {:.4}, ratio {:.3}",
            changed as f64 / M as f64,
            minimum as f64 / M as f64,
            changed as f64 / minimum as f64
        );
        assert!(changed >= minimum);
        assert!(changed as f64 <= minimum as f64 * 1.2);
    }

    #[test]
    fn weight_zero_is_the_same_as_absent() {
        let all = equal(10);
        let mut drained = all.clone();
        drained[3].weight = 0;
        let without: Vec<Backend> = all.iter().copied().filter(|b| b.id != 4).collect();
        assert_eq!(build(&drained, M).unwrap(), build(&without, M).unwrap());
    }

    #[test]
    fn scaling_every_weight_by_one_integer_leaves_the_table_as_it_is() {
        // The model relies on it to scale coarse weights back up without moving a slot.
        let mut rng = Lcg(7);
        for _ in 0..20 {
            let bs: Vec<Backend> = (0..5).map(|i| backend(i, rng.next() % 8)).collect();
            if bs.iter().all(|b| b.weight == 0) {
                continue;
            }
            let k = 2 + rng.next() % 60;
            let scaled: Vec<Backend> = bs
                .iter()
                .map(|b| Backend {
                    weight: b.weight * k,
                    ..*b
                })
                .collect();
            assert_eq!(build(&bs, 10_007).unwrap(), build(&scaled, 10_007).unwrap());
        }
    }

    /// FNV-1a of the table bytes, to pin the exact output.
    fn fingerprint(t: &[u32]) -> u64 {
        let mut h = FNV_OFFSET_BASIS;
        for b in t.iter().flat_map(|s| s.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        h
    }

    #[test]
    fn tables_are_identical_across_runs_orders_and_ids() {
        let mut rng = Lcg(42);
        let mut bs: Vec<Backend> = (0..50).map(|i| backend(i, 1 + rng.next() % 10)).collect();
        // Mixed families, including a v6 address with the same bytes as a v4 one.
        for i in 0..5 {
            bs.push(Backend {
                addr: v4(i),
                family: FAMILY_V6,
                id: 1000 + i,
                weight: 3,
            });
        }
        let reference = build(&bs, M).unwrap();
        assert_eq!(build(&bs, M).unwrap(), reference);
        // Pinned: a different value means nodes on different versions would build different
        // tables (and move flows) during a rolling upgrade. Change only on purpose.
        assert_eq!(
            fingerprint(&reference),
            6_303_745_126_790_883_896,
            "table fingerprint changed"
        );

        let addr_of = |bs: &[Backend], t: &[u32]| -> Vec<(u8, [u8; 16])> {
            let by_id: HashMap<u32, (u8, [u8; 16])> =
                bs.iter().map(|b| (b.id, (b.family, b.addr))).collect();
            t.iter().map(|id| by_id[id]).collect()
        };
        let owners = addr_of(&bs, &reference);
        for _ in 0..5 {
            let mut shuffled = bs.clone();
            rng.shuffle(&mut shuffled);
            assert_eq!(build(&shuffled, M).unwrap(), reference);
            // Another node numbering the same backends differently.
            for b in shuffled.iter_mut() {
                b.id = 1 + rng.next() % 1_000_000;
            }
            let mut seen = std::collections::HashSet::new();
            shuffled.retain(|b| seen.insert(b.id));
            if shuffled.len() != bs.len() {
                continue;
            }
            let t = build(&shuffled, M).unwrap();
            assert_ne!(t, reference);
            assert_eq!(addr_of(&shuffled, &t), owners);
        }
    }

    #[test]
    fn fills_every_slot_or_none() {
        let t = build(&[backend(0, 0), backend(1, 5), backend(2, 0)], M).unwrap();
        assert!(t.iter().all(|&s| s == 2));
        let t = build(&equal(7), 7).unwrap();
        assert!(t.iter().all(|&s| s != 0));
        assert_eq!(counts(&t).len(), 7);
        // More backends than slots: still full, each backend at most one slot.
        let t = build(&equal(20), 7).unwrap();
        assert!(t.iter().all(|&s| s != 0));
        assert!(counts(&t).values().all(|&c| c == 1));

        let zero = build(&[backend(0, 0), backend(1, 0)], M).unwrap();
        assert_eq!(zero.len(), M as usize);
        assert!(zero.iter().all(|&s| s == 0));
        assert!(build(&[], 13).unwrap().iter().all(|&s| s == 0));
    }

    #[test]
    fn rejects_bad_input() {
        let ok = equal(3);
        assert_eq!(build(&ok, 65_536), Err(BuildError::SizeNotPrime(65_536)));
        assert_eq!(build(&ok, 5), Err(BuildError::SizeOutOfRange(5)));
        let too_big = 1_048_583;
        assert!(is_prime(too_big) && too_big > crate::MAX_TABLE_SIZE);
        assert_eq!(
            build(&ok, too_big),
            Err(BuildError::SizeOutOfRange(too_big))
        );
        let mut zero_id = ok.clone();
        zero_id[1].id = 0;
        assert_eq!(build(&zero_id, M), Err(BuildError::ZeroId));
        let mut dup_addr = ok.clone();
        dup_addr[2].addr = dup_addr[0].addr;
        assert_eq!(build(&dup_addr, M), Err(BuildError::DuplicateBackend));
        let mut dup_id = ok.clone();
        dup_id[2].id = dup_id[0].id;
        assert_eq!(build(&dup_id, M), Err(BuildError::DuplicateBackend));
        // Same bytes, other family: a different backend.
        let mut other_family = ok.clone();
        other_family[2].addr = other_family[0].addr;
        other_family[2].family = FAMILY_V6;
        assert!(build(&other_family, M).is_ok());
    }

    #[test]
    fn slots_changed_counts_differences() {
        assert_eq!(slots_changed(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(slots_changed(&[1, 2, 3], &[1, 3, 2]), 2);
        assert_eq!(slots_changed(&[1, 2, 3], &[1, 2]), 1);
    }

    #[test]
    fn build_time() {
        let mut rng = Lcg(7);
        let bs: Vec<Backend> = (0..100).map(|i| backend(i, 1 + rng.next() % 100)).collect();
        let start = std::time::Instant::now();
        let runs = 20;
        for _ in 0..runs {
            std::hint::black_box(build(std::hint::black_box(&bs), M).unwrap());
        }
        let each = start.elapsed() / runs;
        println!("build M={M} N=100: {each:?} per table");
        // Generous bound (machines are shared): catches a quadratic regression, not jitter.
        if !cfg!(debug_assertions) {
            assert!(each.as_millis() < 50, "{each:?}");
        }
    }
}
