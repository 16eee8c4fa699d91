//! Endpoint 0 of the simulated disk: the USB standard requests and the two Bulk-Only class
//! requests.
//!
//! [`Control::handle`] answers one SETUP packet. Requests that touch the bulk endpoints (halt
//! clearing, the class reset, a new configuration) come back as an [`Effect`] for the caller to
//! apply to the transport, so this module owns no transport state and stays a pure function of
//! the packet plus the configuration value.

use protocol::usb::{Direction, SetupPacket};

use super::descriptors::{
    self, BULK_IN, BULK_OUT, CONFIGURATION_VALUE, DEVICE_QUALIFIER, INTERFACE_NUMBER, STRING,
    Strings,
};

/// `bRequest` values: the standard ones, and the Bulk-Only class's two.
mod req {
    pub use protocol::bot::{GET_MAX_LUN, MASS_STORAGE_RESET};
    pub use protocol::usb::request::*;
}

use protocol::usb::request::ENDPOINT_HALT;
use protocol::usb::request_type as rt;

/// How endpoint 0 answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A data stage to the host, already cut to `wLength`.
    Data(Vec<u8>),
    /// No data stage; the status stage succeeds.
    Ack,
    /// The request is refused (a protocol stall).
    Stall,
}

/// What an acknowledged request does to the bulk endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// CLEAR_FEATURE(ENDPOINT_HALT) on the bulk endpoint of this direction.
    ClearHalt(Direction),
    /// SET_FEATURE(ENDPOINT_HALT) on the bulk endpoint of this direction.
    SetHalt(Direction),
    /// Bulk-Only Mass Storage Reset.
    MassStorageReset,
    /// SET_CONFIGURATION or SET_INTERFACE: the bulk endpoints start over.
    Reconfigure,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What the host sees.
    pub reply: Reply,
    /// What the transport must do, if anything.
    pub effect: Option<Effect>,
}

impl Outcome {
    fn reply(reply: Reply) -> Self {
        Outcome {
            reply,
            effect: None,
        }
    }

    fn ack(effect: Effect) -> Self {
        Outcome {
            reply: Reply::Ack,
            effect: Some(effect),
        }
    }
}

/// Endpoint 0's state: the configuration value.
#[derive(Debug, Clone)]
pub struct Control {
    strings: Strings,
    configuration: u8,
}

impl Control {
    /// A device in the addressed state (unconfigured), as after enumeration's reset.
    pub fn new(strings: Strings) -> Self {
        Control {
            strings,
            configuration: 0,
        }
    }

    /// The current `bConfigurationValue`, 0 when unconfigured.
    pub fn configuration(&self) -> u8 {
        self.configuration
    }

    /// Answers one SETUP packet. `halted` says whether a bulk endpoint is halted, for
    /// GET_STATUS.
    pub fn handle(&mut self, setup: &SetupPacket, halted: impl Fn(Direction) -> bool) -> Outcome {
        let (value, index) = (setup.value(), setup.index());
        let interface = u16::from(INTERFACE_NUMBER);
        let outcome = match (setup.request_type(), setup.request()) {
            (rt::IN_DEVICE, req::GET_DESCRIPTOR) => self.descriptor(value),
            // USB/IP hosts handle SET_ADDRESS locally, but accepting it costs nothing.
            (rt::OUT_DEVICE, req::SET_ADDRESS) => Outcome::reply(Reply::Ack),
            (rt::OUT_DEVICE, req::SET_CONFIGURATION) => match u8::try_from(value) {
                Ok(v @ (0 | CONFIGURATION_VALUE)) => {
                    self.configuration = v;
                    Outcome::ack(Effect::Reconfigure)
                }
                _ => Outcome::reply(Reply::Stall),
            },
            (rt::IN_DEVICE, req::GET_CONFIGURATION) => data(vec![self.configuration]),
            (rt::OUT_INTERFACE, req::SET_INTERFACE)
                if self.configured() && index == interface && value == 0 =>
            {
                Outcome::ack(Effect::Reconfigure)
            }
            (rt::IN_INTERFACE, req::GET_INTERFACE) if self.configured() && index == interface => {
                data(vec![0])
            }
            (rt::IN_DEVICE, req::GET_STATUS) => data(vec![0, 0]),
            (rt::IN_INTERFACE, req::GET_STATUS) if index == interface => data(vec![0, 0]),
            (rt::IN_ENDPOINT, req::GET_STATUS) => match endpoint(index) {
                Some(Some(dir)) => data(vec![u8::from(halted(dir)), 0]),
                Some(None) => data(vec![0, 0]),
                None => Outcome::reply(Reply::Stall),
            },
            (rt::OUT_ENDPOINT, req @ (req::CLEAR_FEATURE | req::SET_FEATURE))
                if value == ENDPOINT_HALT =>
            {
                match endpoint(index) {
                    Some(Some(dir)) if req == req::CLEAR_FEATURE => {
                        Outcome::ack(Effect::ClearHalt(dir))
                    }
                    Some(Some(dir)) => Outcome::ack(Effect::SetHalt(dir)),
                    // Endpoint 0 never stays halted: a stall there ends with the request.
                    Some(None) => Outcome::reply(Reply::Ack),
                    None => Outcome::reply(Reply::Stall),
                }
            }
            (rt::CLASS_OUT_INTERFACE, req::MASS_STORAGE_RESET)
                if index == interface && value == 0 && setup.length() == 0 =>
            {
                Outcome::ack(Effect::MassStorageReset)
            }
            // One LUN: the highest LUN number is 0.
            (rt::CLASS_IN_INTERFACE, req::GET_MAX_LUN) if index == interface && value == 0 => {
                data(vec![0])
            }
            // Device features (remote wakeup, test mode) are not offered; nor is anything
            // vendor-specific.
            _ => Outcome::reply(Reply::Stall),
        };
        match outcome.reply {
            Reply::Data(mut d) => {
                d.truncate(setup.length().into());
                Outcome {
                    reply: Reply::Data(d),
                    ..outcome
                }
            }
            _ => outcome,
        }
    }

