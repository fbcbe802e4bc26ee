//! Hyper-V's state vocabulary (`Msvm_ComputerSystem`) and the transition table behind
//! `RequestStateChange`.
//!
//! Every enum carries Hyper-V's numeric value ([`EnabledState::code`] and friends) and serialises
//! by name for people and scripts. [`transition`] is a pure function: the whole state machine is
//! one table that can be read, tested and shown to clients (`AvailableRequestedStates`) without a
//! service around it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A virtual machine's state (`Msvm_ComputerSystem.EnabledState`), with Hyper-V's values.
///
/// The five `…ing` states are transitional: an operation is in progress and will end in the
/// matching steady state (or go back to where it came from on failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EnabledState {
    /// 0: the state could not be determined.
    Unknown,
    /// 2 (Enabled): the guest is running.
    Running,
    /// 3 (Disabled): turned off.
    Off,
    /// 6 (Enabled but Offline): the guest's state is saved to disk; start restores it.
    Saved,
    /// 9 (Quiesce): the guest is paused in memory.
    Paused,
    /// 32770: a worker is being started (boot, restore, reset).
    Starting,
    /// 32773: the guest's state is being saved.
    Saving,
    /// 32774: being turned off.
    Stopping,
    /// 32776: being paused.
    Pausing,
    /// 32777: being resumed from Paused.
    Resuming,
}

impl EnabledState {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u16 {
        match self {
            EnabledState::Unknown => 0,
            EnabledState::Running => 2,
            EnabledState::Off => 3,
            EnabledState::Saved => 6,
            EnabledState::Paused => 9,
            EnabledState::Starting => 32770,
            EnabledState::Saving => 32773,
            EnabledState::Stopping => 32774,
            EnabledState::Pausing => 32776,
            EnabledState::Resuming => 32777,
        }
    }

    /// Decodes a value. Besides the v2 values this accepts CIM's 10 (Starting) and the v1 /
    /// cluster `VmState` values 32768 (Paused) and 32769 (Suspended = Saved).
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            0 => Some(EnabledState::Unknown),
            2 => Some(EnabledState::Running),
            3 => Some(EnabledState::Off),
            6 | 32769 => Some(EnabledState::Saved),
            9 | 32768 => Some(EnabledState::Paused),
            10 | 32770 => Some(EnabledState::Starting),
            32773 => Some(EnabledState::Saving),
            32774 => Some(EnabledState::Stopping),
            32776 => Some(EnabledState::Pausing),
            32777 => Some(EnabledState::Resuming),
            _ => None,
        }
    }

    /// Whether an operation is in progress in this state.
    pub const fn is_transitional(self) -> bool {
        matches!(
            self,
            EnabledState::Starting
                | EnabledState::Saving
                | EnabledState::Stopping
                | EnabledState::Pausing
                | EnabledState::Resuming
        )
    }
}

impl fmt::Display for EnabledState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A state change asked of a virtual machine (`RequestStateChange`'s `RequestedState`), and the
/// `Msvm_ComputerSystem.RequestedState` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestedState {
    /// 2: start (from Off, or restore from Saved) or resume (from Paused).
    Start,
    /// 3: turn off at once (no guest shutdown); from Saved it discards the saved state.
    TurnOff,
    /// 6: save the guest's state to disk and stop the worker.
    Save,
    /// 9: pause the guest in memory.
    Pause,
    /// 11: hard reset of the guest.
    Reset,
    /// 12: no request in progress (only ever shown, never requested).
    NotApplicable,
}

impl RequestedState {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u16 {
        match self {
            RequestedState::Start => 2,
            RequestedState::TurnOff => 3,
            RequestedState::Save => 6,
            RequestedState::Pause => 9,
            RequestedState::Reset => 11,
            RequestedState::NotApplicable => 12,
        }
    }

    /// Decodes the value a client passed to `RequestStateChange`.
    ///
    /// Aliases are accepted as the reference recommends: 10 (Reboot) is a hard reset like 11,
    /// and the v1 values 32768 / 32769 mean pause / save. Values CIM defines but Hyper-V v2 does
    /// not act on (1 Other, 4 Shut Down — a graceful shutdown is `Msvm_ShutdownComponent`'s job —,
    /// 7 Test, 8 Defer) give [`ReturnCode::NotSupported`]; anything else, including 12, gives
    /// [`ReturnCode::InvalidParameter`].
    pub const fn from_code(code: u16) -> Result<Self, ReturnCode> {
        match code {
            2 => Ok(RequestedState::Start),
            3 => Ok(RequestedState::TurnOff),
            6 | 32769 => Ok(RequestedState::Save),
            9 | 32768 => Ok(RequestedState::Pause),
            10 | 11 => Ok(RequestedState::Reset),
            1 | 4 | 7 | 8 => Err(ReturnCode::NotSupported),
            _ => Err(ReturnCode::InvalidParameter),
        }
    }
}

