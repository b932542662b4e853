//! etcd as a job's coordinator: which server is each shard's primary,
//! under which lease and epoch, and which one is its standby.
//!
//! # Keys (under `/ps/{job}/`)
//! - `num_shards`: the shard count, set once by the first server; a server
//!   started with another count is refused.
//! - `shard/{i}/primary`: `EPOCH SERVER_ID ADDR` of the serving primary,
//!   attached to that server's lease: it disappears when the lease runs out.
//! - `shard/{i}/epoch`: the newest epoch; every promotion increases it in the
//!   same transaction that names the primary.
//! - `shard/{i}/standby`: `EPOCH SERVER_ID ADDR` of the backup that holds
//!   every write its primary (of epoch `EPOCH`) acknowledged. Written by the
//!   primary once the backup has caught up, deleted by the primary before
//!   it acknowledges a write without it. Only this server may be promoted.
//! - `shard/{i}/member/{SERVER_ID}`: `ADDR APPLIED` of every live server of
//!   the shard, under its own lease; a standby refreshes how far it has
//!   applied. A stale standby whose member key is gone no longer blocks a
//!   fresh start.
//!
//! Promotion is one compare-and-swap ([`Job::campaign`]): no primary key,
//! the epoch key unchanged since it was read, and (for a standby) the
//! standby key naming this very server. So at most one server holds a
//! shard's primary key at a time, and a standby that missed acknowledged
//! writes (its key deleted) is never promoted.

pub mod etcd;

use std::sync::Arc;
use std::time::Duration;

pub use etcd::Etcd;

use crate::PsError;

/// Generated types of the etcd v3 API subset in `proto/etcd.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// Most shards a job recorded in etcd may have: a worker allocates a slot
/// per shard, so a count past this is refused rather than trusted.
pub const MAX_SHARDS: u32 = 1 << 16;

/// A server holding a role for a shard, as its etcd key records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The primary's epoch (for a standby: the epoch of the primary it follows).
    pub epoch: u64,
    /// The server's random id (Describe.server_id); a restarted process has a new one.
    pub server_id: u64,
    /// Where workers and peers reach it.
    pub addr: String,
}

impl Holder {
    fn encode(&self) -> String {
        format!("{} {:x} {}", self.epoch, self.server_id, self.addr)
    }

    fn decode(bytes: &[u8]) -> Option<Holder> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, ' ');
        let epoch = parts.next()?.parse().ok()?;
        let server_id = u64::from_str_radix(parts.next()?, 16).ok()?;
        let addr = parts.next()?.to_string();
        (!addr.is_empty()).then_some(Holder {
            epoch,
            server_id,
            addr,
        })
    }
}

/// One shard's keys, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    /// The serving primary.
    pub primary: Option<Holder>,
    /// The standby that may be promoted, and its key's revision.
    pub standby: Option<(Holder, i64)>,
    /// The newest epoch and its key's revision (0: never set).
    pub epoch: (u64, i64),
    /// Live servers of the shard: their ids.
    pub members: Vec<u64>,
    /// The store's revision when read.
    pub revision: i64,
}

/// A job's keys in etcd.
#[derive(Debug, Clone)]
pub struct Job {
    etcd: Arc<Etcd>,
    name: String,
}

impl Job {
    /// The keys of job `name` (letters, digits, `-`, `_`, `.`; 1-64 bytes).
    pub fn new(etcd: Arc<Etcd>, name: &str) -> Result<Job, PsError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(PsError::invalid(format!(
                "job name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Job {
            etcd,
            name: name.to_string(),
        })
    }

