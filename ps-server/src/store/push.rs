//! Pushes: checked whole against their tables, their rows' memory
//! reserved, admitted ids chosen, then applied by the tables' optimizers,
//! with proof of finiteness or an undo record (see the module doc of
//! [`super`]).

use std::sync::Arc;

use ps_common::{OptimizerSpec, PsError, prefetch};

use super::finite::{
    Magnitudes, Proof, Undo, fingerprint_of_fresh, finite_and_fingerprint, provably_finite,
    scan_magnitudes,
};
use super::table::Added;
use super::{Shard, Table, check_len};
use crate::budget::Reservation;
use crate::optimizer;

/// One push of [`Shard::push_many`].
#[derive(Debug, Clone, Copy)]
pub struct Push<'a> {
    /// The table.
    pub table: &'a str,
    /// Rows, in order.
    pub keys: &'a [u64],
    /// `keys.len() * dim` gradients.
    pub grads: &'a [f32],
    /// Learning-rate factor.
    pub lr_scale: f32,
}

/// Pushes checked in full, their rows' memory reserved: what
/// [`Shard::prepare_pushes`] hands back, for [`PreparedPushes::apply`].
/// Dropped unapplied, it releases its reservations and changes nothing.
#[derive(Debug)]
pub struct PreparedPushes<'s, 'p> {
    shard: &'s Shard,
    pushes: &'p [Push<'p>],
    tables: Vec<Arc<Table>>,
    magnitudes: Vec<Magnitudes>,
    rooms: Vec<Reservation<'s>>,
}

impl Shard {
    /// Applies `grads` (`keys.len() * dim` values, key after key) with the
    /// table's optimizer. Nothing is applied unless the whole request is valid.
    pub fn push(&self, table: &str, keys: &[u64], grads: &[f32]) -> Result<usize, PsError> {
        self.push_scaled(table, keys, grads, 1.0)
    }

    /// [`Shard::push`] with the optimizer's learning rate multiplied by
    /// `lr_scale` (the worker's schedule).
    pub fn push_scaled(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: f32,
    ) -> Result<usize, PsError> {
        let push = Push {
            table,
            keys,
            grads,
            lr_scale,
        };
        Ok(self.push_many(&[push])?.iter().sum())
    }

    /// Several pushes (to any tables) applied as one: every push is
    /// validated before any is applied, so a refused one applies nothing.
    /// Returns the rows applied per push.
    pub fn push_many(&self, pushes: &[Push<'_>]) -> Result<Vec<usize>, PsError> {
        self.prepare_pushes(pushes)?.apply()
    }

    /// Checks every push in full (table, dims, finite gradients, key
    /// ownership, `lr_scale`) and reserves the memory of the rows they may
    /// create, changing nothing: the first step of [`Shard::push_many`],
    /// for a caller that decides between checking and applying (the writer
    /// claims the push's `(writer, seq)` there).
    pub fn prepare_pushes<'s, 'p>(
        &'s self,
        pushes: &'p [Push<'p>],
    ) -> Result<PreparedPushes<'s, 'p>, PsError> {
        let (tables, magnitudes): (Vec<_>, Vec<_>) = pushes
            .iter()
            .map(|p| self.check_push(p.table, p.keys, p.grads, p.lr_scale))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let rooms = tables
            .iter()
            .zip(pushes)
            .map(|(table, p)| self.make_room_for_push(table, p.keys))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreparedPushes {
            shard: self,
            pushes,
            tables,
            magnitudes,
            rooms,
        })
    }

    /// The table a push goes to, if the push is valid in every respect.
    fn check_push(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: f32,
    ) -> Result<(Arc<Table>, Magnitudes), PsError> {
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return Err(PsError::invalid(format!(
                "lr_scale must be finite and >= 0, got {lr_scale}"
            )));
        }
        let table = self.table(table)?;
        if lr_scale == 0.0 && matches!(table.spec.optimizer, OptimizerSpec::Ftrl { .. }) {
            return Err(PsError::invalid(format!(
                "table '{}' uses FTRL, whose lr_scale multiplies alpha, a divisor: it must be > 0",
                table.spec.name
            )));
        }
        let dim = table.spec.dim as usize;
        check_len(&table, keys.len(), grads.len(), "gradient values")?;
        let (max, sum, finite) = scan_magnitudes(grads);
        if !finite && let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(PsError::invalid(format!(
                "gradient for key {} of table '{}' is not finite ({}); nothing was applied",
                keys[i / dim],
                table.spec.name,
                grads[i]
            )));
        }
        self.check_keys(&table, keys)?;
        Ok((table, Magnitudes { max, sum }))
    }

    /// Applies a push that [`provably_finite`] cleared: no undo record and
    /// no check of its rows (the proof covers them); the table's bounds are
    /// raised to the proof's.
    ///
    /// Unproven pushes, whose values are bounded only by `f32::MAX`, do not
    /// run meanwhile (the caller holds the tables' writer locks shared);
    /// proven pushes racing on one row each stay within `SAFE_MAGNITUDE` of
    /// their start, 3e8 times below `f32::MAX`.
    fn apply_proven(
        &self,
        table: &Table,
        push: &Push<'_>,
        room: &mut Reservation<'_>,
        proof: Proof,
    ) -> Result<usize, PsError> {
        let dim = table.spec.dim as usize;
        let spec = table.spec.optimizer.with_lr_scale(push.lr_scale);
        let grads = push.grads;
        let grad = |i: usize| &grads[i * dim..(i + 1) * dim];
        // Rows are visited segment by segment, so the gradients are read out
        // of order: prefetched with their rows.
        let added = table.update_many(
            push.keys,
            |i| prefetch::floats(grad(i)),
            |i, row| optimizer::apply(&spec, row, grad(i)),
        )?;
        room.keep(added as u64 * table.sparse_row_bytes());
        table.raise_bounds(proof.weight as f32, proof.state as f32);
        Ok(push.keys.len())
    }

    /// Applies a checked push (table `t` of the call), recording in
    /// `undo` what it changed. Each row is updated under its lock and kept
    /// only if every value stays finite; the first that would not is put
    /// back and the push refused (the caller rolls back the rest).
    fn apply_push(
        &self,
        t: usize,
        table: &Table,
        push: &Push<'_>,
        room: &mut Reservation<'_>,
        undo: &mut Undo,
    ) -> Result<usize, PsError> {
        let dim = table.spec.dim as usize;
        let spec = table.spec.optimizer.with_lr_scale(push.lr_scale);
        let per_row = table.sparse_row_bytes();
        for (&key, grad) in push.keys.iter().zip(push.grads.chunks_exact(dim)) {
            let at = undo.before.len();
            let (mut stayed_finite, mut left) = (true, 0);
            let added = table.update(key, |row| {
                undo.before.extend_from_slice(row);
                optimizer::apply(&spec, row, grad);
                (stayed_finite, left) = finite_and_fingerprint(row);
                if stayed_finite {
                    table.raise_bounds_to(row);
                } else {
                    row.copy_from_slice(&undo.before[at..]);
                }
            })?;
            // A row back from disk takes memory, but was not created: the
            // undo puts its values back rather than removing it.
            let created = added == Some(Added::Created);
            if matches!(added, Some(Added::Created | Added::Loaded)) {
                room.keep(per_row);
            }
            if !stayed_finite {
                undo.before.truncate(at);
                let fresh = fingerprint_of_fresh(table, key);
                if created && table.remove_if(key, |row| finite_and_fingerprint(row).1 == fresh) {
                    self.budget.release(per_row);
                }
                return Err(PsError::invalid(format!(
                    "the update of key {key} of table '{}' would make the row non-finite (weights or optimizer state); nothing was applied",
                    table.spec.name
                )));
            }
            undo.rows.push((t, key, created, left));
        }
        Ok(push.keys.len())
    }
}

