//! A node's lease: granted once, kept alive in the background, watched for expiry.
//!
//! The lease is what makes a node a member: its node key and every ownership key it holds are
//! bound to it, so they all vanish together when it expires. The node cannot see the server's
//! clock, so it keeps its own, pessimistic one: the lease counts as *current* only until
//! `TTL − margin` after the last renewal that was *sent* before etcd confirmed it. A node that
//! finds its lease no longer current must stop acting (self-fencing) before the server side
//! can have expired.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};
use crate::etcd::Etcd;
use crate::ownership::Keys;

/// What a node publishes about itself under `<prefix>/nodes/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub node: String,
    /// Its lease id.
    pub lease: i64,
    /// Lease TTL in seconds.
    pub ttl_s: i64,
    /// When it registered (Unix ms).
    pub since_ms: u64,
    /// The daemon's process id (for tests and operators).
    pub pid: u32,
}

#[derive(Debug)]
struct LeaseState {
    id: i64,
    /// Send instant of the last renewal etcd confirmed.
    renewed_at: Instant,
    /// etcd said the lease is gone.
    expired: bool,
}

/// A node's lease and its keep-alive.
#[derive(Debug)]
pub struct NodeLease {
    etcd: Arc<Etcd>,
    keys: Keys,
    name: String,
    ttl: Duration,
    state: Mutex<LeaseState>,
    stopped: AtomicBool,
}

impl NodeLease {
    /// Grants a lease of `ttl` (whole seconds, at least 1) and publishes the node record.
    pub fn register(etcd: Arc<Etcd>, keys: Keys, name: &str, ttl: Duration) -> Result<Arc<Self>> {
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let lease = NodeLease {
            etcd,
            keys,
            name: name.to_owned(),
            ttl,
            state: Mutex::new(LeaseState {
                id: 0,
                renewed_at: Instant::now(),
                expired: true,
            }),
            stopped: AtomicBool::new(false),
        };
        lease.grant()?;
        Ok(Arc::new(lease))
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Time before expiry at which a node stops acting: a third of the TTL, at least 500 ms.
    pub fn margin(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(500))
    }

    /// The lease id while current.
    pub fn current(&self) -> Option<i64> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = state.renewed_at.elapsed() + self.margin() < self.ttl;
        (!state.expired && fresh).then_some(state.id)
    }

    /// The lease id, current or not (0 before the first grant).
    pub fn id(&self) -> i64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).id
    }

    /// Whether etcd said the lease expired (or it has not been current past its TTL).
    pub fn is_lost(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.expired || state.renewed_at.elapsed() >= self.ttl
    }

    /// Grants a new lease and publishes the node record under it.
    pub fn grant(&self) -> Result<i64> {
        let sent = Instant::now();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = self
            .etcd
            .call(|mut c| async move { c.lease_grant(ttl, None).await })?;
        let id = granted.id();
        let record = NodeRecord {
            node: self.name.clone(),
            lease: id,
            ttl_s: granted.ttl(),
            since_ms: unix_ms(),
            pid: std::process::id(),
        };
        let value = serde_json::to_string(&record)
            .map_err(|e| ClusterError::Protocol(format!("node record: {e}")))?;
        let key = self.keys.node(&self.name);
        self.etcd.call(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await
            }
        })?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = LeaseState {
            id,
            renewed_at: sent,
            expired: false,
        };
        Ok(id)
    }

    /// Sends one keep-alive. `Ok(false)` when etcd says the lease is gone.
    pub fn renew(&self) -> Result<bool> {
        let id = self.id();
        let sent = Instant::now();
        let ttl = self.etcd.call(|mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |m| m.ttl()))
        })?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.id != id {
            return Ok(true);
        }
        if ttl > 0 {
            state.renewed_at = sent;
            Ok(true)
        } else {
            state.expired = true;
            Ok(false)
        }
    }

    /// Gives the lease up after self-fencing: even if etcd still has it (a cluster that restarted
    /// restores leases), the keep-alive revokes it (its ownership keys go with it) and joins
    /// again under a new one. Until then the node is not current.
    pub fn abandon(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expired = true;
    }

    /// Revokes the lease (its keys go at once); best effort.
    pub fn revoke(&self) {
        let id = self.id();
        let _ = self
            .etcd
            .call(|mut c| async move { c.lease_revoke(id).await });
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expired = true;
    }

    /// Keeps the lease alive every quarter TTL on a thread of its own, until [`stop`](Self::stop).
    /// A lease etcd reports expired is replaced by a new one (a new membership: the ownership
    /// keys of the old one are gone for good).
    pub fn keep_alive(self: &Arc<Self>) -> Result<()> {
        let lease = Arc::clone(self);
        thread::Builder::new()
            .name("lease-keepalive".into())
            .spawn(move || {
                while !lease.stopped.load(Ordering::SeqCst) {
                    let next = Instant::now() + lease.ttl / 4;
                    lease.keep_alive_once();
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
            .map(drop)
            .map_err(|source| ClusterError::Start {
                what: "the lease keep-alive thread",
                source,
            })
    }

    /// One keep-alive step: renew the lease; once it is lost (etcd said so, or it went unrenewed
    /// for its whole TTL), revoke it (its keys go at once if etcd still has it) and join again
    /// under a new lease, owning nothing.
    fn keep_alive_once(&self) {
        let expired = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expired;
        if expired {
            self.revoke();
            if let Ok(lease) = self.grant() {
                eprintln!(
                    "cluster: node {} joined again under lease {lease:x}",
                    self.name
                );
            }
            return;
        }
        match self.renew() {
            Ok(true) => {}
            Ok(false) => {}
            Err(_) if self.is_lost() => {
                self.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .expired = true;
            }
            Err(_) => {}
        }
    }

    /// Ends the keep-alive thread (the lease then expires unless revoked first).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