    /// The etcd connection.
    pub fn etcd(&self) -> &Arc<Etcd> {
        &self.etcd
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn key(&self, rest: &str) -> String {
        format!("/ps/{}/{rest}", self.name)
    }

    fn shard_key(&self, shard: u32, rest: &str) -> String {
        self.key(&format!("shard/{shard}/{rest}"))
    }

    /// Records `num_shards` for the job if none is, and refuses a count
    /// other than the one recorded.
    pub async fn claim_num_shards(&self, num_shards: u32) -> Result<(), PsError> {
        if num_shards == 0 || num_shards > MAX_SHARDS {
            return Err(PsError::invalid(format!(
                "a coordinated job has 1 to {MAX_SHARDS} shards, not {num_shards}"
            )));
        }
        let key = self.key("num_shards");
        let answer = self
            .etcd
            .txn(pb::TxnRequest {
                compare: vec![version_is(&key, 0)],
                success: vec![put_op(&key, &num_shards.to_string(), 0)],
                failure: vec![range_op(&key)],
            })
            .await?;
        if answer.succeeded {
            return Ok(());
        }
        match self.num_shards().await? {
            Some(n) if n == num_shards => Ok(()),
            Some(n) => Err(PsError::FailedPrecondition(format!(
                "job {} runs {n} shards in etcd ({}); this server was started with --num-shards {num_shards}",
                self.name,
                self.etcd.endpoints().join(",")
            ))),
            None => Err(PsError::Internal(format!("{key} vanished"))),
        }
    }

    /// The job's shard count, once a server has recorded it.
    pub async fn num_shards(&self) -> Result<Option<u32>, PsError> {
        let key = self.key("num_shards");
        match self.etcd.get(&key).await? {
            None => Ok(None),
            Some(kv) => std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=MAX_SHARDS).contains(n))
                .map(Some)
                .ok_or_else(|| {
                    PsError::FailedPrecondition(format!(
                        "{key} in etcd is not a shard count in [1, {MAX_SHARDS}]"
                    ))
                }),
        }
    }

    /// Reads shard `shard`'s keys.
    pub async fn shard(&self, shard: u32) -> Result<ShardView, PsError> {
        let prefix = self.shard_key(shard, "");
        let answer = self.etcd.range(&prefix, &range_end(&prefix)).await?;
        let mut view = ShardView {
            revision: answer.header.map_or(0, |h| h.revision),
            ..Default::default()
        };
        for kv in answer.kvs {
            let Some(name) = kv.key.strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            match name {
                b"primary" => view.primary = Holder::decode(&kv.value),
                b"standby" => {
                    view.standby = Holder::decode(&kv.value).map(|h| (h, kv.mod_revision))
                }
                b"epoch" => {
                    let epoch = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    view.epoch = (epoch, kv.mod_revision);
                }
                member => {
                    if let Some(id) = member
                        .strip_prefix(b"member/")
                        .and_then(|id| std::str::from_utf8(id).ok())
                        .and_then(|id| u64::from_str_radix(id, 16).ok())
                    {
                        view.members.push(id);
                    }
                }
            }
        }
        Ok(view)
    }

    /// Every shard's primary (`None` where there is none), and the revision.
    pub async fn primaries(&self, num_shards: u32) -> Result<(Vec<Option<Holder>>, i64), PsError> {
        let prefix = self.key("shard/");
        let answer = self.etcd.range(&prefix, &range_end(&prefix)).await?;
        let mut primaries = vec![None; num_shards as usize];
        for kv in &answer.kvs {
            let Some(rest) = kv.key.strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            let Some(shard) = rest
                .strip_suffix(b"/primary")
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            if let Some(slot) = primaries.get_mut(shard) {
                *slot = Holder::decode(&kv.value);
            }
        }
        Ok((primaries, answer.header.map_or(0, |h| h.revision)))
    }

    /// Waits (at most `timeout`) for any of the job's shard keys to change
    /// after `revision`.
    pub async fn wait_shards_change(&self, revision: i64, timeout: Duration) -> bool {
        let prefix = self.key("shard/");
        self.etcd
            .wait_change(&prefix, &range_end(&prefix), revision, timeout)
            .await
    }

    /// Waits (at most `timeout`) for shard `shard`'s keys to change after `revision`.
    pub async fn wait_shard_change(&self, shard: u32, revision: i64, timeout: Duration) -> bool {
        let prefix = self.shard_key(shard, "");
        self.etcd
            .wait_change(&prefix, &range_end(&prefix), revision, timeout)
            .await
    }

    /// Announces a live server of `shard` under its `lease`, with how far it
    /// has applied its primary's writes.
    pub async fn announce(
        &self,
        shard: u32,
        server_id: u64,
        addr: &str,
        applied: u64,
        lease: i64,
    ) -> Result<(), PsError> {
        let key = self.shard_key(shard, &format!("member/{server_id:x}"));
        self.etcd
            .put(&key, &format!("{addr} {applied}"), lease)
            .await
    }

    /// Makes `me` (at the next epoch) shard `shard`'s primary under
    /// `lease`, if `view` still holds: no primary, the epoch unchanged,
    /// and the standby as `view` shows it. A standby campaigns as itself
    /// (`view.standby` names `me`); a fresh server campaigns when there is
    /// no standby or the standby's server is gone. Returns the epoch won,
    /// or `None` when the swap failed (read again).
    pub async fn campaign(
        &self,
        shard: u32,
        me: (u64, &str),
        lease: i64,
        view: &ShardView,
    ) -> Result<Option<u64>, PsError> {
        let primary = self.shard_key(shard, "primary");
        let epoch_key = self.shard_key(shard, "epoch");
        let standby = self.shard_key(shard, "standby");
        let epoch = view.epoch.0 + 1;
        let mut compare = vec![
            version_is(&primary, 0),
            mod_revision_is(&epoch_key, view.epoch.1),
        ];
        match &view.standby {
            Some((holder, revision)) => {
                compare.push(mod_revision_is(&standby, *revision));
                if holder.server_id != me.0 {
                    // Someone else's standby blocks us while its server lives.
                    let member = self.shard_key(shard, &format!("member/{:x}", holder.server_id));
                    compare.push(version_is(&member, 0));
                }
            }
            None => compare.push(version_is(&standby, 0)),
        }
        let holder = Holder {
            epoch,
            server_id: me.0,
            addr: me.1.to_string(),
        };
        let answer = self
            .etcd
            .txn(pb::TxnRequest {
                compare,
                success: vec![
                    put_op(&primary, &holder.encode(), lease),
                    put_op(&epoch_key, &epoch.to_string(), 0),
                    delete_op(&standby),
                ],
                failure: vec![],
            })
            .await?;
        Ok(answer.succeeded.then_some(epoch))
    }

    /// Primary `me`: records `standby` as the shard's standby, if `me` still
    /// holds the primary key. Returns whether it did.
    pub async fn set_standby(
        &self,
        shard: u32,
        me: &Holder,
        standby: &Holder,
    ) -> Result<bool, PsError> {
        let key = self.shard_key(shard, "standby");
        self.while_primary(shard, me, put_op(&key, &standby.encode(), 0))
            .await
    }

    /// Primary `me`: deletes the standby record, if `me` still holds the
    /// primary key. Returns whether it did (after which `me` may
    /// acknowledge writes its backup has not applied).
    pub async fn clear_standby(&self, shard: u32, me: &Holder) -> Result<bool, PsError> {
        let key = self.shard_key(shard, "standby");
        self.while_primary(shard, me, delete_op(&key)).await
    }

    /// Applies `op` if `me` still holds shard `shard`'s primary key;
    /// returns whether it did.
    async fn while_primary(
        &self,
        shard: u32,
        me: &Holder,
        op: pb::RequestOp,
    ) -> Result<bool, PsError> {
        let primary = self.shard_key(shard, "primary");
        let answer = self
            .etcd
            .txn(pb::TxnRequest {
                compare: vec![value_is(&primary, &me.encode())],
                success: vec![op],
                failure: vec![],
            })
            .await?;
        Ok(answer.succeeded)
    }
}

