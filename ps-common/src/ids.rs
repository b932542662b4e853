//! Random 64-bit ids that name things across processes: a client's
//! writer id, a server's id, a replication stream. Not secrets: std's
//! randomly keyed hasher over the process id and the time.

use std::hash::{BuildHasher, Hasher};

/// A random nonzero id.
pub fn random_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(t.as_nanos());
    }
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ_and_are_never_zero() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| super::random_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}
