//! Requests as a shard sees them: every `ps.v1` message that reads or
//! writes rows is decoded and checked here, once, into a typed [`Read`] or
//! [`Write`] that the rest of the server trusts.
//!
//! Checked here, against the [`Limits`] and the message alone: table names,
//! key counts (per request and per call), delta-encoded keys, value
//! encodings and their byte lengths, `(writer, seq)`. Left to the store,
//! which has the table: whether it exists, dims, finiteness, which shard
//! owns a key. A backup decodes the primary's forwarded writes through the
//! same [`Decoder`], so both apply exactly what passed the same checks.

use bytes::Bytes;
use ps_common::names::validate_table_name;
use ps_common::pb::{self, ValueEncoding};
use ps_common::{PsError, TableSpec, wire};

/// Limits a shard enforces on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded request message, in bytes.
    pub max_request_bytes: usize,
    /// Largest number of keys in one pull or push.
    pub max_keys_per_request: usize,
    /// Largest response values one Pull or PullMany may return, in bytes
    /// (keys x dim x value width, summed over a PullMany's parts), checked
    /// before anything is read or allocated.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 << 20,
            max_keys_per_request: 1 << 20,
            max_response_bytes: 64 << 20,
        }
    }
}

/// A checked pull of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    /// The table.
    pub table: String,
    /// Rows, in the order the answer lists them.
    pub keys: Vec<u64>,
    /// How the answer encodes values.
    pub encoding: ValueEncoding,
}

/// A checked write: what a primary applies, replicates, and a backup
/// applies in the same order.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Create a table (or confirm an identical one).
    CreateTable(TableSpec),
    /// One push call: its parts are applied together, at most once per
    /// `(writer, seq)`.
    Push(PushCall),
    /// Set rows' weights, resetting their optimizer state.
    Assign(Assign),
    /// Remove rows the primary's evictor chose (never from a client).
    Evict(Evict),
}

/// Rows to evict from a sparse table.
#[derive(Debug, Clone, PartialEq)]
pub struct Evict {
    /// The table.
    pub table: String,
    /// The rows.
    pub keys: Vec<u64>,
    /// Move them to the disk tier (a server without one drops them);
    /// `false`: drop them from whichever tier holds them.
    pub spill: bool,
}

/// The pushes of one Push or PushMany call.
#[derive(Debug, Clone, PartialEq)]
pub struct PushCall {
    /// The pushing client's random id (0: not deduplicated).
    pub writer: u64,
    /// The call's number among the writer's calls to this shard (>= 1).
    pub seq: u64,
    /// The pushes, one per table.
    pub parts: Vec<PushPart>,
}

/// One table's gradients in a push call.
#[derive(Debug, Clone, PartialEq)]
pub struct PushPart {
    /// The table.
    pub table: String,
    /// Rows, in order.
    pub keys: Vec<u64>,
    /// The gradients as the request carried them (a whole number of
    /// values of `encoding`); read at apply time, never copied before.
    pub gradients: Bytes,
    /// How `gradients` encodes values.
    pub encoding: ValueEncoding,
    /// Learning-rate factor (the worker's schedule).
    pub lr_scale: f32,
}

/// Rows' weights to set.
#[derive(Debug, Clone, PartialEq)]
pub struct Assign {
    /// The table.
    pub table: String,
    /// Rows, in order.
    pub keys: Vec<u64>,
    /// `keys.len() * dim` weights, f32 little-endian.
    pub values: Bytes,
}

