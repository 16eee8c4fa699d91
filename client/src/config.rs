//! The client's TOML config file: named servers (their tickets), which of their devices to
//! attach by themselves, and how hard to retry.
//!
//! `p2p-usb-client pair <ticket> --name pi` writes a server into it; `p2p-usb-client run` (the
//! systemd service) attaches what its `[[auto_attach]]` rules name. Errors name the file, line
//! and column and say what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::select::DeviceSpec;
use serde::{Deserialize, Deserializer};
use transport::Ticket;
pub use transport::daemon::ConfigError;
use transport::daemon::read_for_edit;

/// The whole file; every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The client's secret key (its identity).
    pub key_file: Option<PathBuf>,
    /// How to reach servers behind NAT: `true` (the default) for n0's public relays and
    /// discovery, the URL of your own relay, or `false` for direct addresses and the relay a
    /// ticket names.
    pub relay: transport::relay::RelaySetting,
    /// PEM certificates to trust for your own relay (a self-signed one).
    pub relay_ca: Option<PathBuf>,
    /// The cipher to prefer: `"auto"` (the default: AES-GCM where the CPU has AES
    /// instructions, ChaCha20-Poly1305 where it does not), `"aes-gcm"` or `"chacha20"`.
    pub cipher: transport::cipher::CipherSetting,
    /// Give up on a silent server after this long (`--idle-timeout-ms`).
    pub idle_timeout_ms: Option<u64>,
    /// Record per-URB latency telemetry (see `attach --telemetry`); off unless set.
    pub telemetry: Telemetry,
    /// Servers by name.
    pub servers: BTreeMap<String, Server>,
    /// Devices to attach whenever they are shared, and again after a drop.
    pub auto_attach: Vec<AutoAttach>,
    /// Back-off between reconnection attempts.
    pub reconnect: Reconnect,
    /// What loaded but should be written differently (an old device spelling), each with its
    /// file:line:column.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// Telemetry on or off, and where it goes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Record it.
    pub enabled: bool,
    /// Where, when enabled.
    pub file: Option<PathBuf>,
}

/// A paired server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Its ticket.
    #[serde(deserialize_with = "ticket")]
    pub ticket: Ticket,
}

/// One auto-attach rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoAttach {
    /// A server name from `[servers]`.
    pub server: String,
    /// Which device, in the grammar of [`protocol::select`].
    pub device: DeviceSpec,
    /// Its PIN, if the server asks for one.
    pub pin: Option<String>,
    /// Mass-storage read-ahead (one round trip per SCSI command instead of three for a read,
    /// two for a write); on unless set to false (or `p2p-usb-client --no-read-ahead`).
    #[serde(default = "on")]
    pub read_ahead: bool,
    /// A usb-storage disk's SCSI command size in sectors (`p2p-usb-client
    /// --scsi-max-sectors`); unset is 2048, so a MiB costs as few as one round trip instead of
    /// nine, and 240 keeps the kernel's.
    #[serde(default, deserialize_with = "scsi_max_sectors")]
    pub scsi_max_sectors: Option<u16>,
    /// Interrupt-IN streaming (the device polled a few URBs ahead of the kernel); on unless
    /// set to false (or `p2p-usb-client --no-interrupt-streaming`).
    #[serde(default = "on")]
    pub interrupt_streaming: bool,
}

fn on() -> bool {
    true
}

/// Reconnection back-off: doubles from `initial_ms` up to `max_ms`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// First wait after a drop.
    pub initial_ms: u64,
    /// Longest wait.
    pub max_ms: u64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

impl Reconnect {
    /// The first wait.
    pub fn initial(&self) -> Duration {
        Duration::from_millis(self.initial_ms.max(1))
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms.max(self.initial_ms).max(1))
    }
}

fn ticket<'de, D: Deserializer<'de>>(d: D) -> Result<Ticket, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|e| {
        serde::de::Error::custom(format!(
            "{e}; expected the `p2pusb1:...` string `p2p-usb-server ticket` prints"
        ))
    })
}

fn scsi_max_sectors<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let n = u64::deserialize(d)?;
    let ceiling = crate::vhci::disk::MAX_SECTORS_CEILING;
    match u16::try_from(n) {
        Ok(n) if (1..=ceiling).contains(&n) => Ok(Some(n)),
        _ => Err(serde::de::Error::custom(format!(
            "scsi_max_sectors is {n}; expected 1 to {ceiling} sectors of 512 bytes (usb-storage's default is {})",
            crate::vhci::disk::USB_STORAGE_DEFAULT
        ))),
    }
}

