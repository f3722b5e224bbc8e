//! Support for the privileged tests: frame builders, a test-run harness around a loaded
//! [`Limiter`], and network namespaces that clean up after themselves.

pub mod daemon;
pub mod fleet;
pub mod frame;
pub mod netns;

use std::sync::OnceLock;

use aya::programs::{TestRun, TestRunOptions};
use limiter_common::layout::Stat;
use limiter_user::{Limiter, LoadOptions, Policy, Stats, sessions::Backfill};

/// XDP verdicts as the kernel numbers them.
pub const XDP_ABORTED: u32 = 0;
/// Drop.
pub const XDP_DROP: u32 = 1;
/// Pass.
pub const XDP_PASS: u32 = 2;

/// Pins the calling thread to CPU 0, so per-CPU state (the new-source budget) is one CPU's.
pub fn pin_to_cpu0() {
    pin_to_cpu(0);
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("the CPU exists");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// A loaded limiter with a policy, driven through `BPF_PROG_TEST_RUN`.
pub struct Harness {
    /// The limiter under test.
    pub limiter: Limiter,
}

impl Harness {
    /// Loads a fresh program (small tables) and applies `policy`.
    pub fn new(policy: &Policy) -> Self {
        require_root();
        pin_to_cpu0();
        let mut limiter = Limiter::load(&LoadOptions {
            max_sources: Some(4096),
            max_aggregates: Some(1024),
            pin_dir: None,
        })
        .expect("load the XDP program");
        limiter
            .apply(&policy.compile().expect("valid policy"))
            .expect("apply the policy");
        Self { limiter }
    }

    /// Loads a fresh program with `policy` and TCP judged by session: the sock_ops program
    /// attached to the host's cgroup v2 root for this process's namespace, and `sessions`
    /// recorded as if the kernel had reported them.
    pub fn with_sessions(policy: &Policy, sessions: &Backfill) -> Self {
        let mut harness = Self::new(policy);
        let cgroup = limiter_user::sessions::find_cgroup2().expect("a cgroup v2 hierarchy");
        let cookie = limiter_user::sessions::netns_cookie().expect("the namespace cookie");
        harness
            .limiter
            .attach_sessions(&cgroup, cookie, sessions)
            .expect("attach the sock_ops program");
        assert!(harness.limiter.sessions_attached());
        harness
    }

    /// Runs one frame; returns the verdict and the counters that changed.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<(Stat, u64)>) {
        let before = self.stats();
        let verdict = self.verdict(frame);
        let after = self.stats();
        let changed = Stat::ALL
            .iter()
            .filter_map(|s| {
                let delta = after.packets(*s) - before.packets(*s);
                (delta != 0).then_some((*s, delta))
            })
            .collect();
        (verdict, changed)
    }

    /// Runs one frame; returns only the verdict.
    pub fn verdict(&self, frame: &[u8]) -> u32 {
        run_frame(self.limiter.program(), frame).expect("BPF_PROG_TEST_RUN")
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        self.limiter.stats().expect("read counters")
    }
}

/// Runs `frame` once through `program`; returns the verdict and the frame as the program
/// left it (a reply it wrote over the frame, for `XDP_TX`).
pub fn run_frame_out(
    program: &aya::programs::Xdp,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
    let mut out = vec![0u8; frame.len().max(64) + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// XDP_TX: sent back out of the interface it came in on.
pub const XDP_TX: u32 = 3;

/// Runs `frame` once through `program` with `BPF_PROG_TEST_RUN`; returns the verdict.
pub fn run_frame(
    program: &aya::programs::Xdp,
    frame: &[u8],
) -> Result<u32, aya::programs::ProgramError> {
    run_frame_out(program, frame).map(|(verdict, _)| verdict)
}

/// Fails loudly (never skips) when not root: on the machines this project targets every
/// privileged test must run.
pub fn require_root() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the privileged tests need root (CAP_BPF, CAP_NET_ADMIN): run them through `cargo xtask test` as root"
        );
    });
}
