//! Which device a person means: one grammar for the server's share rules (`--share`,
//! `[[share]]`, `[[deny]]`) and the client's `--device` and `[[auto_attach]]`.
//!
//! A spec is one or more criteria joined by commas, all of which must hold:
//!
//! | spec            | names                                                   |
//! |-----------------|---------------------------------------------------------|
//! | `all`           | every device (alone)                                    |
//! | `0781:5581`     | idVendor:idProduct, hex                                 |
//! | `1-1.2`         | whatever is plugged into that port (the sysfs bus id)   |
//! | `port=1-1.2`    | the same, spelled out                                   |
//! | `serial=S`      | iSerialNumber, exactly                                  |
//! | `product=P`     | iProduct, exactly                                       |
//! | `class=8`       | the device's or any interface's class (`0x08` also)     |
//!
//! The client once took a bare serial number or product name; such a word still selects the
//! device whose serial or product it is, and parsing says which spelling to use instead so
//! the caller can warn. Both sides match against [`DeviceFacts`], built from the wire's
//! [`DeviceInfo`] or from the server's own listing.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::wire::DeviceInfo;

/// Why a spec or a rule names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Nothing, or an empty criterion between commas.
    #[error("an empty device spec; {GRAMMAR}")]
    Empty,
    /// Not four hex digits, a colon, four hex digits.
    #[error(
        "`{0}` is not a vid:pid; expected four hex digits, a colon, four hex digits (e.g. 0781:5581)"
    )]
    VidPid(String),
    /// Not a class code.
    #[error("`{0}` is not a USB class code; expected 0 to 255 (e.g. class=8)")]
    Class(String),
    /// `key=` with a key we do not know.
    #[error("`{0}` is not a criterion; {GRAMMAR}")]
    UnknownKey(String),
    /// The same criterion twice.
    #[error("`{0}` is given twice in one spec; give each criterion once")]
    Repeated(&'static str),
    /// `all` beside other criteria.
    #[error("`all` names every device; drop it or the other criteria")]
    AllWithOthers,
    /// A rule table with no criterion.
    #[error(
        "a rule names no device; expected at least one of vid_pid, serial, product, port, class, or `all = true`"
    )]
    NoCriteria,
}

const GRAMMAR: &str =
    "expected all, vid:pid, a port like 1-1.2, serial=S, product=P or class=N (joined by commas)";

/// `vid:pid` in hex, e.g. `0781:5581`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VidPid {
    /// idVendor.
    pub vendor: u16,
    /// idProduct.
    pub product: u16,
}

impl FromStr for VidPid {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, SelectError> {
        let bad = || SelectError::VidPid(s.to_owned());
        let (v, p) = s.split_once(':').ok_or_else(bad)?;
        let hex = |x: &str| {
            (x.len() == 4 && x.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u16::from_str_radix(x, 16).ok())
                .flatten()
        };
        Ok(VidPid {
            vendor: hex(v).ok_or_else(bad)?,
            product: hex(p).ok_or_else(bad)?,
        })
    }
}

impl fmt::Display for VidPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

impl<'de> Deserialize<'de> for VidPid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a rule is checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// idVendor, idProduct.
    pub vid_pid: VidPid,
    /// sysfs bus id.
    pub port: String,
    /// iSerialNumber.
    pub serial: Option<String>,
    /// iProduct.
    pub product: Option<String>,
    /// The device class and every interface class.
    pub classes: Vec<u8>,
}

impl DeviceFacts {
    /// Facts from a device as the server describes it to clients.
    pub fn from_wire(d: &DeviceInfo) -> DeviceFacts {
        let mut classes = vec![d.class.class];
        // Interface descriptors (type 4) carry bInterfaceClass at offset 5.
        let mut rest = d.active_configuration_bytes().unwrap_or_default();
        while let [len, kind, ..] = *rest {
            let len = usize::from(len);
            if len < 2 || len > rest.len() {
                break;
            }
            if kind == 4 && len >= 9 {
                classes.push(rest[5]);
            }
            rest = &rest[len..];
        }
        DeviceFacts {
            vid_pid: VidPid {
                vendor: d.vendor_id,
                product: d.product_id,
            },
            port: d.bus_id.clone(),
            serial: d.serial.clone(),
            product: d.product.clone(),
            classes,
        }
    }
}

