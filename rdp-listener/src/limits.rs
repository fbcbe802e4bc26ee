//! Connection counts, total and per VM: enforced by the listener, shown by `get-vm`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_vm: HashMap<Uuid, usize>,
}

/// Live console connections; cloning shares the counts.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounts(Arc<Mutex<Counts>>);

impl ConnectionCounts {
    /// Connections open on the listener (routed or still sending their PCB).
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Console sessions open to `vm`.
    pub fn for_vm(&self, vm: Uuid) -> usize {
        self.lock().per_vm.get(&vm).copied().unwrap_or(0)
    }

    /// Counts one more connection if fewer than `max` are open.
    pub(crate) fn admit(&self, max: usize) -> Option<TotalSlot> {
        let mut counts = self.lock();
        if counts.total >= max {
            return None;
        }
        counts.total += 1;
        Some(TotalSlot(self.clone()))
    }

    /// Counts one more session on `vm` if fewer than `max` are open.
    pub(crate) fn admit_vm(&self, vm: Uuid, max: usize) -> Option<VmSlot> {
        let mut counts = self.lock();
        let open = counts.per_vm.entry(vm).or_default();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(VmSlot(self.clone(), vm))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection counted in the total; uncounted on drop.
#[derive(Debug)]
pub(crate) struct TotalSlot(ConnectionCounts);

impl Drop for TotalSlot {
    fn drop(&mut self) {
        self.0.lock().total -= 1;
    }
}

/// One session counted on its VM; uncounted on drop.
#[derive(Debug)]
pub(crate) struct VmSlot(ConnectionCounts, Uuid);

impl Drop for VmSlot {
    fn drop(&mut self) {
        let mut counts = self.0.lock();
        if let Some(open) = counts.per_vm.get_mut(&self.1) {
            *open -= 1;
            if *open == 0 {
                counts.per_vm.remove(&self.1);
            }
        }
    }
}