/// Decodes and checks requests against a shard's [`Limits`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Decoder {
    limits: Limits,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// One Pull.
    pub fn read(&self, mut req: pb::PullRequest) -> Result<Read, PsError> {
        let encoding = value_encoding(req.encoding)?;
        let keys = self.keys(&req.table, std::mem::take(&mut req.keys), &req.delta_keys)?;
        Ok(Read {
            table: req.table,
            keys,
            encoding,
        })
    }

    /// The pulls of one PullMany, under the key limit together.
    pub fn reads(&self, req: pb::PullManyRequest) -> Result<Vec<Read>, PsError> {
        let reads = req
            .pulls
            .into_iter()
            .map(|p| self.read(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.key_count(reads.iter().map(|r| r.keys.len()).sum(), "call")?;
        Ok(reads)
    }

    /// One Push, as a call of one part.
    pub fn push(&self, mut req: pb::PushRequest) -> Result<Write, PsError> {
        let (writer, seq) = (req.writer, req.seq);
        check_writer(writer, seq)?;
        let part = self.push_part(&mut req)?;
        Ok(Write::Push(PushCall {
            writer,
            seq,
            parts: vec![part],
        }))
    }

    /// One PushMany, under the key limit together.
    pub fn push_many(&self, req: pb::PushManyRequest) -> Result<Write, PsError> {
        check_writer(req.writer, req.seq)?;
        let parts = req
            .pushes
            .into_iter()
            .map(|mut p| self.push_part(&mut p))
            .collect::<Result<Vec<_>, _>>()?;
        self.key_count(parts.iter().map(|p| p.keys.len()).sum(), "call")?;
        Ok(Write::Push(PushCall {
            writer: req.writer,
            seq: req.seq,
            parts,
        }))
    }

    /// One Assign.
    pub fn assign(&self, req: pb::AssignRequest) -> Result<Write, PsError> {
        self.table_and_count(&req.table, req.keys.len())?;
        whole_values(&req.values, ValueEncoding::F32)?;
        Ok(Write::Assign(Assign {
            table: req.table,
            keys: req.keys,
            values: req.values,
        }))
    }

    /// One CreateTable.
    pub fn create_table(&self, req: pb::CreateTableRequest) -> Result<Write, PsError> {
        let spec = req
            .spec
            .ok_or_else(|| PsError::invalid("CreateTable needs a spec"))?;
        Ok(Write::CreateTable(TableSpec::try_from(spec)?))
    }

    /// A write the primary forwarded (write `seq` of its stream).
    pub fn replicated(&self, entry: pb::ReplicaEntry, seq: u64) -> Result<Write, PsError> {
        use pb::replica_entry::Write as Entry;
        match entry.write {
            Some(Entry::CreateTable(spec)) => Ok(Write::CreateTable(TableSpec::try_from(spec)?)),
            Some(Entry::Push(call)) => self.push_many(call),
            Some(Entry::Assign(req)) => self.assign(req),
            Some(Entry::Evict(req)) => {
                self.table_and_count(&req.table, req.keys.len())?;
                Ok(Write::Evict(Evict {
                    table: req.table,
                    keys: req.keys,
                    spill: req.spill,
                }))
            }
            None => Err(PsError::invalid(format!("replicated write {seq} is empty"))),
        }
    }

    fn push_part(&self, req: &mut pb::PushRequest) -> Result<PushPart, PsError> {
        let encoding = value_encoding(req.encoding)?;
        let keys = self.keys(&req.table, std::mem::take(&mut req.keys), &req.delta_keys)?;
        whole_values(&req.gradients, encoding)?;
        let lr_scale = req.lr_scale.unwrap_or(1.0);
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return Err(PsError::invalid(format!(
                "lr_scale must be finite and >= 0, got {lr_scale}"
            )));
        }
        Ok(PushPart {
            table: std::mem::take(&mut req.table),
            keys,
            gradients: std::mem::take(&mut req.gradients),
            encoding,
            lr_scale,
        })
    }

    /// A request's keys for `table`: `keys`, or `delta_keys` decoded (under
    /// the key limit; setting both is an error), checked with the table
    /// name against the limits.
    fn keys(&self, table: &str, keys: Vec<u64>, delta_keys: &[u8]) -> Result<Vec<u64>, PsError> {
        let keys = match (keys.is_empty(), delta_keys.is_empty()) {
            (_, true) => keys,
            (true, false) => wire::decode_delta_keys(delta_keys, self.limits.max_keys_per_request)?,
            (false, false) => {
                return Err(PsError::invalid(
                    "a request sets keys or delta_keys, not both",
                ));
            }
        };
        self.table_and_count(table, keys.len())?;
        Ok(keys)
    }

    fn table_and_count(&self, table: &str, keys: usize) -> Result<(), PsError> {
        validate_table_name(table)?;
        self.key_count(keys, "request")
    }

    /// `keys` in one `what` (a request, or a call bundling several) must
    /// stay under the key limit.
    fn key_count(&self, keys: usize, what: &str) -> Result<(), PsError> {
        if keys > self.limits.max_keys_per_request {
            return Err(PsError::ResourceExhausted(format!(
                "{keys} keys in one {what} is over this shard's limit of {}",
                self.limits.max_keys_per_request
            )));
        }
        Ok(())
    }
}

impl Write {
    /// About the bytes the write holds (keys and values): what it costs to
    /// keep it in a follower log.
    pub fn bytes(&self) -> usize {
        match self {
            Write::CreateTable(_) => 256,
            Write::Push(call) => call
                .parts
                .iter()
                .map(|p| 64 + p.keys.len() * 8 + p.gradients.len())
                .sum(),
            Write::Assign(a) => 64 + a.keys.len() * 8 + a.values.len(),
            Write::Evict(e) => 64 + e.keys.len() * 8,
        }
    }

    /// The write as the primary forwards it to its backup (encoded only
    /// then, on the forwarder's task, not on the write path).
    pub fn to_entry(&self) -> pb::ReplicaEntry {
        use pb::replica_entry::Write as Entry;
        let write = match self {
            Write::CreateTable(spec) => Entry::CreateTable(spec.into()),
            Write::Push(call) => Entry::Push(pb::PushManyRequest {
                pushes: call
                    .parts
                    .iter()
                    .map(|p| pb::PushRequest {
                        table: p.table.clone(),
                        keys: p.keys.clone(),
                        gradients: p.gradients.clone(),
                        lr_scale: Some(p.lr_scale),
                        encoding: p.encoding as i32,
                        ..Default::default()
                    })
                    .collect(),
                writer: call.writer,
                seq: call.seq,
            }),
            Write::Assign(a) => Entry::Assign(pb::AssignRequest {
                table: a.table.clone(),
                keys: a.keys.clone(),
                values: a.values.clone(),
            }),
            Write::Evict(e) => Entry::Evict(pb::EvictRequest {
                table: e.table.clone(),
                keys: e.keys.clone(),
                spill: e.spill,
            }),
        };
        pb::ReplicaEntry { write: Some(write) }
    }
}

