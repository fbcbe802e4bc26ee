//! Where the instructions of the search go. One emitter, two layouts:
//! - compact: the search, then each syscall's argument checks, then one `ret` per verdict that
//!   every leaf and check jumps to. The shortest program (the kernel's JIT and checks cost time
//!   in proportion to its length), but every jump must stay within a conditional jump's 255
//!   instructions;
//! - spread: each leaf followed by its own checks and the `ret`s of its verdicts, and a left half
//!   too long to jump over skipped through an unconditional jump, so that no jump is longer than
//!   its neighbourhood, whatever the list's length.
//!
//! Jump targets are labels until the layout is known.

use seccompiler::{BpfProgram, sock_filter};

use super::{
    ALLOW, ArgMatch, DATA_ARGS, FilterError, KILL_PROCESS, SyscallAction, Verdict, alu_and, errno,
    jump_always, jump_if, load, prologue, ret,
};

/// Which layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Compact,
    Spread,
}

/// Where a jump lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// This many instructions ahead (known while emitting).
    Ahead(u8),
    /// A `ret` of this verdict: the shared one (compact), or the nearest ahead (spread).
    Verdict(Verdict),
    /// The first instruction of the argument checks of this syscall (compact).
    Checks(u32),
}

/// An instruction whose jump offsets may still be labels.
struct Pending {
    insn: sock_filter,
    jt: Label,
    jf: Label,
}

struct Layout {
    mode: Mode,
    code: Vec<Pending>,
    /// Where each syscall's checks start, by syscall number (compact).
    checks: Vec<(u32, usize)>,
    /// The verdicts jumped to, in order of first use: the shared `ret`s (compact).
    verdicts: Vec<Verdict>,
}

/// The program in `mode`'s layout, or `None` when a jump would be too long for the compact one.
pub(super) fn compile(
    entries: &[(u32, &SyscallAction)],
    mode: Mode,
) -> Result<Option<BpfProgram>, FilterError> {
    let mut layout = Layout {
        mode,
        code: Vec::new(),
        checks: Vec::new(),
        verdicts: Vec::new(),
    };
    for insn in prologue() {
        layout.plain(insn);
    }
    if !layout.search(entries)? {
        return Ok(None);
    }
    if mode == Mode::Compact {
        for (nr, action) in entries {
            if let SyscallAction::AllowIfAny(checks) = action {
                layout.checks.push((*nr, layout.code.len()));
                layout.emit_checks(*nr, checks)?;
            }
        }
    }
    Ok(layout.resolve())
}

impl Layout {
    fn plain(&mut self, insn: sock_filter) {
        let (jt, jf) = (insn.jt, insn.jf);
        self.jump(insn, Label::Ahead(jt), Label::Ahead(jf));
    }

    fn jump(&mut self, insn: sock_filter, jt: Label, jf: Label) {
        for label in [jt, jf] {
            if let Label::Verdict(verdict) = label
                && !self.verdicts.contains(&verdict)
            {
                self.verdicts.push(verdict);
            }
        }
        self.code.push(Pending { insn, jt, jf });
    }

    /// The search over `entries` (sorted by number) with the syscall number in the accumulator:
    /// each inner node sends numbers at or above its pivot to its right half, each leaf tests
    /// its one number. False when a left half is too long to jump over in the compact layout.
    fn search(&mut self, entries: &[(u32, &SyscallAction)]) -> Result<bool, FilterError> {
        match entries {
            [] => {
                self.plain(ret(KILL_PROCESS));
                Ok(true)
            }
            [(nr, action)] => {
                self.leaf(*nr, action)?;
                Ok(true)
            }
            _ => {
                let (left, right) = entries.split_at(entries.len() / 2);
                let node = self.code.len();
                self.plain(jump_if(libc::BPF_JGE, right[0].0, 0, 0));
                if !self.search(left)? {
                    return Ok(false);
                }
                let over_left = self.code.len() - node - 1;
                match (u8::try_from(over_left), self.mode) {
                    (Ok(distance), _) => self.code[node].jt = Label::Ahead(distance),
                    // Through an unconditional jump, which reaches any distance. Nothing jumps
                    // backwards or by position across it: the left half's jumps are relative
                    // and stay within it, and verdicts are found ahead.
                    (Err(_), Mode::Spread) => {
                        self.code[node].jf = Label::Ahead(1);
                        let skip = Pending {
                            insn: jump_always(over_left as u32),
                            jt: Label::Ahead(0),
                            jf: Label::Ahead(0),
                        };
                        self.code.insert(node + 1, skip);
                    }
                    (Err(_), Mode::Compact) => return Ok(false),
                }
                self.search(right)
            }
        }
    }

