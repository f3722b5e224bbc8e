//! Whether each interface has our program, and what to do when it has not.
//!
//! An XDP link dies with its interface: after `ip link del` and a new interface of the same
//! name, the pinned link and its program id still look fine, but nothing filters the new
//! interface. The daemon therefore listens to the kernel's link events (rtnetlink) and, on
//! every event, compares what the kernel reports for each configured interface with what it
//! attached: [`decide`] says what to do, and the daemon does it.

use futures_util::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use netlink_packet_route::link::{LinkAttribute, LinkXdp};
use netlink_sys::AsyncSocket as _;

/// What is known about one configured interface at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The interface index the name has now; `None` when no such interface exists.
    pub current_ifindex: Option<u32>,
    /// The index we attached to; `None` when we have no live attachment.
    pub attached_ifindex: Option<u32>,
    /// The XDP program the kernel reports on the current interface.
    pub kernel_program: Option<u32>,
    /// Our loaded program.
    pub our_program: Option<u32>,
}

/// What to do about one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Our program filters the interface; nothing to do.
    Keep,
    /// Still no interface of that name: stay unattached (and unhealthy).
    StayAbsent,
    /// The interface we were attached to is gone: record it (nothing filters it now).
    Lost,
    /// The interface exists without our program (new, recreated, or attached elsewhere):
    /// attach to it, reusing the pinned maps.
    Attach {
        /// Its index.
        ifindex: u32,
    },
}

/// Decides what to do about one interface. Pure: the daemon acts on the answer.
pub fn decide(o: Observed) -> Step {
    match o.current_ifindex {
        None if o.attached_ifindex.is_some() => Step::Lost,
        None => Step::StayAbsent,
        Some(index) => {
            let ours = o.our_program.is_some() && o.kernel_program == o.our_program;
            if o.attached_ifindex == Some(index) && ours {
                Step::Keep
            } else {
                Step::Attach { ifindex: index }
            }
        }
    }
}

/// Why the link events could not be followed.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The netlink socket failed.
    #[error("rtnetlink: {0}")]
    Netlink(String),
}

/// A netlink connection subscribed to link events: a handle for queries and the stream of
/// events (each one only a prompt to look again: the decision reads the current state).
pub fn link_events() -> Result<(rtnetlink::Handle, BoxStream<'static, ()>), GateError> {
    let (mut connection, handle, messages) =
        rtnetlink::new_connection().map_err(|e| GateError::Netlink(e.to_string()))?;
    let groups = netlink_sys::SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK);
    connection
        .socket_mut()
        .socket_mut()
        .bind(&groups)
        .map_err(|e| GateError::Netlink(format!("subscribing to link events: {e}")))?;
    tokio::spawn(connection);
    Ok((handle, messages.map(drop).boxed()))
}

/// The XDP program the kernel reports on interface `ifindex` (RTM_GETLINK, IFLA_XDP).
pub async fn kernel_program(handle: &rtnetlink::Handle, ifindex: u32) -> Option<u32> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    let message = links.try_next().await.ok().flatten()?;
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        })
}

/// The index an interface name has in this network namespace now.
pub fn current_ifindex(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: Option<u32> = Some(41);

    fn observed(current: Option<u32>, attached: Option<u32>, kernel: Option<u32>) -> Observed {
        Observed {
            current_ifindex: current,
            attached_ifindex: attached,
            kernel_program: kernel,
            our_program: OURS,
        }
    }

    #[test]
    fn every_case_of_an_interface() {
        let table = [
            // attached and the kernel agrees
            (observed(Some(5), Some(5), OURS), Step::Keep),
            // deleted
            (observed(None, Some(5), None), Step::Lost),
            // still absent
            (observed(None, None, None), Step::StayAbsent),
            // recreated under the same name: new index, no program
            (
                observed(Some(9), Some(5), None),
                Step::Attach { ifindex: 9 },
            ),
            // appeared (absent at start, or after Lost)
            (observed(Some(9), None, None), Step::Attach { ifindex: 9 }),
            // same index, but the kernel reports no program or another one
            (
                observed(Some(5), Some(5), None),
                Step::Attach { ifindex: 5 },
            ),
            (
                observed(Some(5), Some(5), Some(7)),
                Step::Attach { ifindex: 5 },
            ),
        ];
        for (o, step) in table {
            assert_eq!(decide(o), step, "{o:?}");
        }
        let unloaded = Observed {
            our_program: None,
            ..observed(Some(5), Some(5), None)
        };
        assert_eq!(
            decide(unloaded),
            Step::Attach { ifindex: 5 },
            "no program of ours is never Keep"
        );
    }
}
