//! The sock_ops program: the kernel's TCP tells us which sources completed a real handshake
//! and which flows are established, so the XDP program can judge what a client does rather
//! than what it acknowledges. Attached to the cgroup v2 root, it sees the sockets of every
//! network namespace, and records only those of the namespace named in `CONFIG`.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use limiter_common::{
    layout::{Config, FlowKey, FlowState, ProvenKey},
    prefix::{FAMILY_IPV4, FAMILY_IPV6, normalize_mapped},
};

use crate::{
    clock,
    maps::{CONFIG, FLOWS, PROVEN},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// A sock_ops program must answer 1; the value is not a verdict on the connection.
const CONTINUE: u32 = 1;

#[sock_ops]
pub fn limiter_sessions(ctx: SockOpsContext) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        return CONTINUE;
    };
    if config.netns_cookie == 0 || !config.has(Config::FLAG_SESSIONS) {
        return CONTINUE;
    }
    // SAFETY: the context pointer is the program's own argument.
    if unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != config.netns_cookie {
        return CONTINUE;
    }
    let op = ctx.op();
    let Some(flow) = flow_of(&ctx) else {
        return CONTINUE;
    };
    match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            record_proven(config, &flow);
            record_flow(&ctx, &flow);
        }
        // The host's own outbound connections: their answers are no client's budget either,
        // but their peers proved nothing about being clients.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_flow(&ctx, &flow),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = FLOWS.remove(flow);
        }
        _ => {}
    }
    CONTINUE
}

/// The socket's flow as XDP sees its packets arrive.
#[inline(always)]
fn flow_of(ctx: &SockOpsContext) -> Option<FlowKey> {
    let (family, remote, local) = match ctx.family() {
        AF_INET => (
            FAMILY_IPV4,
            [ctx.remote_ip4(), 0, 0, 0],
            [ctx.local_ip4(), 0, 0, 0],
        ),
        AF_INET6 => {
            // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`.
            let (family, remote) = normalize_mapped(FAMILY_IPV6, ctx.remote_ip6());
            let (_, local) = normalize_mapped(FAMILY_IPV6, ctx.local_ip6());
            (family, remote, local)
        }
        _ => return None,
    };
    Some(FlowKey {
        remote,
        local,
        // The kernel keeps the remote port in network order in the upper half of the word,
        // the local port in host order.
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        local_port: ctx.local_port() as u16,
        family,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn record_flow(ctx: &SockOpsContext, flow: &FlowKey) {
    let _ = FLOWS.insert(flow, FlowState::default(), 0);
    // Ask for state changes, to forget the flow when it closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn record_proven(config: &Config, flow: &FlowKey) {
    let _ = PROVEN.insert(
        ProvenKey::new(config, flow.family, &flow.remote),
        clock::now(),
        0,
    );
}
