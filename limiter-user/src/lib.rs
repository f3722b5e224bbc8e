//! User space of the limiter: the [`Limiter`] that owns the loaded XDP program and its maps,
//! and the policy model that fills them.

pub mod allowlisted;
pub mod attacks;
pub mod audit;
pub mod challenge;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod explain;
pub mod fleet;
pub mod gate;
pub mod input;
pub mod limiter;
pub mod metrics;
pub mod ownership;
pub mod plan;
pub mod policy;
pub mod protocol;
pub mod runtime;
pub mod sessions;

pub use limiter::{Error, Limiter, LoadOptions, Stats};
pub use policy::{Class, CompiledPolicy, LimitSpec, Mode, Policy, PolicyError, Rate, Service};

/// The XDP program's object file, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "limiter";

/// The sock_ops program's name in the object file.
pub const SESSIONS_PROGRAM_NAME: &str = "limiter_sessions";

/// Reference programs for the benchmarks (bare drop, bare pass, parse only, traffic
/// generators), built by `build.rs` into their own object.
pub static BASELINES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baselines"));
