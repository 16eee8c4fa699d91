//! The server's TOML config file: what to share, with whom, behind which PIN, and how the
//! endpoint binds.
//!
//! An operator edits this file by hand (see `server/examples/server.toml`) or through
//! `p2p-usb-server share/unshare/allow/revoke`, which edit it in place and keep its comments.
//! A mistake must point at the exact spot: every error names the file, line and column and
//! says what was expected, because the person reading it is often on a headless Pi over SSH.

pub use protocol::select::{DeviceFacts, DeviceMatch, VidPid};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
pub use transport::daemon::ConfigError;

use iroh::EndpointId;
use protocol::wire::DeviceInfo;
use serde::{Deserialize, Deserializer};

/// The whole file. Every field is optional; an empty file is a valid config that shares
/// nothing and allows no one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server's secret key (its identity).
    pub key_file: Option<PathBuf>,
    /// Local addresses to listen on; empty means every interface, a random port.
    pub bind: Vec<SocketAddr>,
    /// How clients behind NAT reach us: `true` (the default) for n0's public relays and
    /// discovery, the URL of our own relay, or `false` for direct addresses only.
    pub relay: transport::relay::RelaySetting,
    /// PEM certificates to trust for our own relay (a self-signed one).
    pub relay_ca: Option<PathBuf>,
    /// The cipher to prefer: `"auto"` (the default: AES-GCM where the CPU has AES
    /// instructions, ChaCha20-Poly1305 where it does not), `"aes-gcm"` or `"chacha20"`.
    pub cipher: transport::cipher::CipherSetting,
    /// Ask the router for a port mapping (UPnP, PCP, NAT-PMP).
    pub port_mapping: bool,
    /// Release a silent client's devices after this long.
    pub idle_timeout_ms: Option<u64>,
    /// URBs in flight per endpoint.
    pub queue_depth: Option<QueueDepth>,
    /// Let any client that knows the ticket connect.
    pub allow_any: bool,
    /// Client endpoint ids allowed to connect.
    pub allow: Vec<ClientId>,
    /// Devices to share: a device is shared if any rule matches and no deny rule does.
    pub share: Vec<ShareRule>,
    /// Devices never to share, whatever `share` says.
    pub deny: Vec<DeviceMatch>,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::read(path, source))?;
        Config::parse(&text, path)
    }

    /// Reads `path`, or an empty config if it does not exist: a first run needs no file.
    pub fn load_or_default(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::read(path, source)),
        }
    }

    /// Parses `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            ConfigError::invalid(text, path, e.span().map_or(0, |s| s.start), e.message())
        })
    }

    /// The PIN a device needs, if a matching share rule sets one. The first matching rule
    /// with a PIN wins, so a specific rule listed first can guard one device of a class.
    pub fn pin_for(&self, device: &DeviceInfo) -> Option<&str> {
        let facts = DeviceFacts::from_wire(device);
        self.share
            .iter()
            .filter(|r| r.matcher.matches(&facts))
            .find_map(|r| r.pin.as_deref())
    }
}

/// URBs in flight per endpoint, 1 to 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth(pub u16);

impl<'de> Deserialize<'de> for QueueDepth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Depth;
        impl serde::de::Visitor<'_> for Depth {
            type Value = QueueDepth;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number of URBs in flight per endpoint, 1 to 1024")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<QueueDepth, E> {
                match u16::try_from(n) {
                    Ok(n @ 1..=1024) => Ok(QueueDepth(n)),
                    _ => Err(E::custom(format!(
                        "queue_depth is {n}; expected 1 to 1024 URBs in flight per endpoint"
                    ))),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<QueueDepth, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_i64(Depth)
    }
}

/// A client's endpoint id, as `p2p-usb-client id` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(pub EndpointId);

impl<'de> Deserialize<'de> for ClientId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EndpointId::from_str(s.trim()).map(ClientId).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not an endpoint id; expected the 64 hex characters `p2p-usb-client id` prints"
            ))
        })
    }
}

/// The rule a `--share`/`share`/`unshare` spec means (the grammar of [`protocol::select`]).
/// The client's old bare serial-or-product word is refused here: the server never took it, and
/// a rule written to the config file must say which one it means.
pub fn rule_from_spec(spec: &str) -> Result<DeviceMatch, String> {
    let parsed = DeviceMatch::parse(spec).map_err(|e| e.to_string())?;
    if let Some(word) = &parsed.matcher.serial_or_product {
        return Err(format!(
            "`{word}` names no device; write serial={word} or product={word}"
        ));
    }
    Ok(parsed.matcher)
}

