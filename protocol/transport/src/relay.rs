//! Which relays an endpoint uses, and the checks a relay URL or certificate passes first.
//!
//! A relay carries a connection's packets until the two peers reach each other directly (and
//! for good when their NATs never let them); it also tells each peer the address it is seen
//! from, which hole punching needs. Users pick none, n0's public ones, or their own. Their own
//! comes from a config file, a flag or a server's ticket, all untrusted text: one parser here
//! refuses anything that is not a plain `https://host[:port][/path]` before iroh sees it.

use std::path::{Path, PathBuf};

use iroh::RelayUrl;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The longest relay URL taken (a ticket carries it, so it is bounded).
pub const MAX_RELAY_URL: usize = 256;
/// The most certificates a relay CA file may hold.
const MAX_CA_CERTS: usize = 16;
/// The largest relay CA file read.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// What `--relay=off` (or `P2P_USB_RELAY=off`) says: no relay of our own, no discovery.
pub const OFF_FLAG: &str = "off";

/// The relays an endpoint uses to reach peers it cannot reach directly, and whether it uses
/// n0's discovery to find them by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relays {
    /// n0's public relays and its DNS discovery: our endpoint id and home relay published,
    /// peers looked up by theirs, so a ticket whose addresses went stale still connects.
    pub public: bool,
    /// Relays users run: ours (a server's first one is its home, which the ticket names) and
    /// those servers' tickets name.
    pub own: Vec<RelayUrl>,
    /// Certificates to trust besides the web's roots, for a self-signed or private-CA relay.
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

impl Default for Relays {
    /// n0's public relays and discovery: what a peer behind a home router needs, untouched.
    fn default() -> Self {
        Relays::public()
    }
}

impl Relays {
    /// None, and no discovery: direct addresses only (a LAN, every test).
    pub const OFF: Relays = Relays {
        public: false,
        own: Vec::new(),
        ca: None,
    };

    /// n0's public relays and discovery.
    pub fn public() -> Relays {
        Relays {
            public: true,
            ..Relays::OFF
        }
    }

    /// The user's own relay.
    pub fn own(url: RelayUrl) -> Relays {
        Relays {
            own: vec![url],
            ..Relays::OFF
        }
    }

    /// No relay and no discovery at all.
    pub fn is_off(&self) -> bool {
        !self.public && self.own.is_empty()
    }

    /// These relays, plus `url` (a server's, from its ticket) if it is not among them, so a
    /// client reaches a server through the relay the server is at whatever its own setting.
    pub fn with(mut self, url: Option<&RelayUrl>) -> Relays {
        let Some(url) = url else {
            return self;
        };
        let known = self.own.contains(url) || (self.public && is_public_relay(url));
        if !known {
            self.own.push(url.clone());
        }
        self
    }
}

/// Whether `url` is one of n0's public relays (production or staging).
pub fn is_public_relay(url: &RelayUrl) -> bool {
    iroh::defaults::prod::default_relay_map().contains(url)
        || iroh::defaults::staging::default_relay_map().contains(url)
}

/// The `relay` key of either config file: `true` (the default) for n0's public relays and
/// discovery, `false` for none, or the URL of the user's own relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelaySetting {
    /// `relay = true` / `false`.
    Public(bool),
    /// `relay = "https://..."`, checked as it loads so the error points at its line.
    Url(RelayUrl),
}

impl Default for RelaySetting {
    fn default() -> Self {
        RelaySetting::Public(true)
    }
}