    /// A leaf: `nr`'s test and what a match gets. Spread, its checks and verdicts follow it.
    fn leaf(&mut self, nr: u32, action: &SyscallAction) -> Result<(), FilterError> {
        let start = self.code.len();
        let matched = match (action, self.mode) {
            (SyscallAction::Allow, _) => Label::Verdict(ALLOW),
            (SyscallAction::Errno(code), _) => Label::Verdict(errno(*code)),
            (SyscallAction::AllowIfAny(_), Mode::Compact) => Label::Checks(nr),
            (SyscallAction::AllowIfAny(_), Mode::Spread) => Label::Ahead(0),
        };
        let test = jump_if(libc::BPF_JEQ, nr, 0, 0);
        self.jump(test, matched, Label::Verdict(KILL_PROCESS));
        if self.mode == Mode::Compact {
            return Ok(());
        }
        if let SyscallAction::AllowIfAny(checks) = action {
            self.emit_checks(nr, checks)?;
        }
        self.local_verdicts(start);
        if self.code.len() - start > usize::from(u8::MAX) {
            return Err(FilterError::TooManyChecks(i64::from(nr)));
        }
        Ok(())
    }

    /// Spread: a `ret` after the leaf that began at `start` for each verdict it jumps to and
    /// does not return itself.
    fn local_verdicts(&mut self, start: usize) {
        let mut needed: Vec<Verdict> = Vec::new();
        for pending in &self.code[start..] {
            for label in [pending.jt, pending.jf] {
                if let Label::Verdict(verdict) = label
                    && !needed.contains(&verdict)
                {
                    needed.push(verdict);
                }
            }
        }
        needed.retain(|&verdict| !self.code[start..].iter().any(|p| returns(&p.insn, verdict)));
        for verdict in needed {
            self.plain(ret(verdict));
        }
    }

    /// `nr`'s checks: each allows on a match and falls through to the next on a mismatch; after
    /// the last, the process is killed.
    fn emit_checks(&mut self, nr: u32, checks: &[ArgMatch]) -> Result<(), FilterError> {
        for check in checks {
            if check.index > 5 {
                return Err(FilterError::ArgumentIndex {
                    nr: i64::from(nr),
                    index: check.index,
                });
            }
            let low_offset = DATA_ARGS + 8 * u32::from(check.index);
            let low_len = half_len(check.mask as u32);
            if check.wide {
                // A mismatch in the high half skips the low half's test.
                self.half(
                    low_offset + 4,
                    (check.mask >> 32) as u32,
                    (check.value >> 32) as u32,
                    Label::Ahead(0),
                    Label::Ahead(low_len),
                );
            }
            self.half(
                low_offset,
                check.mask as u32,
                check.value as u32,
                Label::Verdict(ALLOW),
                Label::Ahead(0),
            );
        }
        self.plain(ret(KILL_PROCESS));
        Ok(())
    }

    /// Loads one 32-bit half of an argument and compares it, masked, with `value`.
    fn half(&mut self, offset: u32, mask: u32, value: u32, equal: Label, other: Label) {
        self.plain(load(offset));
        if mask != u32::MAX {
            self.plain(alu_and(mask));
        }
        self.jump(jump_if(libc::BPF_JEQ, value & mask, 0, 0), equal, other);
    }

    /// The program with every label turned into an offset (and, compact, the shared verdicts
    /// appended); `None` when an offset does not fit.
    fn resolve(self) -> Option<BpfProgram> {
        let Layout {
            mode,
            code,
            checks,
            verdicts,
        } = self;
        let mut program: BpfProgram = code.iter().map(|pending| pending.insn.clone()).collect();
        if mode == Mode::Compact {
            program.extend(verdicts.iter().map(|&verdict| ret(verdict)));
        }
        let shared_at = code.len();
        let target = |from: usize, label: Label| -> Option<u8> {
            let to = match (label, mode) {
                (Label::Ahead(n), _) => return Some(n),
                (Label::Verdict(verdict), Mode::Compact) => {
                    shared_at + verdicts.iter().position(|&v| v == verdict)?
                }
                (Label::Verdict(verdict), Mode::Spread) => {
                    from + 1
                        + program[from + 1..]
                            .iter()
                            .position(|insn| returns(insn, verdict))?
                }
                (Label::Checks(nr), _) => checks.iter().find(|(n, _)| *n == nr)?.1,
            };
            u8::try_from(to.checked_sub(from + 1)?).ok()
        };
        let offsets: Option<Vec<(u8, u8)>> = code
            .iter()
            .enumerate()
            .map(|(at, pending)| Some((target(at, pending.jt)?, target(at, pending.jf)?)))
            .collect();
        for (insn, (jt, jf)) in program.iter_mut().zip(offsets?) {
            insn.jt = jt;
            insn.jf = jf;
        }
        Some(program)
    }
}

/// Whether `insn` is `ret verdict`.
fn returns(insn: &sock_filter, verdict: Verdict) -> bool {
    u32::from(insn.code) == libc::BPF_RET | libc::BPF_K && insn.k == verdict
}

/// How many instructions [`Layout::half`] emits for `mask`.
fn half_len(mask: u32) -> u8 {
    if mask == u32::MAX { 2 } else { 3 }
}