/// Which devices a spec or rule names. Every criterion given must hold; `all` names every
/// device (the server never shares hubs or devices it imported, whatever the rules say).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawMatch")]
pub struct DeviceMatch {
    /// `vid:pid`.
    pub vid_pid: Option<VidPid>,
    /// `iSerialNumber`, exactly.
    pub serial: Option<String>,
    /// `iProduct`, exactly.
    pub product: Option<String>,
    /// The port path (sysfs bus id), e.g. `1-1.2`: whatever is plugged into that port.
    pub port: Option<String>,
    /// A USB class code, of the device or of any of its interfaces (8 = mass storage, 3 = HID,
    /// 2 = CDC).
    pub class: Option<u8>,
    /// The client's old bare word: a serial number or a product name.
    pub serial_or_product: Option<String>,
    /// Every device.
    pub all: bool,
}

/// A rule as a TOML table spells it (`[[share]]`, `[[deny]]`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    vid_pid: Option<VidPid>,
    serial: Option<String>,
    product: Option<String>,
    port: Option<String>,
    class: Option<u8>,
    #[serde(default)]
    all: bool,
}

impl TryFrom<RawMatch> for DeviceMatch {
    type Error = SelectError;

    fn try_from(r: RawMatch) -> Result<Self, SelectError> {
        DeviceMatch {
            vid_pid: r.vid_pid,
            serial: r.serial,
            product: r.product,
            port: r.port,
            class: r.class,
            serial_or_product: None,
            all: r.all,
        }
        .checked()
    }
}

/// A spec as a person wrote it: the devices it names, and what to tell them if they used an
/// old spelling. Deserializes from the spec's string (the client's `device = "..."`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The devices it names.
    pub matcher: DeviceMatch,
    /// Set for an old spelling: the message says which spelling to use instead.
    pub deprecated: Option<String>,
}

impl DeviceMatch {
    fn criteria(&self) -> usize {
        usize::from(self.vid_pid.is_some())
            + usize::from(self.serial.is_some())
            + usize::from(self.product.is_some())
            + usize::from(self.port.is_some())
            + usize::from(self.class.is_some())
            + usize::from(self.serial_or_product.is_some())
    }

    /// The match, if it names some device: at least one criterion, or `all` alone.
    pub fn checked(self) -> Result<DeviceMatch, SelectError> {
        match (self.criteria(), self.all) {
            (0, false) => Err(SelectError::NoCriteria),
            (1.., true) => Err(SelectError::AllWithOthers),
            _ => Ok(self),
        }
    }

    /// Whether the device is one this names.
    pub fn matches(&self, d: &DeviceFacts) -> bool {
        if self.all {
            return true;
        }
        let is = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        self.vid_pid.is_none_or(|v| v == d.vid_pid)
            && is(&self.serial, &d.serial)
            && is(&self.product, &d.product)
            && self.port.as_ref().is_none_or(|p| *p == d.port)
            && self.class.is_none_or(|c| d.classes.contains(&c))
            && self
                .serial_or_product
                .as_ref()
                .is_none_or(|w| d.serial.as_ref() == Some(w) || d.product.as_ref() == Some(w))
    }

    /// Parses a spec (see the module's table).
    pub fn parse(spec: &str) -> Result<DeviceSpec, SelectError> {
        let mut m = DeviceMatch::default();
        let mut deprecated = None;
        for part in spec.split(',').map(str::trim) {
            let set = |slot: &mut Option<String>, name: &'static str, v: &str| {
                if slot.replace(v.to_owned()).is_some() {
                    return Err(SelectError::Repeated(name));
                }
                Ok(())
            };
            if part.is_empty() {
                return Err(SelectError::Empty);
            } else if part == "all" {
                m.all = true;
            } else if let Some((key, v)) = part.split_once('=') {
                match key.trim() {
                    "serial" => set(&mut m.serial, "serial", v)?,
                    "product" => set(&mut m.product, "product", v)?,
                    "port" => set(&mut m.port, "port", v)?,
                    "class" => {
                        let parsed = match v.strip_prefix("0x") {
                            Some(hex) => u8::from_str_radix(hex, 16),
                            None => v.parse(),
                        };
                        let c = parsed.map_err(|_| SelectError::Class(v.to_owned()))?;
                        if m.class.replace(c).is_some() {
                            return Err(SelectError::Repeated("class"));
                        }
                    }
                    "vid_pid" => {
                        if m.vid_pid.replace(v.parse()?).is_some() {
                            return Err(SelectError::Repeated("vid_pid"));
                        }
                    }
                    _ => return Err(SelectError::UnknownKey(part.to_owned())),
                }
            } else if part.contains(':') {
                if m.vid_pid.replace(part.parse()?).is_some() {
                    return Err(SelectError::Repeated("vid_pid"));
                }
            } else if is_port_path(part) {
                set(&mut m.port, "port", part)?;
            } else {
                set(&mut m.serial_or_product, "a serial or product", part)?;
                deprecated = Some(format!(
                    "device `{part}`: a bare word is read as a serial number or product name; \
                     write `serial={part}` or `product={part}` instead"
                ));
            }
        }
        Ok(DeviceSpec {
            matcher: m.checked()?,
            deprecated,
        })
    }
}

