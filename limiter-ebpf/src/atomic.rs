//! BPF atomic instructions. Rust's BPF target offers no read-modify-write through
//! `core::sync::atomic`, so the one instruction the buckets need, compare-and-swap, is
//! written out; the verifier of every kernel since 5.12 accepts it on map values.

/// Atomically replaces the word at `target` with `new` if it equals `current`
/// (`BPF_ATOMIC | BPF_CMPXCHG`). Returns the word that was there: equal to `current` exactly
/// when the swap happened.
///
/// # Safety
/// `target` must point to an 8-byte aligned `u64` inside a map value.
#[inline(always)]
pub unsafe fn compare_exchange(target: *mut u64, current: u64, new: u64) -> u64 {
    let previous: u64;
    // SAFETY: the caller guarantees `target` is a valid, aligned map value word; the
    // instruction takes the expected value in r0 and returns the previous one there.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({target} + 0, r0, {new})",
            target = in(reg) target,
            new = in(reg) new,
            inout("r0") current => previous,
            options(nostack),
        );
    }
    previous
}
