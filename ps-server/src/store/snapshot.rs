//! A shard's tables as plain data (bincode-serializable), for checkpoints
//! and for a joining backup.

use ps_common::TableSpec;
use serde::{Deserialize, Serialize};

/// Everything a shard holds, in a form bincode can write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    /// The shard that wrote it.
    pub shard_id: u32,
    /// Shards in the job that wrote it.
    pub num_shards: u32,
    /// Tables, by name order.
    pub tables: Vec<TableSnapshot>,
}

/// One table's rows on one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSnapshot {
    /// The table's spec (stored as its `ps.v1.TableSpec` protobuf encoding:
    /// the versioned wire format, and one bincode can carry).
    #[serde(with = "spec_as_protobuf")]
    pub spec: TableSpec,
    /// Floats per stored row (weights plus optimizer state).
    pub row_len: u32,
    /// Row keys, ascending.
    pub keys: Vec<u64>,
    /// `keys.len() * row_len` floats, row after row.
    pub values: Vec<f32>,
}

mod spec_as_protobuf {
    use prost::Message;
    use ps_common::{TableSpec, pb};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(spec: &TableSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&pb::TableSpec::from(spec).encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TableSpec, D::Error> {
        let bytes = <Vec<u8>>::deserialize(d)?;
        let wire = pb::TableSpec::decode(bytes.as_slice()).map_err(D::Error::custom)?;
        TableSpec::try_from(wire).map_err(D::Error::custom)
    }
}
