//! Keeping the control socket answerable when someone opens connections and sends nothing.
//!
//! Every member of the read group can connect. Connections that have not sent their request
//! yet are "idle"; when the table is full, the oldest idle connection is closed to make room
//! for the new one, so a legitimate command (which sends its request at once) is served even
//! behind thousands of idle connections, and the daemon never runs out of file descriptors.
//! Connections whose request is being carried out are never shed; when every slot is busy
//! carrying out requests, the new connection is refused.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

/// At most this many control connections are open at once.
pub const MAX_CONNECTIONS: usize = 128;

/// What to do with a connection just accepted.
#[derive(Debug)]
pub enum Admission {
    /// Serve it. `closed` fires if it is shed before it sends its request.
    Serve {
        /// Its id in the table.
        id: u64,
        /// Fires when the connection must close.
        closed: oneshot::Receiver<()>,
    },
    /// Every slot is carrying out a request: close it at once.
    Refuse,
}

/// The open control connections.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    next_id: u64,
    /// Connections waiting for their request, oldest first (ids only grow).
    idle: BTreeMap<u64, oneshot::Sender<()>>,
    /// Connections whose request is being carried out.
    busy: usize,
    /// Connections shed or refused since the last [`Connections::take_shed`].
    shed: u64,
}

impl Connections {
    /// A table of at most `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            next_id: 0,
            idle: BTreeMap::new(),
            busy: 0,
            shed: 0,
        }
    }

    /// Admits a new connection, shedding the oldest idle one when the table is full.
    pub fn admit(&mut self) -> Admission {
        if self.idle.len() + self.busy >= self.max {
            match self.idle.pop_first() {
                // A closed receiver means the connection already went; either way its
                // slot is free now.
                Some((_, oldest)) => {
                    let _ = oldest.send(());
                    self.shed += 1;
                }
                None => {
                    self.shed += 1;
                    return Admission::Refuse;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.idle.insert(id, tx);
        Admission::Serve { id, closed: rx }
    }

    /// The connection sent its request: it can no longer be shed. False when it was shed
    /// already (its slot was given away), in which case it must not be served.
    pub fn start_request(&mut self, id: u64) -> bool {
        if self.idle.remove(&id).is_some() {
            self.busy += 1;
            true
        } else {
            false
        }
    }

    /// The connection is finished; `had_request` says whether [`Self::start_request`] took it.
    pub fn finish(&mut self, id: u64, had_request: bool) {
        if had_request {
            self.busy = self.busy.saturating_sub(1);
        } else {
            self.idle.remove(&id);
        }
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.idle.len() + self.busy
    }

    /// How many were shed or refused since the last call.
    pub fn take_shed(&mut self) -> u64 {
        std::mem::take(&mut self.shed)
    }
}

/// Accept errors are logged at most once per this many seconds; the rest are counted.
pub const ACCEPT_ERROR_LOG_SECONDS: u64 = 10;

/// The pause after a failed `accept`, doubling from 10 ms up to 1 s while failures go on:
/// the usual failure is running out of file descriptors, and retrying at once only spins.
pub fn accept_backoff(consecutive_failures: u32) -> std::time::Duration {
    let ms = 10u64.saturating_mul(1 << consecutive_failures.min(7));
    std::time::Duration::from_millis(ms.min(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(c: &mut Connections) -> (u64, oneshot::Receiver<()>) {
        match c.admit() {
            Admission::Serve { id, closed } => (id, closed),
            Admission::Refuse => panic!("refused"),
        }
    }

    #[test]
    fn idle_connections_are_shed_oldest_first_and_busy_ones_never() {
        let mut c = Connections::new(3);
        let (a, mut a_closed) = serve(&mut c);
        let (b, mut b_closed) = serve(&mut c);
        let (busy, _) = serve(&mut c);
        assert!(c.start_request(busy));
        assert_eq!(c.open(), 3);

        // Full: the new one sheds the oldest idle connection, a.
        let (d, _) = serve(&mut c);
        assert!(a_closed.try_recv().is_ok(), "a was told to close");
        assert!(b_closed.try_recv().is_err(), "b was not");
        assert!(!c.start_request(a), "a shed connection is not served");
        c.finish(a, false);
        assert_eq!(c.open(), 3);

        // Then b, then d; the busy one stays.
        let (_e, _) = serve(&mut c);
        assert!(b_closed.try_recv().is_ok());
        c.finish(b, false);
        assert!(c.start_request(d));
        assert_eq!(c.take_shed(), 2);

        // All three busy: the next is refused.
        let mut full = Connections::new(1);
        let (only, _) = serve(&mut full);
        assert!(full.start_request(only));
        assert!(matches!(full.admit(), Admission::Refuse));
        full.finish(only, true);
        assert_eq!(full.open(), 0);
        assert!(matches!(full.admit(), Admission::Serve { .. }));
    }

    #[test]
    fn a_thousand_idle_connections_keep_the_table_bounded() {
        let mut c = Connections::new(MAX_CONNECTIONS);
        let mut receivers = Vec::new();
        for _ in 0..1_000 {
            receivers.push(serve(&mut c));
        }
        assert_eq!(c.open(), MAX_CONNECTIONS);
        let (newest, _) = serve(&mut c);
        assert!(c.start_request(newest), "the newest is served");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(accept_backoff(0).as_millis(), 10);
        assert_eq!(accept_backoff(1).as_millis(), 20);
        assert_eq!(accept_backoff(30).as_millis(), 1_000);
    }
}
