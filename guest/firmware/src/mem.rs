//! The C memory functions the compiler calls (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`).
//!
//! The host target expects them from libc, which the guest does not link. The copies and fills use
//! `rep movsb` / `rep stosb`: one instruction, native at CPL3, and no loop the compiler could turn
//! back into a call to the very function being defined.

use core::arch::asm;

/// C `memcpy`.
///
/// # Safety
///
/// As C: `dest` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear (the ABI's state, see `memmove`).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// C `memmove`.
///
/// # Safety
///
/// As C: `dest` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never reads what it wrote.
        // SAFETY: as for `memcpy`; a forward copy is correct for this overlap.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: the caller guarantees both ranges; copy backwards (DF set), from the last byte, and
    // clear DF again as the ABI requires.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dest
}

/// C `memset`.
///
/// # Safety
///
/// As C: `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// C `memcmp`.
///
/// # Safety
///
/// As C: `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, within both ranges the caller guarantees.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// C `bcmp` (zero if equal, non-zero otherwise).
///
/// # Safety
///
/// As C: `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
