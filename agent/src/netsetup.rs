//! `initialize`: the link that holds the credential addresses, over netlink (like the
//! reference agent's init container): a dummy link `pod-id-link0` with 169.254.170.23/32 and
//! fd00:ec2::23/128, up, with a route to each address through it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec, RouteMessageBuilder};

use crate::config::{CREDENTIAL_V4, CREDENTIAL_V6};

/// The link the reference agent creates.
pub const LINK_NAME: &str = "pod-id-link0";

/// Why the credential link could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A route to the address already exists through another interface.
    #[error(
        "a route to {addr} already exists through interface index {existing}, not {LINK_NAME} \
         (index {ours}); remove that route and try again"
    )]
    ConflictingRoute {
        /// The credential address.
        addr: IpAddr,
        /// The interface the existing route uses.
        existing: u32,
        /// Our link's index.
        ours: u32,
    },
}

/// What `initialize` ended up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The link kind holding the addresses (`dummy`, or the fallback).
    pub kind: String,
    /// Addresses present on the link.
    pub addresses: Vec<IpAddr>,
    /// Addresses that could not be configured, with the reason (IPv6 unavailable).
    pub skipped: Vec<(IpAddr, String)>,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetSetupError {
    let what = what.into();
    move |source| NetSetupError::Netlink { what, source }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn connect() -> Result<Handle, NetSetupError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetSetupError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn find_link(handle: &Handle) -> Result<Option<LinkMessage>, NetSetupError> {
    match handle
        .link()
        .get()
        .match_name(LINK_NAME.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up {LINK_NAME}"))(e)),
    }
}

fn link_kind(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Creates (or reuses) the link, adds both addresses and their routes; idempotent.
pub async fn initialize() -> Result<Outcome, NetSetupError> {
    let handle = connect()?;
    let link = match find_link(&handle).await? {
        Some(link) => link,
        None => {
            if let Err(e) = handle
                .link()
                .add(LinkDummy::new(LINK_NAME).build())
                .execute()
                .await
            {
                if errno(&e) != Some(libc::EOPNOTSUPP) {
                    return Err(nl(format!("creating dummy link {LINK_NAME}"))(e));
                }
                // Kernels built without CONFIG_DUMMY: a port-less bridge holds addresses as well.
                tracing::warn!(
                    link = LINK_NAME,
                    "the kernel has no dummy link driver; using a bridge link instead"
                );
                handle
                    .link()
                    .add(LinkBridge::new(LINK_NAME).build())
                    .execute()
                    .await
                    .map_err(nl(format!("creating bridge link {LINK_NAME}")))?;
            }
            find_link(&handle)
                .await?
                .ok_or_else(|| NetSetupError::Netlink {
                    what: format!("{LINK_NAME} vanished after creation"),
                    source: rtnetlink::Error::RequestFailed,
                })?
        }
    };
    let index = link.header.index;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {LINK_NAME} up")))?;

    let (v4, v6) = (CREDENTIAL_V4, CREDENTIAL_V6);
    let mut outcome = Outcome {
        kind: link_kind(&link),
        addresses: Vec::new(),
        skipped: Vec::new(),
    };
    for addr in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        match add_address_and_route(&handle, index, addr).await {
            Ok(()) => outcome.addresses.push(addr),
            Err(e) if addr.is_ipv6() && ipv6_unavailable(&e) => {
                tracing::warn!(%addr, error = %e, "IPv6 is unavailable on this node; serving IPv4 only");
                outcome.skipped.push((addr, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(outcome)
}

fn ipv6_unavailable(e: &NetSetupError) -> bool {
    // EACCES: disable_ipv6 set on the link; EAFNOSUPPORT/EOPNOTSUPP: no IPv6 in the kernel.
    matches!(e, NetSetupError::Netlink { source, .. }
        if matches!(errno(source), Some(libc::EACCES | libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::EPERM)))
}

async fn add_address_and_route(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
) -> Result<(), NetSetupError> {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let mut req = handle.address().add(index, addr, prefix);
    // No duplicate address detection: the address must be usable at once.
    req.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    match req.execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(nl(format!("adding {addr}/{prefix} to {LINK_NAME}"))(e)),
    }
    if let Some(existing) = route_to(handle, addr).await? {
        return if existing == index {
            Ok(())
        } else {
            Err(NetSetupError::ConflictingRoute {
                addr,
                existing,
                ours: index,
            })
        };
    }
    let route = match addr {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, prefix)
            .output_interface(index)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, prefix)
            .output_interface(index)
            .build(),
    };
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(nl(format!("adding the route to {addr} via {LINK_NAME}")))
}

/// The output interface of a main-table route whose destination is exactly `addr`.
async fn route_to(handle: &Handle, addr: IpAddr) -> Result<Option<u32>, NetSetupError> {
    let filter = match addr {
        IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))?;
    let full = if addr.is_ipv4() { 32 } else { 128 };
    Ok(routes.iter().find_map(|r| {
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })?;
        (dst == addr && r.header.destination_prefix_length == full && r.header.table == 254).then(
            || {
                r.attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })
                    .unwrap_or(0)
            },
        )
    }))
}

/// Deletes the link (its addresses and routes go with it). Returns whether it existed.
pub async fn remove() -> Result<bool, NetSetupError> {
    let handle = connect()?;
    let Some(link) = find_link(&handle).await? else {
        return Ok(false);
    };
    handle
        .link()
        .del(link.header.index)
        .execute()
        .await
        .map_err(nl(format!("deleting {LINK_NAME}")))?;
    Ok(true)
}
