//! Ctrl-C, SIGTERM and SIGHUP (the terminal went away): the first one asks every loop of the demo to stop so the lab is torn
//! down in order; a second one exits at once (the lab can then be removed with `--cleanup`).

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Exit status after an interruption, the shell's convention for SIGINT.
pub const INTERRUPTED_EXIT_CODE: u8 = 130;

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the handlers. Call once, before anything is created.
pub fn install() -> Result<()> {
    let flag = STOP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        // Registered first, so it sees the flag before the second registration sets it: the
        // first signal only sets the flag, a second one exits immediately.
        signal_hook::flag::register_conditional_shutdown(
            signal,
            i32::from(INTERRUPTED_EXIT_CODE),
            Arc::clone(flag),
        )
        .context("install the signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(flag))
            .context("install the signal handler")?;
    }
    Ok(())
}

/// True once Ctrl-C (or SIGTERM or SIGHUP) has been received.
pub fn requested() -> bool {
    STOP.get().is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// Sleeps until `deadline`, waking early when a stop is requested. Returns false if it was.
pub fn sleep_until(deadline: Instant) -> bool {
    const STEP: Duration = Duration::from_millis(20);
    loop {
        if requested() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        thread::sleep((deadline - now).min(STEP));
    }
}

/// The error returned when the demo stops because of Ctrl-C.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Fails with [`Interrupted`] once a stop has been requested.
pub fn check() -> Result<()> {
    if requested() {
        Err(Interrupted.into())
    } else {
        Ok(())
    }
}