    fn configured(&self) -> bool {
        self.configuration != 0
    }

    /// GET_DESCRIPTOR: device, configuration, string, device qualifier. BOS and
    /// other-speed configuration stall, which is how a USB 2.0 device says it has none.
    fn descriptor(&self, value: u16) -> Outcome {
        let [index, kind] = value.to_le_bytes();
        let bytes = match (kind, index) {
            (protocol::descriptors::DEVICE, 0) => Some(descriptors::device().to_vec()),
            (protocol::descriptors::CONFIGURATION, 0) => {
                Some(descriptors::configuration().to_vec())
            }
            (STRING, i) => self.strings.descriptor(i),
            (DEVICE_QUALIFIER, 0) => Some(descriptors::device_qualifier().to_vec()),
            _ => None,
        };
        bytes.map_or(Outcome::reply(Reply::Stall), data)
    }
}

fn data(d: Vec<u8>) -> Outcome {
    Outcome::reply(Reply::Data(d))
}

/// The endpoint a `wIndex` names: `Some(Some(dir))` for a bulk endpoint, `Some(None)` for
/// endpoint 0, `None` for an endpoint the device does not have.
fn endpoint(index: u16) -> Option<Option<Direction>> {
    match u8::try_from(index).ok()? {
        0x00 | 0x80 => Some(None),
        BULK_IN => Some(Some(Direction::In)),
        BULK_OUT => Some(Some(Direction::Out)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        let mut b = [request_type, request, 0, 0, 0, 0, 0, 0];
        b[2..4].copy_from_slice(&value.to_le_bytes());
        b[4..6].copy_from_slice(&index.to_le_bytes());
        b[6..8].copy_from_slice(&length.to_le_bytes());
        SetupPacket(b)
    }

    fn control() -> Control {
        Control::new(Strings::new("53494D000001"))
    }

    fn ask(c: &mut Control, s: SetupPacket) -> Outcome {
        c.handle(&s, |_| false)
    }

    fn data_of(o: Outcome) -> Vec<u8> {
        match o.reply {
            Reply::Data(d) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    fn stalls(c: &mut Control, s: SetupPacket) {
        assert_eq!(ask(c, s).reply, Reply::Stall, "{s:?}");
    }

    #[test]
    fn get_descriptor_device_and_truncation() {
        let mut c = control();
        // The kernel's first request: 64 bytes of the device descriptor.
        let d = data_of(ask(&mut c, setup(0x80, 6, 0x0100, 0, 64)));
        assert_eq!(d, descriptors::device());
        assert_eq!(data_of(ask(&mut c, setup(0x80, 6, 0x0100, 0, 8))).len(), 8);
    }

    #[test]
    fn get_descriptor_configuration_header_then_all() {
        let mut c = control();
        let head = data_of(ask(&mut c, setup(0x80, 6, 0x0200, 0, 9)));
        assert_eq!(head, descriptors::configuration()[..9]);
        let all = data_of(ask(&mut c, setup(0x80, 6, 0x0200, 0, 255)));
        assert_eq!(all, descriptors::configuration());
        stalls(&mut c, setup(0x80, 6, 0x0201, 0, 255));
    }

    #[test]
    fn get_descriptor_strings_qualifier_and_bos() {
        let mut c = control();
        assert_eq!(
            data_of(ask(&mut c, setup(0x80, 6, 0x0300, 0, 255))),
            [4, 3, 9, 4]
        );
        let product = data_of(ask(&mut c, setup(0x80, 6, 0x0302, 0x0409, 255)));
        assert_eq!(product.len(), 2 + 2 * descriptors::PRODUCT.len());
        stalls(&mut c, setup(0x80, 6, 0x0309, 0x0409, 255));
        let q = data_of(ask(&mut c, setup(0x80, 6, 0x0600, 0, 10)));
        assert_eq!(q, descriptors::device_qualifier());
        stalls(&mut c, setup(0x80, 6, 0x0f00, 0, 5)); // BOS
        stalls(&mut c, setup(0x80, 6, 0x0700, 0, 255)); // other speed
    }

    #[test]
    fn configuration_and_interface() {
        let mut c = control();
        assert_eq!(data_of(ask(&mut c, setup(0x80, 8, 0, 0, 1))), [0]);
        stalls(&mut c, setup(0x01, 11, 0, 0, 0));
        stalls(&mut c, setup(0x81, 10, 0, 0, 1));
        assert_eq!(
            ask(&mut c, setup(0x00, 9, 1, 0, 0)),
            Outcome::ack(Effect::Reconfigure)
        );
        assert_eq!(c.configuration(), 1);
        assert_eq!(data_of(ask(&mut c, setup(0x80, 8, 0, 0, 1))), [1]);
        assert_eq!(
            ask(&mut c, setup(0x01, 11, 0, 0, 0)),
            Outcome::ack(Effect::Reconfigure)
        );
        stalls(&mut c, setup(0x01, 11, 1, 0, 0));
        assert_eq!(data_of(ask(&mut c, setup(0x81, 10, 0, 0, 1))), [0]);
        stalls(&mut c, setup(0x00, 9, 2, 0, 0));
        assert_eq!(c.configuration(), 1);
        assert_eq!(ask(&mut c, setup(0x00, 5, 3, 0, 0)).reply, Reply::Ack);
    }

    #[test]
    fn get_status() {
        let mut c = control();
        assert_eq!(data_of(ask(&mut c, setup(0x80, 0, 0, 0, 2))), [0, 0]);
        assert_eq!(data_of(ask(&mut c, setup(0x81, 0, 0, 0, 2))), [0, 0]);
        let s = setup(0x82, 0, 0, 0x81, 2);
        assert_eq!(data_of(c.handle(&s, |d| d == Direction::In)), [1, 0]);
        assert_eq!(data_of(c.handle(&s, |d| d == Direction::Out)), [0, 0]);
        assert_eq!(data_of(ask(&mut c, setup(0x82, 0, 0, 0x80, 2))), [0, 0]);
        stalls(&mut c, setup(0x82, 0, 0, 0x83, 2));
    }

    #[test]
    fn endpoint_halt_features() {
        let mut c = control();
        assert_eq!(
            ask(&mut c, setup(0x02, 1, 0, 0x81, 0)),
            Outcome::ack(Effect::ClearHalt(Direction::In))
        );
        assert_eq!(
            ask(&mut c, setup(0x02, 1, 0, 0x02, 0)),
            Outcome::ack(Effect::ClearHalt(Direction::Out))
        );
        assert_eq!(
            ask(&mut c, setup(0x02, 3, 0, 0x02, 0)),
            Outcome::ack(Effect::SetHalt(Direction::Out))
        );
        assert_eq!(
            ask(&mut c, setup(0x02, 1, 0, 0x00, 0)),
            Outcome::reply(Reply::Ack)
        );
        stalls(&mut c, setup(0x02, 1, 0, 0x01, 0)); // no OUT 1
        stalls(&mut c, setup(0x02, 1, 1, 0x81, 0)); // not ENDPOINT_HALT
        stalls(&mut c, setup(0x00, 3, 1, 0, 0)); // remote wakeup: not offered
    }

    #[test]
    fn class_requests() {
        let mut c = control();
        assert_eq!(data_of(ask(&mut c, setup(0xa1, 0xfe, 0, 0, 1))), [0]);
        assert_eq!(
            ask(&mut c, setup(0x21, 0xff, 0, 0, 0)),
            Outcome::ack(Effect::MassStorageReset)
        );
        stalls(&mut c, setup(0x21, 0xff, 0, 1, 0));
        stalls(&mut c, setup(0xa1, 0xfe, 0, 1, 1));
    }

    #[test]
    fn unknown_requests_stall() {
        let mut c = control();
        stalls(&mut c, setup(0xc0, 0x33, 0, 0, 4)); // vendor
        stalls(&mut c, setup(0x81, 6, 0x2200, 0, 64)); // HID report descriptor
        stalls(&mut c, setup(0x00, 7, 0x0100, 0, 18)); // SET_DESCRIPTOR
        stalls(&mut c, setup(0x82, 12, 0, 0x81, 2)); // SYNCH_FRAME
    }
}
