//! A ticket: one copy-pasteable string with everything a client needs to dial a server.
//!
//! Format: `p2pusb1:<endpoint id>[@<socket addr>[,<socket addr>...]]`. The endpoint id
//! authenticates the server (TLS proves the peer holds its key); the addresses are hints for
//! reaching it directly.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use iroh::{EndpointAddr, EndpointId};

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
}

impl Ticket {
    /// The ticket for an endpoint's current address.
    pub fn from_addr(addr: &EndpointAddr) -> Ticket {
        Ticket {
            id: addr.id,
            addrs: addr.ip_addrs().copied().take(MAX_ADDRS).collect(),
        }
    }

    /// The address iroh dials.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        self.addrs
            .iter()
            .fold(EndpointAddr::new(self.id), |a, ip| a.with_ip_addr(*ip))
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.id)?;
        for (i, addr) in self.addrs.iter().enumerate() {
            f.write_str(if i == 0 { "@" } else { "," })?;
            write!(f, "{addr}")?;
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
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, TicketError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let (id, addrs) = rest.split_once('@').unwrap_or((rest, ""));
        let id = EndpointId::from_str(id).map_err(|e| TicketError::Id(e.to_string()))?;
        let addrs = addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| a.parse().map_err(|_| TicketError::Addr(a.to_owned())))
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        if addrs.len() > MAX_ADDRS {
            return Err(TicketError::TooManyAddrs);
        }
        Ok(Ticket { id, addrs })
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
        };
        let text = ticket.to_string();
        assert!(text.starts_with("p2pusb1:"));
        assert_eq!(text.parse::<Ticket>().unwrap(), ticket);
        let bare = Ticket { id, addrs: vec![] };
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
}