/// One `[[share]]` rule: the devices it names, and the PIN a client must give to attach them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawShare")]
pub struct ShareRule {
    /// Which devices.
    pub matcher: DeviceMatch,
    /// Required PIN, if any.
    pub pin: Option<String>,
}

/// A `[[share]]` table: a rule's keys (as `protocol::select`'s table form) and a `pin`. Spelled
/// out rather than `#[serde(flatten)]`ed: flattening loses toml's spans, and errors would point
/// at the table instead of the bad value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    vid_pid: Option<VidPid>,
    serial: Option<String>,
    product: Option<String>,
    port: Option<String>,
    class: Option<u8>,
    #[serde(default)]
    all: bool,
    pin: Option<String>,
}

impl TryFrom<RawShare> for ShareRule {
    type Error = String;

    fn try_from(r: RawShare) -> Result<Self, String> {
        let matcher = DeviceMatch {
            vid_pid: r.vid_pid,
            serial: r.serial,
            product: r.product,
            port: r.port,
            class: r.class,
            serial_or_product: None,
            all: r.all,
        }
        .checked()
        .map_err(|e| e.to_string())?;
        if r.pin.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err("pin is empty; expected a non-empty string, or no pin key".into());
        }
        Ok(ShareRule {
            matcher,
            pin: r.pin,
        })
    }
}

/// Devices to offer: shared by some rule, denied by none.
#[derive(Debug, Clone, Default)]
pub struct SharePolicy {
    /// Rules that offer devices.
    pub share: Vec<DeviceMatch>,
    /// Rules that veto.
    pub deny: Vec<DeviceMatch>,
}

impl SharePolicy {
    /// Whether a device with these facts is offered.
    pub fn offers(&self, d: &DeviceFacts) -> bool {
        self.share.iter().any(|r| r.matches(d)) && !self.deny.iter().any(|r| r.matches(d))
    }
}

/// The commented header a new config file starts with.
pub const NEW_FILE_HEADER: &str = "\
# p2p-usb-server config. Edited by `p2p-usb-server share/unshare/allow/revoke`;
# a running server picks changes up on SIGHUP (`systemctl reload p2p-usb-server`).
# Every key is documented in server/examples/server.toml.
";

/// In-place edits that keep the operator's comments and layout.
pub mod edit {
    use std::path::Path;