impl<'de> serde::Deserialize<'de> for RelaySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RelaySetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a relay URL (\"https://...\")")
            }
            fn visit_bool<E>(self, v: bool) -> Result<RelaySetting, E> {
                Ok(RelaySetting::Public(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RelaySetting, E> {
                parse_relay_url(v).map(RelaySetting::Url).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What `--relay` takes with no URL: n0's public relays.
pub const PUBLIC_FLAG: &str = "public";

/// Why the relay settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    /// A relay URL refused; `field` says where it came from.
    #[error("{field}: {source}")]
    Url {
        /// `--relay` or the config key.
        field: &'static str,
        /// Why.
        source: RelayUrlError,
    },
    /// The relay CA could not be read.
    #[error("relay_ca: {0}")]
    Ca(#[from] RelayCaError),
}

/// The relay flags, the same in both daemons: a server and its clients must agree on what
/// `--relay` means.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RelayArgs {
    /// Reach peers behind NAT through relays: `--relay` for n0's public ones and their
    /// discovery, `--relay=https://HOST[:PORT]` for your own, `--relay=off` for direct
    /// addresses only (a LAN) [default: the config's relay, else n0's public ones]. A server's
    /// ticket carries its relay, and a client dialling it adds that one.
    #[arg(global = true, long, value_name = "URL", num_args = 0..=1, require_equals = true,
          default_missing_value = PUBLIC_FLAG, env = "P2P_USB_RELAY")]
    pub relay: Option<String>,
    /// PEM certificates to trust for your own relay (one with a self-signed certificate)
    /// [default: the config's relay_ca].
    #[arg(global = true, long, value_name = "PEM")]
    pub relay_ca: Option<std::path::PathBuf>,
}

impl RelayArgs {
    /// The relays these flags ask for, the config's `relay` and `relay_ca` where they say
    /// nothing.
    pub fn relays(
        &self,
        config: &RelaySetting,
        config_ca: Option<&Path>,
    ) -> Result<Relays, RelayConfigError> {
        relays_from(
            self.relay.as_deref(),
            config,
            self.relay_ca.as_deref().or(config_ca),
        )
    }
}

/// The relays the flags and the config ask for: `flag` is `--relay`'s value ([`PUBLIC_FLAG`]
/// when given bare, [`OFF_FLAG`] for none), `ca` the relay CA file from the flag or the config,
/// trusted besides the web's roots (so also for the relays servers' tickets name).
pub fn relays_from(
    flag: Option<&str>,
    config: &RelaySetting,
    ca: Option<&Path>,
) -> Result<Relays, RelayConfigError> {
    let own = |field, text: &str| {
        parse_relay_url(text).map_err(|source| RelayConfigError::Url { field, source })
    };
    let mut relays = match (flag.map(str::trim), config) {
        (Some(PUBLIC_FLAG), _) => Relays::public(),
        (Some(OFF_FLAG), _) => Relays::OFF,
        (Some(url), _) => Relays::own(own("--relay", url)?),
        (None, RelaySetting::Public(true)) => Relays::public(),
        (None, RelaySetting::Public(false)) => Relays::OFF,
        (None, RelaySetting::Url(url)) => Relays::own(url.clone()),
    };
    if let Some(path) = ca {
        relays.ca = Some(load_relay_ca(path)?);
    }
    Ok(relays)
}

/// Why a relay URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayUrlError {
    /// Not a URL at all.
    #[error("relay URL `{0}` does not parse: {1}")]
    Malformed(String, String),
    /// Not `https`: a relay speaks TLS, and a plain-text one would be a downgrade.
    #[error("relay URL `{0}` must start with https://")]
    NotHttps(String),
    /// A user name, password, query or fragment, or a comma (the ticket's separator).
    #[error("relay URL `{0}` may hold only a host, a port and a path")]
    Extra(String),
    /// Longer than [`MAX_RELAY_URL`].
    #[error("a relay URL is at most {MAX_RELAY_URL} bytes")]
    TooLong,
}

/// Parses a relay URL from a user, a config file or a ticket.
pub fn parse_relay_url(text: &str) -> Result<RelayUrl, RelayUrlError> {
    let text = text.trim();
    if text.len() > MAX_RELAY_URL {
        return Err(RelayUrlError::TooLong);
    }
    let url: RelayUrl = text.parse().map_err(|e: iroh::RelayUrlParseError| {
        RelayUrlError::Malformed(text.to_owned(), e.to_string())
    })?;
    if url.scheme() != "https" {
        return Err(RelayUrlError::NotHttps(text.to_owned()));
    }
    let extra = !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || url.host_str().is_none_or(str::is_empty)
        || text.contains(',');
    if extra {
        return Err(RelayUrlError::Extra(text.to_owned()));
    }
    Ok(url)
}

/// Why a relay CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RelayCaError {
    /// It could not be read.
    #[error("reading relay CA {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Larger than a certificate file ever is.
    #[error("relay CA {0} is larger than {MAX_CA_FILE} bytes")]
    TooLarge(PathBuf),
    /// Not PEM certificates.
    #[error("relay CA {0} holds no PEM certificate{1}")]
    NoCertificate(PathBuf, String),
    /// More certificates than anyone needs.
    #[error("relay CA {0} holds more than {MAX_CA_CERTS} certificates")]
    TooMany(PathBuf),
}