impl FromStr for DeviceSpec {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, SelectError> {
        DeviceMatch::parse(s)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A sysfs bus id: `1-1`, `3-1.4.2`.
fn is_port_path(s: &str) -> bool {
    let Some((bus, ports)) = s.split_once('-') else {
        return false;
    };
    let number = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    number(bus) && ports.split('.').all(number)
}

/// The spec that parses back to the same match.
impl fmt::Display for DeviceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("all");
        }
        let mut parts: Vec<String> = Vec::new();
        if let Some(v) = self.vid_pid {
            parts.push(v.to_string());
        }
        if let Some(p) = &self.port {
            parts.push(format!("port={p}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial={s}"));
        }
        if let Some(p) = &self.product {
            parts.push(format!("product={p}"));
        }
        if let Some(c) = self.class {
            parts.push(format!("class={c:#04x}"));
        }
        if let Some(w) = &self.serial_or_product {
            parts.push(w.clone());
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        vid: u16,
        pid: u16,
        port: &str,
        serial: Option<&str>,
        product: Option<&str>,
    ) -> DeviceFacts {
        DeviceFacts {
            vid_pid: VidPid {
                vendor: vid,
                product: pid,
            },
            port: port.into(),
            serial: serial.map(Into::into),
            product: product.map(Into::into),
            classes: vec![0, 8],
        }
    }

    fn names(spec: &str, d: &DeviceFacts) -> bool {
        DeviceMatch::parse(spec).unwrap().matcher.matches(d)
    }

    #[test]
    fn every_spelling_names_what_the_table_says() {
        let disk = facts(0x0781, 0x5581, "1-1.2", Some("AA01"), Some("Ultra"));
        let other = facts(0x046d, 0xc31c, "1-1.3", Some("K1"), Some("Keyboard"));
        for spec in [
            "all",
            "0781:5581",
            "0781:5581, serial=AA01",
            "1-1.2",
            "port=1-1.2",
            "serial=AA01",
            "product=Ultra",
            "class=8",
            "class=0x08",
            "vid_pid=0781:5581",
        ] {
            assert!(names(spec, &disk), "{spec} should name the disk");
        }
        for spec in [
            "0781:5581",
            "1-1.2",
            "serial=AA01",
            "product=Ultra",
            "0781:5581,serial=K1",
        ] {
            assert!(!names(spec, &other), "{spec} should not name the keyboard");
        }
        assert!(names("0781:5581", &facts(0x0781, 0x5581, "", None, None)));
        assert!(names("0781:5581".to_uppercase().as_str(), &disk));
    }

    #[test]
    fn a_bare_word_is_the_old_serial_or_product_with_a_warning() {
        let disk = facts(1, 2, "1-1", Some("AA01"), Some("Ultra"));
        for word in ["AA01", "Ultra"] {
            let p = DeviceMatch::parse(word).unwrap();
            assert!(p.matcher.matches(&disk));
            let note = p.deprecated.unwrap();
            assert!(note.contains(&format!("serial={word}")), "{note}");
        }
        assert!(!names("Other", &disk));
        assert_eq!(DeviceMatch::parse("serial=AA01").unwrap().deprecated, None);
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let cases: &[(&str, SelectError)] = &[
            ("", SelectError::Empty),
            ("0781:5581,", SelectError::Empty),
            ("0781:55", SelectError::VidPid("0781:55".into())),
            ("zzzz:5581", SelectError::VidPid("zzzz:5581".into())),
            ("+781:5581", SelectError::VidPid("+781:5581".into())),
            ("class=300", SelectError::Class("300".into())),
            ("vendor=1", SelectError::UnknownKey("vendor=1".into())),
            ("serial=a,serial=b", SelectError::Repeated("serial")),
            ("all,0781:5581", SelectError::AllWithOthers),
        ];
        for (spec, want) in cases {
            assert_eq!(DeviceMatch::parse(spec).unwrap_err(), *want, "{spec}");
        }
    }