impl PreparedPushes<'_, '_> {
    /// Applies the prepared pushes. Returns the rows applied per push; on
    /// an error (a row that would leave the finite range) nothing stays
    /// applied.
    pub fn apply(self) -> Result<Vec<usize>, PsError> {
        let PreparedPushes {
            shard,
            pushes,
            tables,
            magnitudes,
            mut rooms,
        } = self;
        // A call every part of which provably stays finite needs no undo
        // record; any other keeps one, so a refusal can put its rows back.
        // Proven calls write their tables together (shared); an unproven
        // call writes alone (exclusive), so no proof reads bounds that an
        // unbounded write is about to pass. Locks are taken in one order.
        // Tables with a lifecycle advance their push clock, and admission
        // decides which rows of each push may be applied; a call to tables
        // without one (most) allocates nothing here.
        let kept: Vec<Option<(Vec<u64>, Vec<f32>)>>;
        let admitted: Vec<Push<'_>>;
        let pushes = if tables.iter().all(|t| t.spec.lifecycle.is_default()) {
            pushes
        } else {
            kept = (tables.iter().zip(pushes))
                .map(|(t, p)| {
                    let step = t.begin_push();
                    t.admit(p.keys, p.grads, t.spec.dim as usize, step)
                })
                .collect::<Result<_, _>>()?;
            admitted = (pushes.iter().zip(&kept))
                .map(|(p, kept)| match kept {
                    Some((keys, grads)) => Push { keys, grads, ..*p },
                    None => *p,
                })
                .collect();
            &admitted[..]
        };
        let mut distinct: Vec<&Arc<Table>> = tables.iter().collect();
        distinct.sort_by_key(|t| Arc::as_ptr(t));
        distinct.dedup_by_key(|t| Arc::as_ptr(t));
        let shared: Vec<_> = distinct.iter().map(|t| t.writers.read()).collect();
        let proofs: Option<Vec<Proof>> = tables
            .iter()
            .zip(pushes)
            .zip(&magnitudes)
            .map(|((t, p), g)| provably_finite(t, p, *g))
            .collect();
        let mut rows = Vec::with_capacity(pushes.len());
        if let Some(proofs) = proofs {
            for (((table, push), room), proof) in
                tables.iter().zip(pushes).zip(&mut rooms).zip(proofs)
            {
                rows.push(shard.apply_proven(table, push, room, proof)?);
            }
            drop(shared);
        } else {
            drop(shared);
            let _alone: Vec<_> = distinct.iter().map(|t| t.writers.write()).collect();
            let floats: usize = tables
                .iter()
                .zip(pushes)
                .map(|(t, p)| p.keys.len() * t.row_len)
                .sum();
            let mut undo = Undo::with_room(pushes.iter().map(|p| p.keys.len()).sum(), floats);
            for (t, ((table, push), room)) in tables.iter().zip(pushes).zip(&mut rooms).enumerate()
            {
                match shard.apply_push(t, table, push, room, &mut undo) {
                    Ok(n) => rows.push(n),
                    Err(e) => {
                        undo.roll_back(&tables, &shard.budget);
                        return Err(e);
                    }
                }
            }
        }
        Ok(rows)
    }
}
