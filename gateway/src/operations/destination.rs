//! Where a webhook may go (SSRF guard): only public unicast addresses, checked when a callback URL
//! is accepted and again at connect time, unless `GATEWAY_CALLBACK_ALLOW_PRIVATE` says otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a callback URL's destination is refused.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    // The texts reach clients: they name the rule that failed, never what a name resolves to.
    #[error("its host does not resolve")]
    Unresolvable(#[source] std::io::Error),
    #[error("it has no host")]
    NoHost,
    #[error("it leads to an address that is not public (GATEWAY_CALLBACK_ALLOW_PRIVATE)")]
    NonPublic(IpAddr),
    #[error("its host resolves to no address")]
    NoAddress,
}

/// IPv4 blocks a webhook must not reach: every block of the IANA IPv4 Special-Purpose Address
/// Registry (https://www.iana.org/assignments/iana-ipv4-special-registry/) that is not globally
/// reachable, or is reserved, plus multicast (224.0.0.0/4). Hand-written: std's `is_global` is
/// unstable and no maintained crate carries the registry.
const NON_PUBLIC_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network"
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // shared address space (CGNAT)
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local (cloud metadata)
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
    (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast (deprecated)
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, and the limited broadcast address
];

/// IPv6 blocks a webhook must not reach, from the IANA IPv6 Special-Purpose Address Registry
/// (https://www.iana.org/assignments/iana-ipv6-special-registry/), plus multicast and the
/// deprecated site-local block. Blocks that embed an IPv4 address (mapped, NAT64, 6to4, Teredo)
/// are refused whole: they can lead to any IPv4 address, private ones included.
const NON_PUBLIC_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96), // unspecified, loopback, IPv4-compatible
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96), // IPv4-mapped
    (Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96), // IPv4-translated
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard-only
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF protocol assignments, Teredo
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16), // 6to4
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20), // documentation
    (Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16), // segment routing SIDs
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // unique local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10), // site-local (deprecated)
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
];

/// Addresses a webhook must never reach unless `GATEWAY_CALLBACK_ALLOW_PRIVATE` says so (SSRF):
/// anything in a special-purpose block (see [`NON_PUBLIC_V4`], [`NON_PUBLIC_V6`]).
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => NON_PUBLIC_V4.iter().any(|&(net, bits)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(v4) & mask == u32::from(net) & mask
        }),
        IpAddr::V6(v6) => NON_PUBLIC_V6.iter().any(|&(net, bits)| {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(v6) & mask == u128::from(net) & mask
        }),
    }
}

/// Checks where a callback URL leads: its host (an IP literal, or every address its name
/// resolves to now) must be public, unless private destinations are allowed. Deliveries check
/// again at connect time (see [`PublicOnly`]), so a name that later resolves elsewhere (DNS
/// rebinding) still cannot reach a private address.
pub async fn check_destination(
    url: &reqwest::Url,
    allow_private: bool,
) -> Result<(), DestinationError> {
    if allow_private {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .map_err(DestinationError::Unresolvable)?
            .collect(),
        None => return Err(DestinationError::NoHost),
    };
    match addrs.iter().find(|a| is_non_public(a.ip())) {
        Some(addr) => Err(DestinationError::NonPublic(addr.ip())),
        None if addrs.is_empty() => Err(DestinationError::NoAddress),
        None => Ok(()),
    }
}

/// A DNS resolver for deliveries that drops non-public addresses, so the address connected to is
/// one that was checked.
pub(crate) struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_non_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "::a00:1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002:a00:1::1",
            "3fff::1",
            "5f00::1",
            "fec0::1",
            "ff02::1",
            "192.0.0.170",
            "192.88.99.1",
            "198.19.255.255",
            "203.0.113.7",
            "240.0.0.1",
        ] {
            assert!(is_non_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.1.1",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_non_public(public.parse().unwrap()), "{public}");
        }
    }
}