impl Config {
    /// Reads `path`, or an empty config if it does not exist.
    pub fn load_or_default(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::read(path, source)),
        }
    }

    /// Parses `text` and checks that rules name known servers; `path` only names the file.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            ConfigError::invalid(text, path, at, e.message())
        })?;
        for rule in &config.auto_attach {
            if !config.servers.contains_key(&rule.server) {
                // Point at the rule's `server = ...` line.
                let at = find_value(text, "server", &rule.server).unwrap_or(0);
                let known: Vec<&str> = config.servers.keys().map(String::as_str).collect();
                return Err(ConfigError::invalid(
                    text,
                    path,
                    at,
                    &format!(
                        "auto_attach names server `{}`; expected one of the [servers.NAME] tables ({})",
                        rule.server,
                        if known.is_empty() {
                            "there are none: `p2p-usb-client pair <ticket> --name NAME` adds one"
                                .to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        for rule in &config.auto_attach {
            if let (Some(note), Some(word)) = (
                &rule.device.deprecated,
                &rule.device.matcher.serial_or_product,
            ) {
                let at = find_value(text, "device", word).unwrap_or(0);
                let warning = ConfigError::invalid(text, path, at, note).to_string();
                config.warnings.push(warning);
            }
        }
        if config.telemetry.enabled && config.telemetry.file.is_none() {
            let at = text.find("[telemetry]").unwrap_or(0);
            return Err(ConfigError::invalid(
                text,
                path,
                at,
                "telemetry is enabled but has no file; expected `file = \"/path/telemetry.jsonl\"`",
            ));
        }
        Ok(config)
    }

    /// The ticket for a server argument: a ticket itself, or a name from `[servers]`.
    pub fn resolve(&self, server: &str) -> Result<Ticket, String> {
        if server.starts_with("p2pusb1:") {
            return server.parse().map_err(|e| format!("{e}"));
        }
        self.servers
            .get(server)
            .map(|s| s.ticket.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = self.servers.keys().map(String::as_str).collect();
                format!(
                    "`{server}` is neither a ticket (`p2pusb1:...`) nor a paired server name{}",
                    if known.is_empty() {
                        " (none are paired: `p2p-usb-client pair <ticket> --name NAME`)".to_owned()
                    } else {
                        format!(" (paired: {})", known.join(", "))
                    }
                )
            })
    }
}

/// Byte offset of `key = "value"` in `text`, for errors found after parsing.
fn find_value(text: &str, key: &str, value: &str) -> Option<usize> {
    text.match_indices(key).find_map(|(i, _)| {
        let rest = text[i + key.len()..]
            .trim_start()
            .strip_prefix('=')?
            .trim_start();
        let quoted = rest.strip_prefix('"').or_else(|| rest.strip_prefix('\''))?;
        quoted.starts_with(value).then_some(i)
    })
}

/// The commented header a new config file starts with.
const NEW_FILE_HEADER: &str = "\
# p2p-usb-client config. `p2p-usb-client pair` adds servers here; every key is documented
# in client/examples/client.toml.
";

/// Adds (or replaces) `[servers.NAME]`, keeping the file's comments.
pub fn pair(path: &Path, name: &str, ticket: &Ticket) -> Result<(), ConfigError> {
    // The header sits above a root key, so tables added later go below it.
    let text = read_for_edit(path, || format!("{NEW_FILE_HEADER}\nrelay = true\n"))?;
    Config::parse(&text, path)?;
    let mut doc: toml_edit::DocumentMut = text.parse().expect("a config that parsed is TOML");
    let servers = doc
        .entry("servers")
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        })
        .as_table_mut()
        .expect("a config that parsed has a servers table");
    let mut entry = toml_edit::Table::new();
    entry["ticket"] = toml_edit::value(ticket.to_string());
    servers.insert(name, toml_edit::Item::Table(entry));
    let text = doc.to_string();
    Config::parse(&text, path)?;
    let write = |source| ConfigError::write(path, source);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICKET: &str =
        "p2pusb1:ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6@10.0.0.2:7788";

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/client.toml");
        let c = Config::load_or_default(&path).unwrap();
        assert!(!c.servers.is_empty());
        assert!(!c.auto_attach.is_empty());
        assert_eq!(c.reconnect.max(), Duration::from_secs(30));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn read_ahead_is_on_unless_a_rule_turns_it_off() {
        let rule = |extra: &str| {
            let text = format!(
                "[servers.pi]\nticket = \"{TICKET}\"\n[[auto_attach]]\nserver = \"pi\"\ndevice = \"x\"\n{extra}"
            );
            Config::parse(&text, Path::new("client.toml"))
                .unwrap()
                .auto_attach[0]
                .clone()
        };
        assert!(rule("").read_ahead);
        assert_eq!(
            rule("").scsi_max_sectors,
            None,
            "the binary fills in the default"
        );
        assert!(!rule("read_ahead = false\n").read_ahead);
        assert!(rule("").interrupt_streaming);
        assert!(!rule("interrupt_streaming = false\n").interrupt_streaming);
        assert_eq!(rule("scsi_max_sectors = 240\n").scsi_max_sectors, Some(240));
    }

    /// Every mistake names file, line and column, and says what was expected.
    #[test]
    fn an_old_device_spelling_loads_with_a_located_warning() {
        let text = format!(
            "[servers.pi]\nticket = \"{TICKET}\"\n[[auto_attach]]\nserver = \"pi\"\ndevice = \"Ultra\"\n"
        );
        let c = Config::parse(&text, Path::new("client.toml")).unwrap();
        assert_eq!(
            c.auto_attach[0].device.matcher.serial_or_product.as_deref(),
            Some("Ultra")
        );
        let [w] = &c.warnings[..] else {
            panic!("{:?}", c.warnings)
        };
        assert!(w.starts_with("client.toml:5:1:"), "{w}");
        assert!(
            w.contains("serial=Ultra") && w.contains("product=Ultra"),
            "{w}"
        );
        // A spec that names nothing is an error at its line, like every other.
        let text = text.replace("Ultra", "vendor=1");
        let e = Config::parse(&text, Path::new("client.toml")).unwrap_err();
        assert!(
            e.to_string().contains("`vendor=1` is not a criterion"),
            "{e}"
        );
    }

    #[test]
    fn every_error_points_at_its_line() {
        let cases: &[(&str, &str, &str)] = &[
            ("relay = 1\n", "client.toml:1:9:", "relay URL"),
            (
                "colour = true\n",
                "client.toml:1:1:",
                "unknown field `colour`",
            ),
            (
                "[servers.pi]\nticket = \"nope\"\n",
                "client.toml:2:10:",
                "p2pusb1:",
            ),
            (
                "[servers.pi]\nticket = \"p2pusb1:zz\"\n",
                "client.toml:2:10:",
                "endpoint id",
            ),
            (
                "[servers.pi]\naddr = \"x\"\n",
                "client.toml:2:1:",
                "unknown field `addr`",
            ),
            (
                "[servers.pi]\n",
                "client.toml:1:1:",
                "missing field `ticket`",
            ),
            (
                &format!(
                    "[servers.pi]\nticket = \"{TICKET}\"\n[[auto_attach]]\nserver = \"pie\"\ndevice = \"x\"\n"
                ),
                "client.toml:4:1:",
                "expected one of the [servers.NAME] tables (pi)",
            ),
            (
                "[[auto_attach]]\nserver = \"a\"\n",
                "client.toml:1:1:",
                "missing field `device`",
            ),
            ("[reconnect]\nmax_ms = -1\n", "client.toml:2:10:", "u64"),
            (
                &format!(
                    "[servers.pi]\nticket = \"{TICKET}\"\n[[auto_attach]]\nserver = \"pi\"\ndevice = \"x\"\nscsi_max_sectors = 4096\n"
                ),
                "client.toml:6:20:",
                "expected 1 to 2048 sectors",
            ),
            (
                "[telemetry]\nenabled = true\n",
                "client.toml:1:1:",
                "has no file",
            ),
        ];
        for (text, at, what) in cases {
            let e = Config::parse(text, Path::new("client.toml"))
                .expect_err(text)
                .to_string();
            assert!(e.starts_with(at), "{text:?}: {e}");
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_server_argument_is_a_ticket_or_a_name() {
        let c = Config::parse(
            &format!("[servers.pi]\nticket = \"{TICKET}\"\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.resolve("pi").unwrap().to_string(), TICKET);
        assert_eq!(c.resolve(TICKET).unwrap().to_string(), TICKET);
        assert!(c.resolve("laptop").unwrap_err().contains("paired: pi"));
    }

    #[test]
    fn pairing_adds_a_server_and_keeps_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p2p-usb/client.toml");
        let t: Ticket = TICKET.parse().unwrap();
        pair(&path, "pi", &t).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# p2p-usb-client config"), "{text}");
        let text = text.replace("relay = true\n", "");
        std::fs::write(&path, format!("# mine\nrelay = false\n{text}")).unwrap();
        pair(&path, "desk", &t).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# mine\n"), "{text}");
        let c = Config::load_or_default(&path).unwrap();
        assert_eq!(c.relay, transport::relay::RelaySetting::Public(false));
        assert_eq!(c.servers.len(), 2);
    }
}
