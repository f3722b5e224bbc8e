//! Running code inside a named network namespace.
//!
//! A network namespace belongs to a thread, not to a process: a thread that calls `setns`
//! makes every socket it creates from then on in that namespace, and a socket stays in the
//! namespace it was made in whichever thread uses it later. So the demo's clients and
//! attackers are threads that enter their namespace first, and the other threads of the
//! process stay in the root namespace.

use std::{fs::File, path::PathBuf, thread};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` mounts the namespace `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// Moves the calling thread into the namespace `name`.
pub fn enter(name: &str) -> Result<()> {
    let path = path(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    setns(file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter the network namespace {name}"))
}

/// Starts a thread named `thread_name` that enters `namespace` and then runs `work`.
pub fn spawn_in<T, F>(
    namespace: &str,
    thread_name: &str,
    work: F,
) -> Result<thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let namespace = namespace.to_owned();
    thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || {
            enter(&namespace)?;
            work()
        })
        .with_context(|| format!("start the thread {thread_name}"))
}

/// Runs `work` on a thread inside `namespace` and returns its result.
pub fn run_in<T, F>(namespace: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join(spawn_in(namespace, "netns-task", work)?)
}

/// Joins a thread started by [`spawn_in`], turning a panic into an error.
pub fn join<T>(handle: thread::JoinHandle<Result<T>>) -> Result<T> {
    let name = handle.thread().name().unwrap_or("worker").to_owned();
    handle
        .join()
        .map_err(|_| anyhow!("the thread {name} panicked"))?
}