impl fmt::Display for RequestedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `Msvm_ComputerSystem.HealthState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum HealthState {
    /// 5: OK.
    #[default]
    Ok,
    /// 20: major failure (e.g. storage low: the guest was paused).
    MajorFailure,
    /// 25: critical failure (the worker died or stopped responding).
    CriticalFailure,
}

impl HealthState {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u16 {
        match self {
            HealthState::Ok => 5,
            HealthState::MajorFailure => 20,
            HealthState::CriticalFailure => 25,
        }
    }
}

/// `Msvm_ComputerSystem.OperationalStatus[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum OperationalStatus {
    /// 2: OK.
    #[default]
    Ok,
    /// 3: degraded: the configuration cannot be read; only turn-off and destroy are allowed.
    Degraded,
    /// 5: predictive failure (storage running low).
    PredictiveFailure,
    /// 11: in service: an operation on the virtual machine is in progress.
    InService,
}

impl OperationalStatus {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u16 {
        match self {
            OperationalStatus::Ok => 2,
            OperationalStatus::Degraded => 3,
            OperationalStatus::PredictiveFailure => 5,
            OperationalStatus::InService => 11,
        }
    }
}

/// `RequestStateChange`'s return value (Hyper-V's vendor block plus 0 and 4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReturnCode {
    /// 0: done synchronously.
    Completed,
    /// 4096: the transition started; follow the job.
    JobStarted,
    /// 32768: failed.
    Failed,
    /// 32769: access denied.
    AccessDenied,
    /// 32770: not supported.
    NotSupported,
    /// 32771: status unknown.
    StatusUnknown,
    /// 32772: timeout.
    Timeout,
    /// 32773: invalid parameter.
    InvalidParameter,
    /// 32774: system in use (another operation owns the virtual machine).
    SystemInUse,
    /// 32775: invalid state for this operation.
    InvalidState,
    /// 32776: incorrect data type.
    IncorrectDataType,
    /// 32777: system not available.
    SystemNotAvailable,
    /// 32778: out of memory.
    OutOfMemory,
    /// 32779: file not found.
    FileNotFound,
}

impl ReturnCode {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u32 {
        match self {
            ReturnCode::Completed => 0,
            ReturnCode::JobStarted => 4096,
            ReturnCode::Failed => 32768,
            ReturnCode::AccessDenied => 32769,
            ReturnCode::NotSupported => 32770,
            ReturnCode::StatusUnknown => 32771,
            ReturnCode::Timeout => 32772,
            ReturnCode::InvalidParameter => 32773,
            ReturnCode::SystemInUse => 32774,
            ReturnCode::InvalidState => 32775,
            ReturnCode::IncorrectDataType => 32776,
            ReturnCode::SystemNotAvailable => 32777,
            ReturnCode::OutOfMemory => 32778,
            ReturnCode::FileNotFound => 32779,
        }
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.code())
    }
}

/// What the service has to do to carry out a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransitionAction {
    /// Launch a worker that boots the guest.
    Boot,
    /// Launch a worker that restores the saved state.
    RestoreSavedState,
    /// Ask the worker to pause.
    Pause,
    /// Ask the worker to resume.
    Resume,
    /// Ask the worker to save into a folder, then exit.
    Save,
    /// Ask the worker to power off and exit.
    TurnOff,
    /// Delete the saved state (no worker is involved).
    DiscardSavedState,
    /// Ask the worker to hard-reset the guest.
    Reset,
    /// Ask the guest to shut itself down, turning it off if it does not (never produced by
    /// [`transition`]: graceful shutdown is `Msvm_ShutdownComponent.InitiateShutdown`, not a
    /// `RequestStateChange`).
    Shutdown,
}

/// An accepted state change: the state shown while it runs, the state it ends in, and the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transition {
    /// Shown while the operation runs.
    pub pending: EnabledState,
    /// Reached when the operation succeeds.
    pub target: EnabledState,
    /// What has to be done.
    pub action: TransitionAction,
}

