//! The compact layout: the search, then the argument checks, then one `ret` per verdict that
//! every leaf and check jumps to. Jump targets are labels until the layout is known; a jump that
//! ends up farther than a conditional jump reaches makes the layout unusable for this list.

use seccompiler::{BpfProgram, sock_filter};

use super::{
    ALLOW, ArgMatch, DATA_ARGS, FilterError, KILL_PROCESS, SyscallAction, Verdict, alu_and, errno,
    jump_if, load, prologue, ret,
};

/// Where a jump lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// This many instructions ahead (known while emitting).
    Ahead(u8),
    /// The shared `ret` of this verdict.
    Verdict(Verdict),
    /// The first instruction of the argument checks of this syscall.
    Checks(u32),
}

/// An instruction whose jump offsets may still be labels.
struct Pending {
    insn: sock_filter,
    jt: Label,
    jf: Label,
}

#[derive(Default)]
struct Layout {
    code: Vec<Pending>,
    /// Where each syscall's checks start, by syscall number.
    checks: Vec<(u32, usize)>,
    /// The verdicts jumped to, in order of first use.
    verdicts: Vec<Verdict>,
}

/// The program in the compact layout, or `None` when a jump would be too long for it.
pub(super) fn compile(
    entries: &[(u32, &SyscallAction)],
) -> Result<Option<BpfProgram>, FilterError> {
    let mut layout = Layout::default();
    for insn in prologue() {
        layout.plain(insn);
    }
    if !layout.search(entries) {
        return Ok(None);
    }
    for (nr, action) in entries {
        if let SyscallAction::AllowIfAny(checks) = action {
            layout.checks(*nr, checks)?;
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

    /// The search over `entries`: false when a left half is too long to jump over.
    fn search(&mut self, entries: &[(u32, &SyscallAction)]) -> bool {
        match entries {
            [] => {
                self.plain(ret(KILL_PROCESS));
                true
            }
            [(nr, action)] => {
                let matched = match action {
                    SyscallAction::Allow => Label::Verdict(ALLOW),
                    SyscallAction::Errno(code) => Label::Verdict(errno(*code)),
                    SyscallAction::AllowIfAny(_) => Label::Checks(*nr),
                };
                let test = jump_if(libc::BPF_JEQ, *nr, 0, 0);
                self.jump(test, matched, Label::Verdict(KILL_PROCESS));
                true
            }
            _ => {
                let (left, right) = entries.split_at(entries.len() / 2);
                let node = self.code.len();
                self.plain(jump_if(libc::BPF_JGE, right[0].0, 0, 0));
                if !self.search(left) {
                    return false;
                }
                let Ok(over_left) = u8::try_from(self.code.len() - node - 1) else {
                    return false;
                };
                self.code[node].jt = Label::Ahead(over_left);
                self.search(right)
            }
        }
    }

    /// `nr`'s checks: each allows on a match and falls through to the next on a mismatch; after
    /// the last, the process is killed.
    fn checks(&mut self, nr: u32, checks: &[ArgMatch]) -> Result<(), FilterError> {
        self.checks.push((nr, self.code.len()));
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

    /// The program with every label turned into an offset and the shared verdicts appended;
    /// `None` when an offset does not fit.
    fn resolve(self) -> Option<BpfProgram> {
        let Layout {
            code,
            checks,
            verdicts,
        } = self;
        let verdicts_at = code.len();
        let target = |from: usize, label: Label| -> Option<u8> {
            let to = match label {
                Label::Ahead(n) => return Some(n),
                Label::Verdict(verdict) => {
                    verdicts_at + verdicts.iter().position(|&v| v == verdict)?
                }
                Label::Checks(nr) => checks.iter().find(|(n, _)| *n == nr)?.1,
            };
            u8::try_from(to.checked_sub(from + 1)?).ok()
        };
        let mut program = Vec::with_capacity(verdicts_at + verdicts.len());
        for (at, Pending { mut insn, jt, jf }) in code.into_iter().enumerate() {
            insn.jt = target(at, jt)?;
            insn.jf = target(at, jf)?;
            program.push(insn);
        }
        program.extend(verdicts.iter().map(|&verdict| ret(verdict)));
        Some(program)
    }
}

/// How many instructions [`Layout::half`] emits for `mask`.
fn half_len(mask: u32) -> u8 {
    if mask == u32::MAX { 2 } else { 3 }
}
