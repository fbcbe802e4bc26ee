//! The seccomp allowlist compiled to classic BPF as a binary search on the syscall number.
//!
//! seccompiler (which installs the program) compiles a filter to a chain that tests the syscall
//! number against each listed syscall in turn. Installing a filter makes the kernel run it once
//! for every syscall number, to learn which ones it may allow without running it again (the
//! seccomp action cache, Linux 5.11+), so a chain of ~90 tests costs that emulation ~90 steps
//! for each of ~460 numbers: measured here, installing the worker's two seccompiler filters took
//! ~0.4 ms, on the path of every VM start. A balanced search takes 7 tests per number, and the
//! `clone3` → `ENOSYS` answer, which needs its own filter in seccompiler (one action per
//! filter), is one more leaf of the same program. The checks on arguments are the same ones
//! seccompiler emits: 32-bit comparisons of one argument's low half, or both halves for 64-bit
//! ones.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, sock_filter};

mod layout;

use layout::Mode;

/// `AUDIT_ARCH_X86_64` (linux/audit.h): `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Offsets into `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// Classic BPF's own limit on a program's length (`BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

/// One comparison of a syscall argument: `(argument & mask) == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArgMatch {
    /// Which argument (0–5).
    pub(crate) index: u8,
    /// Compare the low 32 bits only (an `int` or a request number passed in a 64-bit
    /// register, whose upper half the kernel ignores), or all 64.
    pub(crate) wide: bool,
    pub(crate) mask: u64,
    pub(crate) value: u64,
}

impl ArgMatch {
    /// The low 32 bits of argument `index` equal `value`.
    pub(crate) fn low_eq(index: u8, value: u64) -> Self {
        ArgMatch {
            index,
            wide: false,
            mask: u64::from(u32::MAX),
            value,
        }
    }

    /// All 64 bits of argument `index`, masked with `mask`, equal `value`.
    pub(crate) fn masked_eq(index: u8, mask: u64, value: u64) -> Self {
        ArgMatch {
            index,
            wide: true,
            mask,
            value,
        }
    }

    /// What the comparison answers for these arguments (the reference the compiled program is
    /// tested against).
    #[cfg(test)]
    pub(crate) fn matches(&self, args: &[u64; 6]) -> bool {
        let arg = args[usize::from(self.index)];
        let mask = if self.wide {
            self.mask
        } else {
            self.mask & u64::from(u32::MAX)
        };
        arg & mask == self.value & mask
    }
}

/// What a listed syscall gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyscallAction {
    /// Allowed with any arguments.
    Allow,
    /// Allowed when any of the comparisons holds; the process is killed otherwise.
    AllowIfAny(Vec<ArgMatch>),
    /// Fails with this errno without reaching the kernel's implementation.
    Errno(u16),
}

/// What a program answers for one syscall: the kernel's `SECCOMP_RET_*` value.
pub(crate) type Verdict = u32;

/// Allowing the syscall.
pub(crate) const ALLOW: Verdict = libc::SECCOMP_RET_ALLOW;
/// Killing the process (every thread), which the supervisor reports as a crash.
pub(crate) const KILL_PROCESS: Verdict = libc::SECCOMP_RET_KILL_PROCESS;

fn errno(code: u16) -> Verdict {
    libc::SECCOMP_RET_ERRNO | u32::from(code)
}

/// Why a list could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// An argument index beyond the six a syscall has.
    #[error("syscall {nr}: argument {index} does not exist")]
    ArgumentIndex {
        /// The syscall.
        nr: i64,
        /// The index asked for.
        index: u8,
    },
    /// A syscall number that is not a 32-bit unsigned value.
    #[error("syscall number {0} is out of range")]
    SyscallNumber(i64),
    /// More than classic BPF can hold.
    #[error("the filter needs {0} instructions, more than BPF's 4096")]
    TooLong(usize),
    /// A check needs a jump longer than a conditional jump's 255 instructions.
    #[error("syscall {0}: too many argument checks for one syscall")]
    TooManyChecks(i64),
    /// A jump the layout could not place within reach (a defect of the compiler, not of the
    /// list).
    #[error("a jump of the filter is out of reach")]
    JumpTooFar,
}

/// The policy as a program: syscalls of another architecture and unlisted ones kill the
/// process; listed ones get their action.
///
/// The compact layout (every leaf jumping to one shared `ret` per verdict, ~55% of the length
/// for the worker's list: the kernel's JIT and checks cost time in proportion) needs every jump
/// within a conditional jump's 255 instructions; a list too long for that gets the spread
/// layout, whose leaves carry their own verdicts (see `layout`).
pub(crate) fn compile(list: &BTreeMap<i64, SyscallAction>) -> Result<BpfProgram, FilterError> {
    let entries = numbered(list)?;
    let program = match layout::compile(&entries, Mode::Compact)? {
        Some(program) => program,
        None => layout::compile(&entries, Mode::Spread)?.ok_or(FilterError::JumpTooFar)?,
    };
    if program.len() > MAX_INSTRUCTIONS {
        return Err(FilterError::TooLong(program.len()));
    }
    Ok(program)
}

