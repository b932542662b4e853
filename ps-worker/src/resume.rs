//! Where each worker of a job is in its data, recorded on the servers so
//! that a worker restarted with the same rank resumes there.
//!
//! A position is kept in a dense table of the job (one row per rank, named
//! after the job's run identity and world size) and written with Assign,
//! so it is replicated with the shard and saved in its checkpoints. A
//! worker records a position only once every push of the steps before it
//! has been acknowledged: a restarted worker never skips an update that
//! was not applied. The steps after the last record are trained again (at
//! least once, not exactly once).

use ps_common::config::JobConfig;
use ps_common::{InitializerSpec, OptimizerSpec, PsError, TableKind, TableSpec};

use crate::client::PsClient;
use crate::signal::run_identity;

/// A worker's place in its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Position {
    /// The epoch being trained (1-based).
    pub epoch: u64,
    /// Batches of that epoch done.
    pub batch: u64,
    /// Steps done since the job started (all epochs).
    pub steps: u64,
}

/// Floats per u64: four 16-bit pieces, each exact in an f32.
const PIECES: usize = 4;
/// Numbers in a position.
const FIELDS: usize = 3;

impl Position {
    fn encode(self) -> Vec<f32> {
        [self.epoch, self.batch, self.steps]
            .iter()
            .flat_map(|&v| (0..PIECES).map(move |i| ((v >> (16 * i)) & 0xffff) as f32))
            .collect()
    }

    fn decode(row: &[f32]) -> Option<Position> {
        if row.len() != FIELDS * PIECES {
            return None;
        }
        let mut values = row.chunks_exact(PIECES).map(|pieces| {
            pieces.iter().enumerate().try_fold(0u64, |acc, (i, &p)| {
                ((0.0..=65535.0).contains(&p) && p.fract() == 0.0)
                    .then(|| acc | ((p as u64) << (16 * i)))
            })
        });
        let (epoch, batch, steps) = (values.next()??, values.next()??, values.next()??);
        Some(Position {
            epoch,
            batch,
            steps,
        })
    }
}

/// The positions of one job's workers.
#[derive(Debug, Clone)]
pub struct Positions {
    spec: TableSpec,
    rank: u64,
}

impl Positions {
    /// Rank `rank` of `world` in `job`'s run; creates the table (idempotent).
    pub async fn open(
        client: &PsClient,
        job: &JobConfig,
        rank: usize,
        world: usize,
    ) -> Result<Positions, PsError> {
        let spec = TableSpec {
            name: format!("_ps.position.w{world}.{:016x}", run_identity(job)),
            kind: TableKind::Dense {
                rows: world as u64,
                block_rows: 1,
            },
            dim: (FIELDS * PIECES) as u32,
            initializer: InitializerSpec::Zeros,
            // Nobody pushes to it; positions are assigned.
            optimizer: OptimizerSpec::sgd(1.0),
            seed: 0,
            lifecycle: Default::default(),
        };
        client.create_table(&spec).await?;
        Ok(Positions {
            spec,
            rank: rank as u64,
        })
    }

    /// This worker's last recorded position (`None`: nothing recorded, a fresh start).
    pub async fn load(&self, client: &PsClient) -> Result<Option<Position>, PsError> {
        let row = client.pull(&self.spec.name, &[self.rank]).await?;
        match Position::decode(&row) {
            Some(p) if p.epoch == 0 => Ok(None),
            Some(p) => Ok(Some(p)),
            None => Err(PsError::invalid(format!(
                "table '{}' holds no valid position for rank {}",
                self.spec.name, self.rank
            ))),
        }
    }

    /// Waits for every push so far, then records `position`.
    pub async fn record(&self, client: &PsClient, position: Position) -> Result<(), PsError> {
        client.flush().await?;
        client
            .assign(&self.spec.name, &[self.rank], &position.encode())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_encoding_exactly_up_to_u64_max() {
        for p in [
            Position::default(),
            Position {
                epoch: 3,
                batch: 1 << 40,
                steps: u64::MAX,
            },
        ] {
            assert_eq!(Position::decode(&p.encode()), Some(p));
        }
        assert_eq!(Position::decode(&[0.5; FIELDS * PIECES]), None);
        assert_eq!(Position::decode(&[1.0; 3]), None);
    }
}