/// The end of the range of every key starting with `prefix`.
fn range_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    String::from_utf8(end).unwrap_or_default()
}

fn compare(
    key: &str,
    target: pb::compare::CompareTarget,
    value: pb::compare::TargetUnion,
) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(value),
        range_end: Vec::new(),
    }
}

fn version_is(key: &str, version: i64) -> pb::Compare {
    compare(
        key,
        pb::compare::CompareTarget::Version,
        pb::compare::TargetUnion::Version(version),
    )
}

fn mod_revision_is(key: &str, revision: i64) -> pb::Compare {
    compare(
        key,
        pb::compare::CompareTarget::Mod,
        pb::compare::TargetUnion::ModRevision(revision),
    )
}

fn value_is(key: &str, value: &str) -> pb::Compare {
    compare(
        key,
        pb::compare::CompareTarget::Value,
        pb::compare::TargetUnion::Value(value.as_bytes().to_vec()),
    )
}

fn put_op(key: &str, value: &str, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

fn delete_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            },
        )),
    }
}

fn range_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_survives_its_encoding_and_garbage_is_no_holder() {
        let h = Holder {
            epoch: 7,
            server_id: u64::MAX,
            addr: "10.0.0.1:50051".into(),
        };
        assert_eq!(Holder::decode(h.encode().as_bytes()), Some(h));
        for bad in ["", "7", "x 1 a", "7 zz a", "7 1 ", "\u{0}"] {
            assert_eq!(Holder::decode(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(range_end("/ps/j/shard/"), "/ps/j/shard0");
    }
}
