//! VM ownership on etcd: the key layout and the guarded transactions.
//!
//! ```text
//! <prefix>/nodes/<node>      node record (JSON), bound to the node's lease
//! <prefix>/owners/<GUID>     owner node name, bound to the owner's lease; its create revision is
//!                            the fencing token
//! <prefix>/moves/<GUID>      a planned move asked by `move-vm` (JSON), not leased
//! <prefix>/handoff/<GUID>    the target node of a move whose source saved the VM
//! <prefix>/move-status/<GUID>  the outcome of the last move (JSON)
//! ```
//!
//! Ownership is etcd's mutex recipe reduced to one key per VM: whoever creates the key (a
//! transaction `If create_revision(key) == 0 Then Put(key, node, lease)`) owns the VM until the
//! key goes, which it does when the owner deletes it or its lease expires. Every later write
//! the owner makes about the VM is a transaction `If create_revision(key) == token`, so a node
//! whose key expired, and was perhaps re-created by another node, can never pass one.

use std::collections::HashMap;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use vmm_core::VmId;

use crate::error::{ClusterError, Result};
use crate::etcd::Etcd;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/vmms";

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Keys under `prefix` (no trailing slash).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// `<prefix>/nodes/`.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `<prefix>/nodes/<node>`.
    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    /// `<prefix>/owners/`.
    pub fn owners(&self) -> String {
        format!("{}/owners/", self.prefix)
    }

    /// `<prefix>/owners/<GUID>`.
    pub fn owner(&self, vm: VmId) -> String {
        format!("{}{vm}", self.owners())
    }

    /// `<prefix>/moves/`.
    pub fn moves(&self) -> String {
        format!("{}/moves/", self.prefix)
    }

    /// `<prefix>/moves/<GUID>`.
    pub fn move_request(&self, vm: VmId) -> String {
        format!("{}{vm}", self.moves())
    }

    /// `<prefix>/handoff/`.
    pub fn handoffs(&self) -> String {
        format!("{}/handoff/", self.prefix)
    }

    /// `<prefix>/handoff/<GUID>`.
    pub fn handoff(&self, vm: VmId) -> String {
        format!("{}{vm}", self.handoffs())
    }

    /// `<prefix>/move-status/<GUID>`.
    pub fn move_status(&self, vm: VmId) -> String {
        format!("{}/move-status/{vm}", self.prefix)
    }
}

/// Who owns a virtual machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner node's name.
    pub node: String,
    /// The fencing token: the ownership key's create revision.
    pub token: i64,
    /// The lease the key is bound to.
    pub lease: i64,
}

/// Takes ownership of `vm` for `node` under `lease` if nobody owns it; returns the owner after
/// the attempt (this node with its token if it won or already owned it under this lease).
pub fn campaign(etcd: &Etcd, keys: &Keys, vm: VmId, node: &str, lease: i64) -> Result<Owner> {
    let key = keys.owner(vm);
    let response = etcd.call(|mut c| {
        let key = key.clone();
        let node = node.to_owned();
        async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    node,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key, None)]);
            c.txn(txn).await
        }
    })?;
    if response.succeeded() {
        let revision = response
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| ClusterError::Protocol("transaction without header".into()))?;
        return Ok(Owner {
            node: node.to_owned(),
            token: revision,
            lease,
        });
    }
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op
            && let Some(kv) = get.kvs().first()
        {
            return Ok(Owner {
                node: kv.value_str().unwrap_or("?").to_owned(),
                token: kv.create_revision(),
                lease: kv.lease(),
            });
        }
    }
    // Deleted between the compare and the get cannot happen in one transaction.
    Err(ClusterError::Protocol("ownership key vanished".into()))
}

/// The owner of `vm`, if any.
pub fn owner(etcd: &Etcd, keys: &Keys, vm: VmId) -> Result<Option<Owner>> {
    let key = keys.owner(vm);
    let response = etcd.call(|mut c| {
        let key = key.clone();
        async move { c.get(key, None).await }
    })?;
    Ok(response.kvs().first().map(|kv| Owner {
        node: kv.value_str().unwrap_or("?").to_owned(),
        token: kv.create_revision(),
        lease: kv.lease(),
    }))
}

/// Every owned virtual machine and its owner.
pub fn owners(etcd: &Etcd, keys: &Keys) -> Result<HashMap<VmId, Owner>> {
    let prefix = keys.owners();
    let response = etcd.call(|mut c| {
        let prefix = prefix.clone();
        async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })?;
    let mut owners = HashMap::new();
    for kv in response.kvs() {
        let id = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(prefix.as_str()))
            .and_then(|g| g.parse::<VmId>().ok());
        if let Some(id) = id {
            owners.insert(
                id,
                Owner {
                    node: kv.value_str().unwrap_or("?").to_owned(),
                    token: kv.create_revision(),
                    lease: kv.lease(),
                },
            );
        }
    }
    Ok(owners)
}

/// Runs `ops` only if `token` is still the current fencing token of `vm`; a stale token is
/// [`ClusterError::OwnershipLost`] and nothing is done.
pub fn guarded(etcd: &Etcd, keys: &Keys, vm: VmId, token: i64, ops: Vec<TxnOp>) -> Result<()> {
    let key = keys.owner(vm);
    let response = etcd.call(|mut c| {
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                token,
            )])
            .and_then(ops.clone());
        async move { c.txn(txn).await }
    })?;
    if response.succeeded() {
        Ok(())
    } else {
        Err(ClusterError::OwnershipLost(vm))
    }
}

/// Gives up ownership of `vm` (only if `token` is current).
pub fn release(etcd: &Etcd, keys: &Keys, vm: VmId, token: i64) -> Result<()> {
    guarded(
        etcd,
        keys,
        vm,
        token,
        vec![TxnOp::delete(keys.owner(vm), None)],
    )
}

/// Reads one key's value.
pub fn read(etcd: &Etcd, key: &str) -> Result<Option<String>> {
    let response = etcd.call(|mut c| {
        let key = key.to_owned();
        async move { c.get(key, None).await }
    })?;
    Ok(response
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Every key under `prefix` with its value (the prefix stripped).
pub fn list(etcd: &Etcd, prefix: &str) -> Result<Vec<(String, String)>> {
    let response = etcd.call(|mut c| {
        let prefix = prefix.to_owned();
        async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            (
                key.strip_prefix(prefix).unwrap_or(&key).to_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect())
}

/// Writes one key (no lease).
pub fn write(etcd: &Etcd, key: &str, value: &str) -> Result<()> {
    etcd.call(|mut c| {
        let (key, value) = (key.to_owned(), value.to_owned());
        async move { c.put(key, value, None).await }
    })
    .map(drop)
}

/// Deletes one key.
pub fn remove(etcd: &Etcd, key: &str) -> Result<()> {
    etcd.call(|mut c| {
        let key = key.to_owned();
        async move { c.delete(key, None).await }
    })
    .map(drop)
}