/// A push's `(writer, seq)`: seqs number a writer's calls from 1, so a
/// writer with seq 0 is a malformed call, not one to deduplicate.
fn check_writer(writer: u64, seq: u64) -> Result<(), PsError> {
    if writer != 0 && seq == 0 {
        return Err(PsError::invalid(
            "a push with a writer id needs seq >= 1 (a writer numbers its calls from 1; writer 0 turns deduplication off)",
        ));
    }
    Ok(())
}

/// A request's `ValueEncoding`; an unknown number is an error.
fn value_encoding(value: i32) -> Result<ValueEncoding, PsError> {
    ValueEncoding::try_from(value)
        .map_err(|_| PsError::invalid(format!("unknown value encoding {value}")))
}

/// `bytes` must hold a whole number of values of `encoding`.
fn whole_values(bytes: &[u8], encoding: ValueEncoding) -> Result<(), PsError> {
    let width = wire::value_bytes(encoding);
    if !bytes.len().is_multiple_of(width) {
        return Err(PsError::invalid(format!(
            "{} bytes of {} values is not a whole number of {width}-byte values",
            bytes.len(),
            encoding.as_str_name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(max_keys: usize) -> Decoder {
        Decoder::new(Limits {
            max_keys_per_request: max_keys,
            ..Limits::default()
        })
    }

    fn push(table: &str, keys: &[u64], gradients: &[f32]) -> pb::PushRequest {
        pb::PushRequest {
            table: table.into(),
            keys: keys.to_vec(),
            gradients: wire::encode_f32s(gradients),
            ..Default::default()
        }
    }

    #[test]
    fn a_push_many_is_one_call_whose_parts_share_the_key_limit() {
        let call = pb::PushManyRequest {
            pushes: vec![push("a", &[1, 2], &[0.0; 2]), push("b", &[3, 4], &[0.0; 2])],
            writer: 7,
            seq: 1,
        };
        let err = decoder(3).push_many(call.clone()).unwrap_err();
        assert!(err.to_string().contains("4 keys in one call"), "{err}");
        let Write::Push(decoded) = decoder(4).push_many(call).unwrap() else {
            panic!("a push call decodes to a push");
        };
        assert_eq!(
            (decoded.writer, decoded.seq, decoded.parts.len()),
            (7, 1, 2)
        );
    }

    #[test]
    fn malformed_writes_are_refused_before_any_table_is_looked_at() {
        let d = decoder(16);
        let mut bad_name = push("../x", &[1], &[0.0]);
        assert!(d.push(bad_name.clone()).is_err(), "table names are checked");
        bad_name.table = "x".into();
        bad_name.gradients = Bytes::from_static(&[0, 0, 0]);
        let err = d.push(bad_name).unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
        let mut scaled = push("x", &[1], &[0.0]);
        scaled.lr_scale = Some(f32::NAN);
        assert!(d.push(scaled).is_err(), "lr_scale is checked");
        let mut unnumbered = push("x", &[1], &[0.0]);
        unnumbered.writer = 9;
        assert!(d.push(unnumbered).is_err(), "a writer needs seq >= 1");
        let both = pb::PushRequest {
            delta_keys: wire::encode_delta_keys(&[5]).unwrap(),
            ..push("x", &[1], &[0.0])
        };
        assert!(d.push(both).is_err(), "keys and delta_keys are exclusive");
        let assign = pb::AssignRequest {
            table: "x".into(),
            keys: vec![1],
            values: Bytes::from_static(&[1]),
        };
        assert!(d.assign(assign).is_err(), "assign values are whole f32s");
        assert!(
            d.replicated(pb::ReplicaEntry { write: None }, 3)
                .unwrap_err()
                .to_string()
                .contains("write 3 is empty")
        );
    }

    #[test]
    fn a_forwarded_write_decodes_to_the_write_it_was() {
        let d = decoder(16);
        let writes = [
            d.push_many(pb::PushManyRequest {
                pushes: vec![pb::PushRequest {
                    delta_keys: wire::encode_delta_keys(&[2, 9]).unwrap(),
                    lr_scale: Some(0.5),
                    encoding: ValueEncoding::F16 as i32,
                    gradients: wire::encode_values(&[1.0, -2.0], ValueEncoding::F16),
                    table: "emb".into(),
                    ..Default::default()
                }],
                writer: 3,
                seq: 8,
            })
            .unwrap(),
            d.assign(pb::AssignRequest {
                table: "w".into(),
                keys: vec![0, 1],
                values: wire::encode_f32s(&[1.0, 2.0]),
            })
            .unwrap(),
            Write::Evict(Evict {
                table: "emb".into(),
                keys: vec![4, 5, 6],
                spill: true,
            }),
        ];
        for write in writes {
            assert_eq!(d.replicated(write.to_entry(), 1).unwrap(), write);
        }
    }
}