    #[test]
    fn display_parses_back() {
        for spec in [
            "all",
            "0781:5581",
            "port=1-1.2",
            "0781:5581,port=1-1,serial=S,product=P Q,class=0x03",
            "legacy",
        ] {
            let m = DeviceMatch::parse(spec).unwrap().matcher;
            assert_eq!(
                DeviceMatch::parse(&m.to_string()).unwrap().matcher,
                m,
                "{spec}"
            );
        }
        let m = DeviceMatch::parse("1-1.2").unwrap().matcher;
        assert_eq!(m.to_string(), "port=1-1.2");
    }

    proptest::proptest! {
        /// Any match prints as a spec that parses back to it (values without commas, as the
        /// grammar requires; the server's table form takes any string).
        #[test]
        fn any_match_round_trips_through_its_spec(
            vid_pid in proptest::option::of((0u16.., 0u16..)),
            serial in proptest::option::of("[A-Za-z0-9_.:=-]{1,12}"),
            product in proptest::option::of("[A-Za-z0-9_. -]{0,10}[A-Za-z0-9]"),
            port in proptest::option::of("[1-9]-[1-9](\\.[1-9]){0,3}"),
            class in proptest::option::of(0u8..),
            word in proptest::option::of("[B-Zb-z][A-Za-z0-9_]{0,10}"),
        ) {
            let m = DeviceMatch {
                vid_pid: vid_pid.map(|(vendor, product)| VidPid { vendor, product }),
                serial,
                product,
                port,
                class,
                serial_or_product: word,
                all: false,
            };
            if let Ok(m) = m.checked() {
                proptest::prop_assert_eq!(DeviceMatch::parse(&m.to_string()).unwrap().matcher, m);
            }
        }

        /// No string makes the parser panic.
        #[test]
        fn any_spec_parses_or_errs(spec in ".{0,40}") {
            let _ = DeviceMatch::parse(&spec);
        }
    }

    #[test]
    fn ports_are_bus_ids() {
        for p in ["1-1", "3-1.4.2", "10-2"] {
            assert!(is_port_path(p), "{p}");
        }
        for p in ["1", "-1", "1-", "1-1.", "a-1", "1-1..2"] {
            assert!(!is_port_path(p), "{p}");
        }
    }

    #[test]
    fn facts_from_the_wire_hold_every_interface_class() {
        // A configuration (value 1) with a mass-storage and a HID interface, then a truncated
        // descriptor that must end the walk, not panic.
        let mut config = vec![9, 2, 0, 0, 2, 1, 0, 0x80, 50];
        config.extend([9, 4, 0, 0, 2, 8, 6, 80, 0]);
        config.extend([7, 5, 0x81, 2, 0, 2, 0]);
        config.extend([9, 4, 1, 0, 1, 3, 1, 1, 0]);
        config.extend([9, 4]);
        let d = DeviceInfo {
            id: crate::wire::DeviceId(1),
            bus_id: "1-1".into(),
            bus_number: 1,
            device_address: 2,
            vendor_id: 0x0781,
            product_id: 0x5581,
            bcd_device: 0x100,
            class: crate::wire::ClassTriple {
                class: 0,
                subclass: 0,
                protocol: 0,
            },
            speed: crate::usb::Speed::High,
            manufacturer: None,
            product: Some("Ultra".into()),
            serial: Some("AA01".into()),
            device_descriptor: vec![0; 18],
            configurations: vec![serde_bytes::ByteBuf::from(config)],
            active_configuration: 1,
        };
        let f = DeviceFacts::from_wire(&d);
        assert_eq!(f.classes, [0, 8, 3]);
        assert_eq!(f.product.as_deref(), Some("Ultra"));
        assert!(names("class=3,product=Ultra,serial=AA01,1-1,0781:5581", &f));
    }
}
