//! Key -> shard routing: the one function every process uses.
//!
//! Keys are first scrambled with the splitmix64 finalizer (so sequential ids
//! spread evenly) and then placed with jump consistent hash (Lamping & Veach,
//! 2014), which balances keys across shards and, when a shard is added, moves
//! only about 1/N of them. Dense tables are routed by row *block*, so a block
//! of consecutive rows lives on one shard.

/// The splitmix64 finalizer: a fast bijective mix of 64 bits.
///
/// Also used to seed row initializers and to hash keys in client-side maps.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A `Hasher` for `u64` keys that applies [`mix64`]: several times cheaper
/// than SipHash for maps keyed by ids. It is not keyed: `mix64` is
/// invertible, so a client that chooses ids adversarially can crowd one
/// bucket; only authenticated workers should reach a shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    #[inline]
    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// Builds [`IdHasher`]s; use as the `S` parameter of `HashMap`/`DashMap` keyed by ids.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// Jump consistent hash: maps `key` to a bucket in `[0, buckets)`.
///
/// `buckets` must be at least 1.
#[inline]
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// 64-bit FNV-1a of a byte string (used to give each dense table its own block layout).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How one table's keys are placed on shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Each key routes on its own.
    Sparse,
    /// Rows are grouped into blocks of `block_rows`; a block routes as a unit.
    Dense {
        /// `fnv1a64` of the table name.
        name_hash: u64,
        /// Rows per block (>= 1).
        block_rows: u64,
    },
}

impl Placement {
    /// Placement of a dense table named `name` with `block_rows` rows per block.
    pub fn dense(name: &str, block_rows: u32) -> Self {
        Placement::Dense {
            name_hash: fnv1a64(name.as_bytes()),
            block_rows: u64::from(block_rows.max(1)),
        }
    }
}

/// Routes keys of any table to one of `num_shards` shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRouter {
    num_shards: u32,
}

impl ShardRouter {
    /// A router over `num_shards` shards (at least 1).
    pub fn new(num_shards: u32) -> Self {
        Self {
            num_shards: num_shards.max(1),
        }
    }

    /// Number of shards routed over.
    pub fn num_shards(&self) -> u32 {
        self.num_shards
    }

    /// The shard that owns `key` of a table with the given placement.
    #[inline]
    pub fn shard_of(&self, placement: Placement, key: u64) -> u32 {
        jump_hash(placement.scramble(key), self.num_shards)
    }

    /// [`Self::shard_of`] of each of `keys`, appended to `out` in order:
    /// the same shards, computed [`LANES`] keys at a time (about twice as
    /// fast at 2 to 64 shards: `jump_hash_lanes` says why).
    pub fn shards_of(&self, placement: Placement, keys: &[u64], out: &mut Vec<u32>) {
        out.reserve(keys.len());
        let mut blocks = keys.chunks_exact(LANES);
        for block in &mut blocks {
            out.extend_from_slice(&self.block_owners(placement, block));
        }
        out.extend(
            blocks
                .remainder()
                .iter()
                .map(|&key| self.shard_of(placement, key)),
        );
    }

    /// The first of `keys` that `shard` does not own, if any (a shard's
    /// check of a request's keys), computed as [`Self::shards_of`] does.
    pub fn first_foreign(&self, placement: Placement, keys: &[u64], shard: u32) -> Option<u64> {
        let mut blocks = keys.chunks_exact(LANES);
        for block in &mut blocks {
            let owners = self.block_owners(placement, block);
            if let Some(l) = owners.iter().position(|&owner| owner != shard) {
                return Some(block[l]);
            }
        }
        blocks
            .remainder()
            .iter()
            .copied()
            .find(|&key| self.shard_of(placement, key) != shard)
    }

    /// The shards of one full block of [`LANES`] keys, routed together.
    #[inline]
    fn block_owners(&self, placement: Placement, block: &[u64]) -> [u32; LANES] {
        let scrambled = std::array::from_fn(|l| placement.scramble(block[l]));
        jump_hash_lanes(scrambled, self.num_shards)
    }
}

impl Placement {
    /// The 64 bits jump hash places for `key`.
    #[inline]
    fn scramble(self, key: u64) -> u64 {
        match self {
            Placement::Sparse => mix64(key),
            Placement::Dense {
                name_hash,
                block_rows,
            } => mix64(name_hash ^ (key / block_rows)),
        }
    }
}

/// Keys [`jump_hash_lanes`] places together.
const LANES: usize = 8;