/// Reads the PEM certificates to trust for a self-hosted relay.
pub fn load_relay_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, RelayCaError> {
    let read = |e| RelayCaError::Read(path.to_owned(), e);
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_CA_FILE {
        return Err(RelayCaError::TooLarge(path.to_owned()));
    }
    let pem = std::fs::read(path).map_err(read)?;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| RelayCaError::NoCertificate(path.to_owned(), format!(": {e}")))?;
        if certs.len() == MAX_CA_CERTS {
            return Err(RelayCaError::TooMany(path.to_owned()));
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(RelayCaError::NoCertificate(path.to_owned(), String::new()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_https_relay_urls_pass() {
        for ok in [
            "https://relay.example.org",
            "https://relay.example.org:8443/",
            "https://10.0.0.1:3340",
            " https://[fd00::1]:443/relay ",
        ] {
            assert!(parse_relay_url(ok).is_ok(), "{ok}");
        }
        let err = |s: &str| parse_relay_url(s).unwrap_err();
        assert!(matches!(
            err("relay.example.org"),
            RelayUrlError::Malformed(..)
        ));
        assert!(matches!(err("https://"), RelayUrlError::Malformed(..)));
        assert!(matches!(
            err("http://relay.example.org"),
            RelayUrlError::NotHttps(_)
        ));
        assert!(matches!(
            err("ftp://relay.example.org"),
            RelayUrlError::NotHttps(_)
        ));
        for extra in [
            "https://user:pw@relay.example.org",
            "https://relay.example.org/?x=1",
            "https://relay.example.org/#frag",
            "https://relay.example.org/a,b",
        ] {
            assert!(matches!(err(extra), RelayUrlError::Extra(_)), "{extra}");
        }
        let long = format!("https://{}.org", "a".repeat(MAX_RELAY_URL));
        assert_eq!(err(&long), RelayUrlError::TooLong);
        assert!(err("http://x").to_string().contains("https://"));
    }

    #[test]
    fn flags_win_over_the_config_and_bad_urls_name_their_field() {
        let url = RelaySetting::Url(parse_relay_url("https://relay.example.org").unwrap());
        assert_eq!(
            relays_from(None, &RelaySetting::default(), None).unwrap(),
            Relays::public()
        );
        assert_eq!(Relays::default(), Relays::public());
        assert_eq!(
            relays_from(None, &RelaySetting::Public(false), None).unwrap(),
            Relays::OFF
        );
        assert!(relays_from(Some(OFF_FLAG), &url, None).unwrap().is_off());
        assert!(
            relays_from(Some(OFF_FLAG), &RelaySetting::Public(true), None)
                .unwrap()
                .is_off()
        );
        assert_eq!(
            relays_from(Some(PUBLIC_FLAG), &url, None).unwrap(),
            Relays::public()
        );
        let mine = relays_from(None, &url, None).unwrap();
        assert!(!mine.public && mine.own.len() == 1 && mine.ca.is_none());
        let e = relays_from(Some("http://x.example"), &url, None).unwrap_err();
        assert!(e.to_string().starts_with("--relay: "), "{e}");
        let e = relays_from(None, &url, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_config_key_takes_a_bool_or_a_url() {
        #[derive(serde::Deserialize)]
        struct C {
            relay: RelaySetting,
        }
        let parse = |s: &str| serde_json::from_str::<C>(s).map(|c| c.relay);
        assert_eq!(
            parse(r#"{"relay": true}"#).unwrap(),
            RelaySetting::Public(true)
        );
        assert_eq!(
            parse(r#"{"relay": "https://r.example"}"#).unwrap(),
            RelaySetting::Url(parse_relay_url("https://r.example").unwrap())
        );
        let e = parse(r#"{"relay": "http://r.example"}"#).unwrap_err();
        assert!(e.to_string().contains("must start with https://"), "{e}");
        let e = parse(r#"{"relay": 3}"#).unwrap_err();
        assert!(e.to_string().contains("relay URL"), "{e}");
    }

    #[test]
    fn a_ticket_relay_joins_the_configured_ones_once() {
        let a = parse_relay_url("https://a.example").unwrap();
        let b = parse_relay_url("https://b.example").unwrap();
        assert_eq!(Relays::OFF.with(None), Relays::OFF);
        assert_eq!(Relays::OFF.with(Some(&a)), Relays::own(a.clone()));
        let own = Relays::own(a.clone());
        assert_eq!(own.clone().with(Some(&a)), own);
        assert_eq!(own.with(Some(&b)).own, vec![a, b.clone()]);
        // A public client follows a server at its own relay, and needs nothing more for a
        // server at one of n0's.
        assert_eq!(Relays::public().with(Some(&b)).own, vec![b]);
        let n0 = iroh::defaults::prod::default_relay_map().urls::<Vec<_>>()[0].clone();
        assert_eq!(Relays::public().with(Some(&n0)), Relays::public());
    }

    #[test]
    fn a_relay_ca_file_must_hold_pem_certificates() {
        let dir = std::env::temp_dir().join(format!("relay-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(
            load_relay_ca(&missing),
            Err(RelayCaError::Read(..))
        ));
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, b"not a certificate").unwrap();
        assert!(matches!(
            load_relay_ca(&junk),
            Err(RelayCaError::NoCertificate(..))
        ));
        let one = dir.join("one.pem");
        std::fs::write(
            &one,
            b"-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert_eq!(load_relay_ca(&one).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
