//! Who may change a virtual machine right now, and which worker's reports still count.
//!
//! Every path that changes a VM — a state change, DestroySystem, ModifySystemSettings, reaping a
//! finished worker, re-attaching at start-up — first [`claim`](Ownership::claim)s it and ends with
//! [`release`](Ownership::release), which hands back any worker stop reported meanwhile so that the
//! caller deals with it then. Worker reports carry the generation their sink was made with; a new
//! worker (or forgetting the old one) moves to the [`next_generation`](Ownership::next_generation),
//! after which late reports of the old worker are recognised as stale. The fields are private so
//! that no operation can set one without the others.

use crate::worker::StopReason;

/// The claim and generation rules of one VM record.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    claimed: bool,
    generation: u64,
    /// A stop reported while claimed; the first one wins.
    held: Option<StopReason>,
}

impl Ownership {
    /// Takes the VM for one operation; `false` (and nothing changed) when another operation
    /// owns it.
    pub(crate) fn claim(&mut self) -> bool {
        if self.claimed {
            return false;
        }
        self.claimed = true;
        true
    }

    /// Ends the operation. Returns the stop reported while it ran, which the caller must now
    /// handle (the worker it concerns is still the current one).
    #[must_use = "a stop reported during the operation must be handled"]
    pub(crate) fn release(&mut self) -> Option<StopReason> {
        self.claimed = false;
        self.held.take()
    }

    /// Whether an operation owns the VM.
    pub(crate) fn is_claimed(&self) -> bool {
        self.claimed
    }

    /// Keeps a stop reported by the current worker while an operation owns the VM.
    pub(crate) fn hold(&mut self, reason: StopReason) {
        self.held.get_or_insert(reason);
    }

    /// The generation for a new worker's event sink; reports of every earlier worker are stale
    /// from now on, including a stop already held for one.
    pub(crate) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.held = None;
        self.generation
    }

    /// Whether a report made with `generation` comes from the current worker.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        generation == self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_refused_until_release() {
        let mut owner = Ownership::default();

        let first = owner.claim();
        let second = owner.claim();
        let _ = owner.release();
        let third = owner.claim();

        assert_eq!((first, second, third), (true, false, true));
    }

    #[test]
    fn release_hands_back_the_first_held_stop() {
        let mut owner = Ownership::default();
        assert!(owner.claim());
        owner.hold(StopReason::GuestPowerOff);
        owner.hold(StopReason::GuestReset);

        let held = owner.release();

        assert_eq!(held, Some(StopReason::GuestPowerOff));
        assert_eq!(owner.release(), None);
    }

    #[test]
    fn new_generation_makes_old_reports_stale_and_drops_their_stop() {
        let mut owner = Ownership::default();
        let old = owner.next_generation();
        assert!(owner.claim());
        owner.hold(StopReason::GuestPowerOff);

        let new = owner.next_generation();

        assert!(!owner.is_current(old));
        assert!(owner.is_current(new));
        assert_eq!(owner.release(), None);
    }
}