/// [`jump_hash`] of [`LANES`] keys at once, equal to it lane by lane.
///
/// A key's turns through jump hash's loop depend on the key (with 2
/// buckets, one or two turns, each half the time), so key by key the loop's
/// exit mispredicts about every other key and each turn waits on the one
/// before's division. Here every lane takes the same turns, a lane's state
/// changing only while its own loop would still run; the branch becomes a
/// select and the lanes' divisions overlap. Each lane computes exactly the
/// expressions `jump_hash` does, in the same order, so the buckets are the
/// same bits; `routing::tests` compares them.
#[inline]
fn jump_hash_lanes(mut keys: [u64; LANES], buckets: u32) -> [u32; LANES] {
    let buckets = i64::from(buckets);
    let mut b = [-1i64; LANES];
    let mut j = [0i64; LANES];
    loop {
        let mut running = false;
        for l in 0..LANES {
            let active = j[l] < buckets;
            running |= active;
            let key = keys[l]
                .wrapping_mul(2_862_933_555_777_941_757)
                .wrapping_add(1);
            // A finished lane's `j` may be near i64::MAX: its `+ 1` wraps,
            // and its result is thrown away.
            let next = (j[l].wrapping_add(1) as f64
                * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
            if active {
                b[l] = j[l];
                keys[l] = key;
                j[l] = next;
            }
        }
        if !running {
            return b.map(|b| b as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn placements() -> impl Strategy<Value = Placement> {
        prop_oneof![
            Just(Placement::Sparse),
            (1u32..300).prop_map(|rows| Placement::dense("layer.w", rows)),
        ]
    }

    proptest! {
        #[test]
        fn routing_many_keys_at_once_gives_each_key_its_own_shard(
            shards in 1u32..70,
            placement in placements(),
            keys in prop::collection::vec(any::<u64>(), 0..100),
        ) {
            let router = ShardRouter::new(shards);
            let mut many = vec![7];
            router.shards_of(placement, &keys, &mut many);
            let one_by_one: Vec<u32> = keys.iter().map(|&k| router.shard_of(placement, k)).collect();
            prop_assert_eq!(many[0], 7, "what `out` held is kept");
            prop_assert_eq!(&many[1..], &one_by_one[..]);
        }

        #[test]
        fn the_first_foreign_key_is_the_first_another_shard_owns(
            shards in 1u32..6,
            shard in 0u32..6,
            placement in placements(),
            keys in prop::collection::vec(0u64..1000, 0..40),
        ) {
            let router = ShardRouter::new(shards);
            let expected = keys.iter().copied().find(|&k| router.shard_of(placement, k) != shard);
            prop_assert_eq!(router.first_foreign(placement, &keys, shard), expected);
        }
    }

    #[test]
    fn lanes_agree_with_jump_hash_on_a_million_keys() {
        for buckets in [1, 2, 3, 5, 8, 64, 1000, u32::MAX] {
            for block in 0..(1_000_000 / LANES as u64) {
                let keys = std::array::from_fn(|l| mix64(block * LANES as u64 + l as u64));
                let want = keys.map(|k| jump_hash(k, buckets));
                assert_eq!(jump_hash_lanes(keys, buckets), want, "{buckets} buckets");
            }
        }
    }

    fn loads(num_shards: u32, keys: u64) -> Vec<u64> {
        let router = ShardRouter::new(num_shards);
        let mut load = vec![0u64; num_shards as usize];
        for k in 0..keys {
            load[router.shard_of(Placement::Sparse, k) as usize] += 1;
        }
        load
    }

    #[test]
    fn one_million_keys_on_eight_shards_are_balanced_within_ten_percent() {
        let load = loads(8, 1_000_000);
        let mean = 1_000_000.0 / 8.0;
        let max = *load.iter().max().unwrap() as f64;
        assert!(max / mean <= 1.10, "max/mean = {}", max / mean);
    }

    #[test]
    fn adding_a_shard_moves_about_one_nth_of_the_keys() {
        let before = ShardRouter::new(8);
        let after = ShardRouter::new(9);
        let n = 1_000_000u64;
        let moved = (0..n)
            .filter(|&k| {
                before.shard_of(Placement::Sparse, k) != after.shard_of(Placement::Sparse, k)
            })
            .count() as f64;
        let expected = n as f64 / 9.0;
        assert!(
            (moved - expected).abs() / expected < 0.05,
            "moved {moved}, expected about {expected}"
        );
        // Every moved key moves to the new shard: nothing shuffles between old shards.
        for k in 0..100_000 {
            let (a, b) = (
                before.shard_of(Placement::Sparse, k),
                after.shard_of(Placement::Sparse, k),
            );
            assert!(a == b || b == 8);
        }
    }

    #[test]
    fn dense_rows_of_one_block_share_a_shard() {
        let router = ShardRouter::new(4);
        let p = Placement::dense("mlp.w0", 16);
        for block in 0..100u64 {
            let s = router.shard_of(p, block * 16);
            assert!((block * 16..block * 16 + 16).all(|r| router.shard_of(p, r) == s));
        }
        let used: std::collections::HashSet<u32> =
            (0..100u64).map(|b| router.shard_of(p, b * 16)).collect();
        assert_eq!(used.len(), 4, "blocks spread over all shards");
    }

    #[test]
    fn routing_is_a_fixed_function_of_the_key() {
        // Pinned values: every process and every language must agree on these.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        // Computed by an independent Python implementation of the proto's rule.
        let shards: Vec<u32> = (0..10).map(|k| jump_hash(mix64(k), 8)).collect();
        assert_eq!(shards, [0, 0, 7, 0, 5, 6, 4, 4, 0, 1]);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let router = ShardRouter::new(1);
        assert!((0..1000).all(|k| router.shard_of(Placement::Sparse, k) == 0));
    }
}