fn numbered(
    list: &BTreeMap<i64, SyscallAction>,
) -> Result<Vec<(u32, &SyscallAction)>, FilterError> {
    list.iter()
        .map(|(&nr, action)| {
            u32::try_from(nr)
                .map(|nr| (nr, action))
                .map_err(|_| FilterError::SyscallNumber(nr))
        })
        .collect()
}

/// The four instructions every program starts with: other architectures are killed, the
/// syscall number goes into the accumulator.
fn prologue() -> BpfProgram {
    vec![
        load(DATA_ARCH),
        jump_if(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        ret(KILL_PROCESS),
        load(DATA_NR),
    ]
}

fn load(offset: u32) -> sock_filter {
    statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn alu_and(mask: u32) -> sock_filter {
    statement(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, mask)
}

fn ret(verdict: Verdict) -> sock_filter {
    statement(libc::BPF_RET | libc::BPF_K, verdict)
}

fn jump_always(offset: u32) -> sock_filter {
    statement(libc::BPF_JMP | libc::BPF_JA, offset)
}

fn jump_if(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn statement(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Runs a program on one syscall the way the kernel would (the subset of classic BPF that
/// [`compile`] emits): the verdict, and how many instructions it took. The tests' check that the
/// compiled search answers what the list says.
#[cfg(test)]
pub(crate) fn run(
    program: &[sock_filter],
    arch: u32,
    nr: u32,
    args: &[u64; 6],
) -> (Verdict, usize) {
    let word = |offset: u32| -> u32 {
        match offset {
            DATA_NR => nr,
            DATA_ARCH => arch,
            o if (DATA_ARGS..DATA_ARGS + 48).contains(&o) => {
                let arg = args[((o - DATA_ARGS) / 8) as usize];
                if (o - DATA_ARGS).is_multiple_of(8) {
                    arg as u32
                } else {
                    (arg >> 32) as u32
                }
            }
            o => panic!("load of seccomp_data offset {o}"),
        }
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    let mut steps = 0;
    loop {
        let insn = &program[pc];
        let code = u32::from(insn.code);
        pc += 1;
        steps += 1;
        match code {
            c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => acc = word(insn.k),
            c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= insn.k,
            c if c == libc::BPF_RET | libc::BPF_K => return (insn.k, steps),
            c if c == libc::BPF_JMP | libc::BPF_JA => pc += insn.k as usize,
            c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                pc += usize::from(if acc == insn.k { insn.jt } else { insn.jf });
            }
            c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => {
                pc += usize::from(if acc >= insn.k { insn.jt } else { insn.jf });
            }
            c => panic!("instruction {c:#x} at {}", pc - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(list: &BTreeMap<i64, SyscallAction>, nr: u32, args: &[u64; 6]) -> Verdict {
        match list.get(&i64::from(nr)) {
            None => KILL_PROCESS,
            Some(SyscallAction::Allow) => ALLOW,
            Some(SyscallAction::Errno(code)) => errno(*code),
            Some(SyscallAction::AllowIfAny(checks)) => {
                if checks.iter().any(|c| c.matches(args)) {
                    ALLOW
                } else {
                    KILL_PROCESS
                }
            }
        }
    }

    /// Plain numbers every `step` below 300, ioctl (16) and clone (56) with argument checks,
    /// clone3 (435) failing with ENOSYS.
    fn sample_list_every(step: usize) -> BTreeMap<i64, SyscallAction> {
        let mut list: BTreeMap<i64, SyscallAction> = (0..300)
            .step_by(step)
            .map(|nr| (nr, SyscallAction::Allow))
            .collect();
        list.insert(
            16,
            SyscallAction::AllowIfAny((0..40).map(|r| ArgMatch::low_eq(1, 0xae00 + r)).collect()),
        );
        list.insert(
            56,
            SyscallAction::AllowIfAny(vec![ArgMatch::masked_eq(0, 0x10000, 0x10000)]),
        );
        list.insert(435, SyscallAction::Errno(libc::ENOSYS as u16));
        list
    }

    /// Long enough (102 entries) that only the spread layout holds it.
    fn sample_list() -> BTreeMap<i64, SyscallAction> {
        sample_list_every(3)
    }

    fn assert_answers_as_listed(list: &BTreeMap<i64, SyscallAction>, program: &[sock_filter]) {
        for nr in 0..1024 {
            for args in [[0; 6], [0, 0xae05, 0, 0, 0, 0], [0x10000, 0, 0, 0, 0, 0]] {
                assert_eq!(
                    run(program, AUDIT_ARCH_X86_64, nr, &args).0,
                    expected(list, nr, &args),
                    "nr {nr}, args {args:x?}"
                );
            }
        }
    }

    #[test]
    fn search_answers_what_the_list_says_for_every_number() {
        let list = sample_list();
        let program = compile(&list).unwrap();

        assert_answers_as_listed(&list, &program);
    }

    #[test]
    fn compact_and_spread_layouts_answer_alike() {
        let list = sample_list_every(6);
        let entries = numbered(&list).unwrap();

        let compact = layout::compile(&entries, Mode::Compact)
            .unwrap()
            .expect("fits the compact layout");
        let spread = layout::compile(&entries, Mode::Spread).unwrap().unwrap();

        assert!(compact.len() < spread.len());
        assert_answers_as_listed(&list, &compact);
        assert_answers_as_listed(&list, &spread);
    }

    #[test]
    fn a_list_too_long_for_the_compact_layout_gets_the_spread_one() {
        let list = sample_list();
        let entries = numbered(&list).unwrap();

        let compact = layout::compile(&entries, Mode::Compact).unwrap();

        assert!(compact.is_none());
        let spread = layout::compile(&entries, Mode::Spread).unwrap();
        assert_eq!(Some(compile(&list).unwrap()), spread);
    }

    #[test]
    fn the_worker_allowlist_is_compact() {
        let list = super::super::syscalls::allowlist();
        let entries = numbered(&list).unwrap();

        let program = compile(&list).unwrap();

        let compact = layout::compile(&entries, Mode::Compact).unwrap();
        assert_eq!(Some(&program), compact.as_ref());
        let spread = layout::compile(&entries, Mode::Spread).unwrap().unwrap();
        assert!(program.len() < spread.len());
    }

    #[test]
    fn the_worker_allowlist_answers_as_listed_in_both_layouts() {
        let list = super::super::syscalls::allowlist();
        let entries = numbered(&list).unwrap();

        for mode in [Mode::Compact, Mode::Spread] {
            let program = layout::compile(&entries, mode).unwrap().unwrap();
            assert_answers_as_listed(&list, &program);
        }
    }

    #[test]
    fn narrow_checks_ignore_the_upper_half_and_wide_ones_do_not() {
        let list = sample_list();
        let program = compile(&list).unwrap();

        let ioctl_high = [0, 0xdead_0000_0000_ae05, 0, 0, 0, 0];
        let clone_high = [0x1_0001_0000, 0, 0, 0, 0, 0];
        let clone_missing = [0x1_0000_0000, 0, 0, 0, 0, 0];

        assert_eq!(run(&program, AUDIT_ARCH_X86_64, 16, &ioctl_high).0, ALLOW);
        assert_eq!(run(&program, AUDIT_ARCH_X86_64, 56, &clone_high).0, ALLOW);
        assert_eq!(
            run(&program, AUDIT_ARCH_X86_64, 56, &clone_missing).0,
            KILL_PROCESS
        );
    }

    #[test]
    fn another_architecture_is_killed() {
        let program = compile(&sample_list()).unwrap();

        let i386 = 0x4000_0003;

        assert_eq!(run(&program, i386, 3, &[0; 6]).0, KILL_PROCESS);
    }

    #[test]
    fn x32_numbers_match_nothing() {
        let program = compile(&sample_list()).unwrap();

        assert_eq!(
            run(&program, AUDIT_ARCH_X86_64, 0x4000_0000 | 3, &[0; 6]).0,
            KILL_PROCESS
        );
    }

    #[test]
    fn an_unlisted_number_takes_one_test_per_level() {
        for list in [sample_list(), sample_list_every(6)] {
            assert_logarithmic(&list, &compile(&list).unwrap());
        }
    }

    fn assert_logarithmic(list: &BTreeMap<i64, SyscallAction>, program: &[sock_filter]) {
        let levels = (list.len() as f64).log2().ceil() as usize;
        let longest = (0..1024u32)
            .filter(|&nr| !list.contains_key(&i64::from(nr)))
            .map(|nr| run(program, AUDIT_ARCH_X86_64, nr, &[0; 6]).1)
            .max()
            .unwrap();

        // The arch check (3), the number's load, at most two instructions per level, the
        // leaf's test and its kill.
        assert!(
            longest <= 4 + 2 * levels + 2,
            "{longest} steps for {levels} levels"
        );
    }

    #[test]
    fn an_argument_beyond_the_sixth_is_refused() {
        let list = BTreeMap::from([(1, SyscallAction::AllowIfAny(vec![ArgMatch::low_eq(6, 0)]))]);

        assert!(matches!(
            compile(&list),
            Err(FilterError::ArgumentIndex { nr: 1, index: 6 })
        ));
    }

    #[test]
    fn an_empty_list_kills_everything() {
        let program = compile(&BTreeMap::new()).unwrap();

        assert_eq!(run(&program, AUDIT_ARCH_X86_64, 0, &[0; 6]).0, KILL_PROCESS);
    }
}