/// The state machine: whether `request` is valid in state `from`, and if so what it does.
///
/// Refusals: [`ReturnCode::SystemInUse`] in a transitional state (one operation per virtual
/// machine at a time), [`ReturnCode::InvalidParameter`] for `NotApplicable`, and
/// [`ReturnCode::InvalidState`] (32775) for every other pair not in the table. A degraded virtual
/// machine is further limited by the service to `TurnOff`.
///
/// ```
/// use vmm_core::{transition, EnabledState, RequestedState, ReturnCode, TransitionAction};
///
/// let t = transition(EnabledState::Saved, RequestedState::Start).unwrap();
/// assert_eq!((t.pending, t.target), (EnabledState::Starting, EnabledState::Running));
/// assert_eq!(t.action, TransitionAction::RestoreSavedState);
/// assert_eq!(transition(EnabledState::Off, RequestedState::Pause), Err(ReturnCode::InvalidState));
/// ```
pub const fn transition(
    from: EnabledState,
    request: RequestedState,
) -> Result<Transition, ReturnCode> {
    use EnabledState as S;
    use RequestedState as R;
    use TransitionAction as A;

    const fn to(pending: S, target: S, action: A) -> Result<Transition, ReturnCode> {
        Ok(Transition {
            pending,
            target,
            action,
        })
    }

    if from.is_transitional() {
        return Err(ReturnCode::SystemInUse);
    }
    match (from, request) {
        (_, R::NotApplicable) => Err(ReturnCode::InvalidParameter),
        (S::Off, R::Start) => to(S::Starting, S::Running, A::Boot),
        (S::Saved, R::Start) => to(S::Starting, S::Running, A::RestoreSavedState),
        (S::Saved, R::TurnOff) => to(S::Stopping, S::Off, A::DiscardSavedState),
        (S::Running, R::TurnOff) | (S::Paused, R::TurnOff) => to(S::Stopping, S::Off, A::TurnOff),
        (S::Running, R::Save) | (S::Paused, R::Save) => to(S::Saving, S::Saved, A::Save),
        (S::Running, R::Pause) => to(S::Pausing, S::Paused, A::Pause),
        (S::Paused, R::Start) => to(S::Resuming, S::Running, A::Resume),
        (S::Running, R::Reset) | (S::Paused, R::Reset) => to(S::Starting, S::Running, A::Reset),
        _ => Err(ReturnCode::InvalidState),
    }
}

/// The requests [`transition`] accepts in `from` (`Msvm_ComputerSystem.AvailableRequestedStates`).
pub fn available_requests(from: EnabledState) -> Vec<RequestedState> {
    ALL_REQUESTS
        .into_iter()
        .filter(|r| transition(from, *r).is_ok())
        .collect()
}

const ALL_REQUESTS: [RequestedState; 6] = [
    RequestedState::Start,
    RequestedState::TurnOff,
    RequestedState::Save,
    RequestedState::Pause,
    RequestedState::Reset,
    RequestedState::NotApplicable,
];

#[cfg(test)]
mod tests {
    use super::*;
    use EnabledState as S;
    use RequestedState as R;
    use TransitionAction as A;

    const ALL_STATES: [EnabledState; 10] = [
        S::Unknown,
        S::Running,
        S::Off,
        S::Saved,
        S::Paused,
        S::Starting,
        S::Saving,
        S::Stopping,
        S::Pausing,
        S::Resuming,
    ];

    /// The expected table, one row per state, one column per request in `ALL_REQUESTS` order
    /// (Start, TurnOff, Save, Pause, Reset, NotApplicable). Written out cell by cell so that a
    /// change to `transition` must be matched here.
    fn expected(from: EnabledState) -> [Result<(S, S, A), ReturnCode>; 6] {
        let invalid = Err(ReturnCode::InvalidState);
        let param = Err(ReturnCode::InvalidParameter);
        let busy = Err(ReturnCode::SystemInUse);
        match from {
            S::Off => [
                Ok((S::Starting, S::Running, A::Boot)),
                invalid,
                invalid,
                invalid,
                invalid,
                param,
            ],
            S::Saved => [
                Ok((S::Starting, S::Running, A::RestoreSavedState)),
                Ok((S::Stopping, S::Off, A::DiscardSavedState)),
                invalid,
                invalid,
                invalid,
                param,
            ],
            S::Running => [
                invalid,
                Ok((S::Stopping, S::Off, A::TurnOff)),
                Ok((S::Saving, S::Saved, A::Save)),
                Ok((S::Pausing, S::Paused, A::Pause)),
                Ok((S::Starting, S::Running, A::Reset)),
                param,
            ],
            S::Paused => [
                Ok((S::Resuming, S::Running, A::Resume)),
                Ok((S::Stopping, S::Off, A::TurnOff)),
                Ok((S::Saving, S::Saved, A::Save)),
                invalid,
                Ok((S::Starting, S::Running, A::Reset)),
                param,
            ],
            S::Unknown => [invalid, invalid, invalid, invalid, invalid, param],
            S::Starting | S::Saving | S::Stopping | S::Pausing | S::Resuming => [busy; 6],
        }
    }

