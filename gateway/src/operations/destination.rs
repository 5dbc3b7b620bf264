//! Where a webhook may go (SSRF guard): only public unicast addresses, checked when a callback URL
//! is accepted and again at connect time, unless `GATEWAY_CALLBACK_ALLOW_PRIVATE` says otherwise.

use std::net::{IpAddr, SocketAddr};

/// Why a callback URL's destination is refused.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("its host does not resolve ({0})")]
    Unresolvable(#[source] std::io::Error),
    #[error("it has no host")]
    NoHost,
    #[error("it leads to {0}, which is not a public address (GATEWAY_CALLBACK_ALLOW_PRIVATE)")]
    NonPublic(IpAddr),
    #[error("its host resolves to no address")]
    NoAddress,
}

/// Addresses a webhook must never reach unless `GATEWAY_CALLBACK_ALLOW_PRIVATE` says so (SSRF):
/// anything that is not a public unicast address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || first == 0x0064 && v6.segments()[1] == 0xff9b // NAT64, may map to private v4
        }
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
            "64:ff9b::a00:1",
        ] {
            assert!(is_non_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "172.32.0.1",
        ] {
            assert!(!is_non_public(public.parse().unwrap()), "{public}");
        }
    }
}
