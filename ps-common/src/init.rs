//! Deterministic row initialization.
//!
//! A row's initial values depend only on (table seed, key, dim, initializer),
//! never on which shard or replica creates it or when, so a restarted or
//! replicated shard recreates exactly the same rows.

use crate::routing::mix64;
use crate::table::InitializerSpec;

/// A small counter-based generator (splitmix64) seeded per row.
#[derive(Debug, Clone)]
pub struct RowRng {
    state: u64,
}

impl RowRng {
    /// The generator for row `key` of a table seeded with `seed`.
    pub fn new(seed: u64, key: u64) -> Self {
        Self {
            state: mix64(seed ^ mix64(key.wrapping_add(0x9e37_79b9_7f4a_7c15))),
        }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller; one value per call, the pair's twin is dropped
    /// so that the stream stays a pure function of the call count).
    #[inline]
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Fills `out` with the initial weights of row `key`.
pub fn init_row(init: &InitializerSpec, seed: u64, key: u64, out: &mut [f32]) {
    match *init {
        InitializerSpec::Zeros => out.fill(0.0),
        InitializerSpec::Constant { value } => out.fill(value),
        InitializerSpec::Uniform { low, high } => {
            let mut rng = RowRng::new(seed, key);
            let (low, span) = (f64::from(low), f64::from(high) - f64::from(low));
            out.iter_mut()
                .for_each(|x| *x = (low + span * rng.next_f64()) as f32);
        }
        InitializerSpec::Normal { mean, std } => {
            let mut rng = RowRng::new(seed, key);
            let (mean, std) = (f64::from(mean), f64::from(std));
            out.iter_mut()
                .for_each(|x| *x = (mean + std * rng.next_normal()) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_key_give_the_same_row_different_keys_differ() {
        let init = InitializerSpec::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let (mut a, mut b, mut c) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        init_row(&init, 7, 42, &mut a);
        init_row(&init, 7, 42, &mut b);
        init_row(&init, 7, 43, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        init_row(&init, 8, 42, &mut c);
        assert_ne!(a, c, "the table seed changes the row");
    }

    #[test]
    fn normal_and_uniform_have_the_requested_moments() {
        let n = 20_000u64;
        let mut row = [0f32; 4];
        let (mut sum, mut sq) = (0f64, 0f64);
        for key in 0..n {
            init_row(
                &InitializerSpec::Normal {
                    mean: 1.0,
                    std: 2.0,
                },
                3,
                key,
                &mut row,
            );
            for &x in &row {
                sum += f64::from(x);
                sq += f64::from(x) * f64::from(x);
            }
        }
        let count = (n * 4) as f64;
        let mean = sum / count;
        let std = (sq / count - mean * mean).sqrt();
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!((std - 2.0).abs() < 0.03, "std {std}");

        for key in 0..1000 {
            init_row(
                &InitializerSpec::Uniform {
                    low: -0.5,
                    high: 0.25,
                },
                3,
                key,
                &mut row,
            );
            assert!(row.iter().all(|&x| (-0.5..0.25).contains(&x)));
        }
    }
}