    #[test]
    fn every_cell_of_the_transition_table_matches() {
        for from in ALL_STATES {
            for (request, want) in ALL_REQUESTS.into_iter().zip(expected(from)) {
                let got = transition(from, request).map(|t| (t.pending, t.target, t.action));
                assert_eq!(got, want, "transition({from:?}, {request:?})");
            }
        }
    }

    #[test]
    fn enabled_state_codes_are_hyper_v_values() {
        let codes = ALL_STATES.map(EnabledState::code);

        assert_eq!(codes, [0, 2, 3, 6, 9, 32770, 32773, 32774, 32776, 32777]);
    }

    #[test]
    fn enabled_state_codes_round_trip() {
        for state in ALL_STATES {
            assert_eq!(EnabledState::from_code(state.code()), Some(state));
        }
    }

    #[test]
    fn enabled_state_accepts_v1_and_cim_aliases() {
        let decoded = [10, 32768, 32769].map(EnabledState::from_code);

        assert_eq!(
            decoded,
            [Some(S::Starting), Some(S::Paused), Some(S::Saved)]
        );
    }

    #[test]
    fn requested_state_codes_round_trip() {
        for request in [R::Start, R::TurnOff, R::Save, R::Pause, R::Reset] {
            assert_eq!(RequestedState::from_code(request.code()), Ok(request));
        }
    }

    #[test]
    fn requested_state_accepts_aliases() {
        let decoded = [32768, 32769, 10].map(RequestedState::from_code);

        assert_eq!(decoded, [Ok(R::Pause), Ok(R::Save), Ok(R::Reset)]);
    }

    #[test]
    fn requested_shutdown_is_not_supported() {
        assert_eq!(RequestedState::from_code(4), Err(ReturnCode::NotSupported));
    }

    #[test]
    fn requested_unknown_or_not_applicable_is_invalid_parameter() {
        let decoded = [0, 5, 12, 13, 32770, 65535].map(RequestedState::from_code);

        assert_eq!(decoded, [Err(ReturnCode::InvalidParameter); 6]);
    }

    #[test]
    fn return_codes_are_hyper_v_values() {
        let codes = [
            ReturnCode::Completed,
            ReturnCode::JobStarted,
            ReturnCode::Failed,
            ReturnCode::AccessDenied,
            ReturnCode::NotSupported,
            ReturnCode::StatusUnknown,
            ReturnCode::Timeout,
            ReturnCode::InvalidParameter,
            ReturnCode::SystemInUse,
            ReturnCode::InvalidState,
            ReturnCode::IncorrectDataType,
            ReturnCode::SystemNotAvailable,
            ReturnCode::OutOfMemory,
            ReturnCode::FileNotFound,
        ]
        .map(ReturnCode::code);

        let mut want = vec![0, 4096];
        want.extend(32768..=32779);
        assert_eq!(codes.to_vec(), want);
    }

    #[test]
    fn health_and_operational_codes_are_hyper_v_values() {
        let health = [
            HealthState::Ok,
            HealthState::MajorFailure,
            HealthState::CriticalFailure,
        ]
        .map(HealthState::code);
        let operational = [
            OperationalStatus::Ok,
            OperationalStatus::Degraded,
            OperationalStatus::PredictiveFailure,
            OperationalStatus::InService,
        ]
        .map(OperationalStatus::code);

        assert_eq!(health, [5, 20, 25]);
        assert_eq!(operational, [2, 3, 5, 11]);
    }

    #[test]
    fn available_requests_of_paused_vm() {
        let available = available_requests(S::Paused);

        assert_eq!(available, [R::Start, R::TurnOff, R::Save, R::Reset]);
    }
}
