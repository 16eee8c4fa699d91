//! A ticket: one copy-pasteable string with everything a client needs to dial a server.
//!
//! Format: `p2pusb1:<endpoint id>[@<hint>[,<hint>...]]`, each hint a socket address or, once,
//! the server's relay as `https://...`. The endpoint id authenticates the server (TLS proves
//! the peer holds its key); the addresses are hints for reaching it directly, and the relay is
//! where it can always be reached (behind NAT, before hole punching succeeds). The format
//! stays shell-safe: no quoting needed.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use iroh::{EndpointAddr, EndpointId, RelayUrl};

use crate::relay::{RelayUrlError, parse_relay_url};

const PREFIX: &str = "p2pusb1:";
/// The most address hints a ticket may carry.
pub const MAX_ADDRS: usize = 16;

/// A server's id and the addresses it can be reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The server's endpoint id.
    pub id: EndpointId,
    /// Direct addresses to try.
    pub addrs: Vec<SocketAddr>,
    /// The server's home relay, if it uses one.
    pub relay: Option<RelayUrl>,
}

impl Ticket {
    /// The ticket for an endpoint's current address.
    pub fn from_addr(addr: &EndpointAddr) -> Ticket {
        Ticket {
            id: addr.id,
            addrs: addr.ip_addrs().copied().take(MAX_ADDRS).collect(),
            relay: addr.relay_urls().next().cloned(),
        }
    }

    /// The address iroh dials.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        let addr = self
            .addrs
            .iter()
            .fold(EndpointAddr::new(self.id), |a, ip| a.with_ip_addr(*ip));
        match &self.relay {
            Some(url) => addr.with_relay_url(url.clone()),
            None => addr,
        }
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.id)?;
        let relay = self.relay.iter().map(|url| url.to_string());
        let hints = self.addrs.iter().map(ToString::to_string).chain(relay);
        for (i, hint) in hints.enumerate() {
            f.write_str(if i == 0 { "@" } else { "," })?;
            f.write_str(&hint)?;
        }
        Ok(())
    }
}

/// Why a string is not a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Missing the `p2pusb1:` prefix.
    #[error("a ticket starts with `{PREFIX}`")]
    Prefix,
    /// The endpoint id does not parse.
    #[error("invalid endpoint id in ticket: {0}")]
    Id(String),
    /// An address does not parse.
    #[error("invalid address `{0}` in ticket")]
    Addr(String),
    /// More address hints than [`MAX_ADDRS`].
    #[error("a ticket carries at most {MAX_ADDRS} addresses")]
    TooManyAddrs,
    /// The relay hint is not a relay URL we take.
    #[error("invalid relay in ticket: {0}")]
    Relay(#[from] RelayUrlError),
    /// More than one relay hint.
    #[error("a ticket carries at most one relay")]
    TwoRelays,
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, TicketError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let (id, addrs) = rest.split_once('@').unwrap_or((rest, ""));
        let id = EndpointId::from_str(id).map_err(|e| TicketError::Id(e.to_string()))?;
        let mut ticket = Ticket {
            id,
            addrs: Vec::new(),
            relay: None,
        };
        for hint in addrs.split(',').filter(|a| !a.is_empty()) {
            if hint.contains("://") {
                if ticket.relay.is_some() {
                    return Err(TicketError::TwoRelays);
                }
                ticket.relay = Some(parse_relay_url(hint)?);
                continue;
            }
            if ticket.addrs.len() == MAX_ADDRS {
                return Err(TicketError::TooManyAddrs);
            }
            let addr = hint
                .parse()
                .map_err(|_| TicketError::Addr(hint.to_owned()))?;
            ticket.addrs.push(addr);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let id = iroh::SecretKey::generate().public();
        let ticket = Ticket {
            id,
            addrs: vec![
                "127.0.0.1:4000".parse().unwrap(),
                "[::1]:4001".parse().unwrap(),
            ],
            relay: None,
        };
        let text = ticket.to_string();
        assert!(text.starts_with("p2pusb1:"));
        assert_eq!(text.parse::<Ticket>().unwrap(), ticket);
        let bare = Ticket {
            id,
            addrs: vec![],
            relay: None,
        };
        assert_eq!(bare.to_string().parse::<Ticket>().unwrap(), bare);
        assert_eq!("nope".parse::<Ticket>(), Err(TicketError::Prefix));
        assert!(matches!(
            "p2pusb1:zz".parse::<Ticket>(),
            Err(TicketError::Id(_))
        ));
        assert!(matches!(
            format!("p2pusb1:{id}@nowhere").parse::<Ticket>(),
            Err(TicketError::Addr(_))
        ));
    }

    #[test]
    fn a_relay_rides_along_and_bad_ones_name_the_field() {
        let id = iroh::SecretKey::generate().public();
        let relay = parse_relay_url("https://relay.example.org:8443/").unwrap();
        let ticket = Ticket {
            id,
            addrs: vec!["10.0.0.2:4000".parse().unwrap()],
            relay: Some(relay.clone()),
        };
        let text = ticket.to_string();
        assert_eq!(
            text,
            format!("p2pusb1:{id}@10.0.0.2:4000,https://relay.example.org:8443/")
        );
        assert_eq!(text.parse::<Ticket>().unwrap(), ticket);
        let only_relay = Ticket {
            id,
            addrs: vec![],
            relay: Some(relay),
        };
        assert_eq!(
            only_relay.to_string().parse::<Ticket>().unwrap(),
            only_relay
        );
        assert!(ticket.endpoint_addr().relay_urls().next().is_some());
        for (bad, why) in [
            ("http://relay.example.org", "https://"),
            ("https://u:p@relay.example.org", "host"),
            ("https://", "parse"),
        ] {
            let e = format!("p2pusb1:{id}@{bad}").parse::<Ticket>().unwrap_err();
            assert!(matches!(e, TicketError::Relay(_)), "{bad}: {e}");
            let text = e.to_string();
            assert!(text.contains("relay") && text.contains(why), "{text}");
        }
        assert_eq!(
            format!("p2pusb1:{id}@https://a.example,https://b.example").parse::<Ticket>(),
            Err(TicketError::TwoRelays)
        );
    }
}