    use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};
    use transport::daemon::read_for_edit;

    use super::{Config, ConfigError, DeviceMatch, NEW_FILE_HEADER};

    /// The document; a new file starts with the commented header above an `allow` list, so
    /// the header stays on top whatever is added later.
    fn open(path: &Path) -> Result<DocumentMut, ConfigError> {
        let text = read_for_edit(path, || format!("{NEW_FILE_HEADER}\nallow = []\n"))?;
        // Refuse to edit a file that does not load: the edit would hide the real mistake.
        Config::parse(&text, path)?;
        Ok(text
            .parse()
            .expect("a config that parsed is a TOML document"))
    }

    fn save(path: &Path, doc: &DocumentMut) -> Result<(), ConfigError> {
        let text = doc.to_string();
        Config::parse(&text, path)?;
        let write = |source| ConfigError::write(path, source);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        // Write then rename, so a running server never reads half a file.
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(write)
    }

    /// Adds a `[[share]]` rule; returns false if an identical rule is there already.
    pub fn share(path: &Path, rule: &DeviceMatch, pin: Option<&str>) -> Result<bool, ConfigError> {
        let config = Config::load_or_default(path)?;
        if config
            .share
            .iter()
            .any(|r| r.matcher == *rule && r.pin.as_deref() == pin)
        {
            return Ok(false);
        }
        let mut doc = open(path)?;
        let mut t = Table::new();
        if rule.all {
            t["all"] = value(true);
        }
        if let Some(v) = rule.vid_pid {
            t["vid_pid"] = value(v.to_string());
        }
        if let Some(s) = &rule.serial {
            t["serial"] = value(s.as_str());
        }
        if let Some(p) = &rule.product {
            t["product"] = value(p.as_str());
        }
        if let Some(p) = &rule.port {
            t["port"] = value(p.as_str());
        }
        if let Some(c) = rule.class {
            t["class"] = value(i64::from(c));
        }
        if let Some(p) = pin {
            t["pin"] = value(p);
        }
        match doc.get_mut("share") {
            Some(Item::ArrayOfTables(a)) => a.push(t),
            Some(_) => unreachable!("a config that parsed has [[share]] tables"),
            None => {
                let mut a = ArrayOfTables::new();
                a.push(t);
                doc.insert("share", Item::ArrayOfTables(a));
            }
        }
        save(path, &doc)?;
        Ok(true)
    }

    /// Removes every `[[share]]` rule naming exactly `rule`; returns how many.
    pub fn unshare(path: &Path, rule: &DeviceMatch) -> Result<usize, ConfigError> {
        let config = Config::load_or_default(path)?;
        let mut doc = open(path)?;
        let Some(Item::ArrayOfTables(a)) = doc.get_mut("share") else {
            return Ok(0);
        };
        let mut removed = 0;
        for (i, r) in config.share.iter().enumerate().rev() {
            if r.matcher == *rule {
                a.remove(i);
                removed += 1;
            }
        }
        if a.is_empty() {
            doc.remove("share");
        }
        if removed > 0 {
            save(path, &doc)?;
        }
        Ok(removed)
    }

    /// Adds `id` to `allow`; returns false if it is there already.
    pub fn allow(path: &Path, id: &str) -> Result<bool, ConfigError> {
        let mut doc = open(path)?;
        let list = doc
            .entry("allow")
            .or_insert_with(|| value(Array::new()))
            .as_array_mut()
            .expect("a config that parsed has an allow array");
        if list.iter().any(|v| v.as_str() == Some(id)) {
            return Ok(false);
        }
        list.push(id);
        save(path, &doc)?;
        Ok(true)
    }

    /// Removes `id` from `allow`; returns false if it was not there.
    pub fn revoke(path: &Path, id: &str) -> Result<bool, ConfigError> {
        let mut doc = open(path)?;
        let Some(list) = doc.get_mut("allow").and_then(Item::as_array_mut) else {
            return Ok(false);
        };
        let before = list.len();
        list.retain(|v| v.as_str() != Some(id));
        if list.len() == before {
            return Ok(false);
        }
        save(path, &doc)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("server.toml"))
            .expect_err(text)
            .to_string()
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/server.toml");
        let c = Config::load(&path).unwrap();
        assert!(!c.share.is_empty());
        assert!(!c.deny.is_empty());
        assert!(c.share.iter().any(|r| r.pin.is_some()));
    }

    #[test]
    fn an_empty_file_shares_nothing_and_allows_no_one() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert!(c.share.is_empty() && c.allow.is_empty() && !c.allow_any);
    }

    /// Every mistake names file, line and column, and says what was expected.
    #[test]
    fn every_error_points_at_its_line() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "relay = true\nbogus = 1\n",
                "server.toml:2:1:",
                "unknown field `bogus`",
            ),
            (
                "queue_depth = 0\n",
                "server.toml:1:15:",
                "expected 1 to 1024",
            ),
            (
                "queue_depth = 5000\n",
                "server.toml:1:15:",
                "expected 1 to 1024",
            ),
            ("queue_depth = \"deep\"\n", "server.toml:1:15:", "1 to 1024"),
            (
                "allow = [\"nope\"]\n",
                "server.toml:1:9:",
                "64 hex characters",
            ),
            (
                "relay = \"yes\"\n",
                "server.toml:1:9:",
                "relay URL `yes` does not parse",
            ),
            (
                "relay = 3\n",
                "server.toml:1:9:",
                "true, false or a relay URL",
            ),
            (
                "bind = [\"localhost\"]\n",
                "server.toml:1:9:",
                "socket address",
            ),
            (
                "\n[[share]]\nvid_pid = \"0781\"\n",
                "server.toml:3:11:",
                "four hex digits",
            ),
            (
                "[[share]]\nvid_pid = \"zzzz:0001\"\n",
                "server.toml:2:11:",
                "four hex digits",
            ),
            (
                "[[share]]\ncolour = 1\n",
                "server.toml:2:1:",
                "unknown field `colour`",
            ),
            (
                "[[share]]\npin = \"1\"\n",
                "server.toml:1:1:",
                "names no device",
            ),
            (
                "[[share]]\nall = true\nclass = 8\n",
                "server.toml:1:1:",
                "drop it",
            ),
            ("[[share]]\nclass = 300\n", "server.toml:2:9:", "u8"),
            (
                "[[share]]\nall = true\npin = \" \"\n",
                "server.toml:1:1:",
                "pin is empty",
            ),
            (
                "[[deny]]\nclass = 3\npin = \"1\"\n",
                "server.toml:3:1:",
                "unknown field `pin`",
            ),
            ("share = 3\n", "server.toml:1:9:", "sequence"),
            ("relay = \n", "server.toml:1:9:", "expected"),
        ];
        for (text, at, what) in cases {
            let e = err(text);
            assert!(e.starts_with(at), "{text:?}: {e}");
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }

    fn facts(vid: u16, pid: u16, port: &str, serial: Option<&str>, classes: &[u8]) -> DeviceFacts {
        DeviceFacts {
            vid_pid: VidPid {
                vendor: vid,
                product: pid,
            },
            port: port.into(),
            serial: serial.map(Into::into),
            product: None,
            classes: classes.to_vec(),
        }
    }

    #[test]
    fn rules_need_every_criterion_and_deny_wins() {
        let c = Config::parse(
            "[[share]]\nclass = 8\n[[share]]\nvid_pid = \"1234:5678\"\nserial = \"A1\"\npin = \"42\"\n\
             [[deny]]\nport = \"1-1.4\"\n",
            Path::new("x"),
        )
        .unwrap();
        let policy = SharePolicy {
            share: c.share.iter().map(|r| r.matcher.clone()).collect(),
            deny: c.deny.clone(),
        };
        assert!(policy.offers(&facts(1, 1, "1-1", None, &[0, 8])));
        assert!(!policy.offers(&facts(1, 1, "1-1.4", None, &[0, 8])));
        assert!(!policy.offers(&facts(0x1234, 0x5678, "1-2", Some("B2"), &[3])));
        assert!(policy.offers(&facts(0x1234, 0x5678, "1-2", Some("A1"), &[3])));
    }

    #[test]
    fn specs_from_the_command_line() {
        let spec = |s| rule_from_spec(s).unwrap();
        assert!(spec("all").all);
        assert_eq!(
            spec("0781:5581").vid_pid,
            Some(VidPid {
                vendor: 0x0781,
                product: 0x5581
            })
        );
        assert_eq!(spec("1-1.2").port.as_deref(), Some("1-1.2"));
        assert_eq!(spec("serial=A1").serial.as_deref(), Some("A1"));
        assert_eq!(spec("class=0x08").class, Some(8));
        assert_eq!(spec("class=3").class, Some(3));
        assert_eq!(spec("product=Ultra").product.as_deref(), Some("Ultra"));
        assert!(rule_from_spec("class=x").is_err());
        assert!(rule_from_spec("07:1").is_err());
        // The client's old bare word was never a server spelling: the error says which to use.
        let e = rule_from_spec("sandisk").unwrap_err();
        assert!(
            e.contains("serial=sandisk") && e.contains("product=sandisk"),
            "{e}"
        );
    }

    #[test]
    fn edits_keep_comments_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/server.toml");
        let rule = rule_from_spec("0781:5581").unwrap();
        assert!(edit::share(&path, &rule, Some("1234")).unwrap());
        assert!(!edit::share(&path, &rule, Some("1234")).unwrap());
        assert!(edit::allow(&path, ID).unwrap());
        assert!(!edit::allow(&path, ID).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# p2p-usb-server config"), "{text}");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.share.len(), 1);
        assert_eq!(c.share[0].pin.as_deref(), Some("1234"));
        assert_eq!(c.allow.len(), 1);

        std::fs::write(&path, format!("# mine\n{text}")).unwrap();
        assert_eq!(edit::unshare(&path, &rule).unwrap(), 1);
        assert!(edit::revoke(&path, ID).unwrap());
        assert!(!edit::revoke(&path, ID).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# mine\n"), "{text}");
        let c = Config::load(&path).unwrap();
        assert!(c.share.is_empty() && c.allow.is_empty());
    }

    #[test]
    fn edits_refuse_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "queue_depth = 0\n").unwrap();
        let e = edit::allow(&path, ID).unwrap_err().to_string();
        assert!(e.contains("server.toml:1:15"), "{e}");
    }
}
