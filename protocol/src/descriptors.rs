//! Just enough USB descriptor parsing to know each endpoint's transfer type and each
//! interface's class, from descriptor bytes a peer sent us.
//!
//! The client needs the transfer type of every endpoint to translate USB/IP's CMD_SUBMIT (which
//! names only an endpoint number) into our URB submit, and the bridge needs the interface
//! classes for USB/IP's device list. Descriptors come from the other machine, so every length is
//! checked and a malformed chain is an error, never a panic.

use crate::usb::{Direction, EndpointNumber, TransferType};

/// `bDescriptorType` of a device descriptor.
pub const DEVICE: u8 = 1;
/// `bDescriptorType` of a configuration descriptor.
pub const CONFIGURATION: u8 = 2;
/// `bDescriptorType` of an interface descriptor.
pub const INTERFACE: u8 = 4;
/// `bDescriptorType` of an endpoint descriptor.
pub const ENDPOINT: u8 = 5;
/// Length of a device descriptor.
pub const DEVICE_DESCRIPTOR_LEN: usize = 18;

/// Why descriptor bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// A descriptor whose `bLength` runs past the end of the buffer or is below 2.
    #[error("descriptor at byte {offset} has bLength {length}, {remaining} bytes remain")]
    BadLength {
        /// Where it starts.
        offset: usize,
        /// Its `bLength`.
        length: u8,
        /// Bytes left from its start.
        remaining: usize,
    },
    /// The buffer does not start with the descriptor type expected.
    #[error("expected descriptor type {expected}, found {found}")]
    WrongType {
        /// Expected `bDescriptorType`.
        expected: u8,
        /// What is there.
        found: u8,
    },
    /// An interface or endpoint descriptor shorter than USB defines.
    #[error("{what} descriptor at byte {offset} is too short")]
    TooShort {
        /// Which descriptor.
        what: &'static str,
        /// Where it starts.
        offset: usize,
    },
}

/// The fields of an 18-byte device descriptor that presenting a device needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// `bcdUSB`.
    pub bcd_usb: u16,
    /// `bDeviceClass`, `bDeviceSubClass`, `bDeviceProtocol`.
    pub class: [u8; 3],
    /// `bMaxPacketSize0`.
    pub max_packet_size_0: u8,
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdDevice`.
    pub bcd_device: u16,
    /// `bNumConfigurations`.
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    /// Parses a device descriptor.
    pub fn parse(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let d: &[u8; DEVICE_DESCRIPTOR_LEN] = bytes
            .get(..DEVICE_DESCRIPTOR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(DescriptorError::TooShort {
                what: "device",
                offset: 0,
            })?;
        if d[1] != DEVICE {
            return Err(DescriptorError::WrongType {
                expected: DEVICE,
                found: d[1],
            });
        }
        let le = |at: usize| u16::from_le_bytes([d[at], d[at + 1]]);
        Ok(DeviceDescriptor {
            bcd_usb: le(2),
            class: [d[4], d[5], d[6]],
            max_packet_size_0: d[7],
            vendor_id: le(8),
            product_id: le(10),
            bcd_device: le(12),
            num_configurations: d[17],
        })
    }
}

/// One endpoint of an interface alternate setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint number.
    pub number: EndpointNumber,
    /// Direction.
    pub direction: Direction,
    /// Transfer type from `bmAttributes`.
    pub transfer_type: TransferType,
    /// `wMaxPacketSize` bits 0-10: bytes per packet.
    pub max_packet_size: u16,
    /// `bInterval`.
    pub interval: u8,
}

/// One interface alternate setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `bInterfaceNumber`.
    pub number: u8,
    /// `bAlternateSetting`.
    pub alternate: u8,
    /// `bInterfaceClass`, `bInterfaceSubClass`, `bInterfaceProtocol`.
    pub class: [u8; 3],
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// A parsed configuration descriptor with everything below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    /// `bConfigurationValue`.
    pub value: u8,
    /// `bNumInterfaces`.
    pub num_interfaces: u8,
    /// Every interface alternate setting, in descriptor order.
    pub interfaces: Vec<Interface>,
}

impl Configuration {
    /// Parses a full configuration descriptor (`wTotalLength` bytes).
    pub fn parse(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let mut chain = Chain { bytes, at: 0 };
        let (_, head) = chain.next().transpose()?.ok_or(DescriptorError::TooShort {
            what: "configuration",
            offset: 0,
        })?;
        if head.get(1) != Some(&CONFIGURATION) {
            return Err(DescriptorError::WrongType {
                expected: CONFIGURATION,
                found: head.get(1).copied().unwrap_or(0),
            });
        }
        let [_, _, _, _, num_interfaces, value, ..] = *head else {
            return Err(DescriptorError::TooShort {
                what: "configuration",
                offset: 0,
            });
        };
        let mut interfaces: Vec<Interface> = Vec::new();
        for item in chain {
            let (offset, d) = item?;
            match d[1] {
                INTERFACE => {
                    let [_, _, number, alternate, _, class, subclass, protocol, ..] = *d else {
                        return Err(DescriptorError::TooShort {
                            what: "interface",
                            offset,
                        });
                    };
                    interfaces.push(Interface {
                        number,
                        alternate,
                        class: [class, subclass, protocol],
                        endpoints: Vec::new(),
                    });
                }
                ENDPOINT => {
                    let [_, _, address, attributes, mps_lo, mps_hi, interval, ..] = *d else {
                        return Err(DescriptorError::TooShort {
                            what: "endpoint",
                            offset,
                        });
                    };
                    // An endpoint before any interface belongs to nothing; skip it as the
                    // kernel does.
                    if let Some(interface) = interfaces.last_mut() {
                        let (number, direction) = EndpointNumber::from_address(address);
                        interface.endpoints.push(Endpoint {
                            number,
                            direction,
                            transfer_type: TransferType::from_attributes(attributes),
                            max_packet_size: u16::from_le_bytes([mps_lo, mps_hi]) & 0x07ff,
                            interval,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(Configuration {
            value,
            num_interfaces,
            interfaces,
        })
    }

    /// The transfer type of endpoint `number` in `direction`, looked up across all alternate
    /// settings (an endpoint address keeps its type across them). Endpoint 0 is control.
    pub fn transfer_type(
        &self,
        number: EndpointNumber,
        direction: Direction,
    ) -> Option<TransferType> {
        if number == EndpointNumber::CONTROL {
            return Some(TransferType::Control);
        }
        self.endpoint(number, direction).map(|e| e.transfer_type)
    }

    /// The first descriptor of endpoint `number` in `direction`, across alternate settings.
    pub fn endpoint(&self, number: EndpointNumber, direction: Direction) -> Option<&Endpoint> {
        self.interfaces
            .iter()
            .flat_map(|i| &i.endpoints)
            .find(|e| e.number == number && e.direction == direction)
    }

    /// The interface endpoint `number` in `direction` belongs to (in any alternate setting):
    /// where a request addressed to the endpoint is really going.
    pub fn interface_of(&self, number: EndpointNumber, direction: Direction) -> Option<u8> {
        self.interfaces
            .iter()
            .find(|i| {
                i.endpoints
                    .iter()
                    .any(|e| e.number == number && e.direction == direction)
            })
            .map(|i| i.number)
    }

    /// The class triple of each interface's first alternate setting, in interface order: what
    /// USB/IP's device list carries.
    pub fn interface_classes(&self) -> Vec<[u8; 3]> {
        let mut seen = Vec::new();
        let mut classes = Vec::new();
        for i in &self.interfaces {
            if !seen.contains(&i.number) {
                seen.push(i.number);
                classes.push(i.class);
            }
        }
        classes
    }
}

/// Walks a descriptor chain, yielding `(offset, descriptor bytes)`.
struct Chain<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Chain<'a> {
    type Item = Result<(usize, &'a [u8]), DescriptorError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.at..).filter(|r| !r.is_empty())?;
        let length = rest[0];
        let offset = self.at;
        if length < 2 || usize::from(length) > rest.len() {
            self.at = self.bytes.len();
            return Some(Err(DescriptorError::BadLength {
                offset,
                length,
                remaining: rest.len(),
            }));
        }
        self.at += usize::from(length);
        Some(Ok((offset, &rest[..usize::from(length)])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration descriptor of a high-speed mass-storage gadget: one interface
    /// (08/06/50), bulk IN 0x81 and bulk OUT 0x02, 512 bytes each.
    pub(crate) const MSC_CONFIG: [u8; 32] = [
        9, 2, 32, 0, 1, 1, 0, 0x80, 60, // configuration
        9, 4, 0, 0, 2, 8, 6, 0x50, 0, // interface
        7, 5, 0x81, 2, 0, 2, 0, // bulk IN
        7, 5, 0x02, 2, 0, 2, 0, // bulk OUT
    ];

    #[test]
    fn mass_storage_configuration() {
        let c = Configuration::parse(&MSC_CONFIG).unwrap();
        assert_eq!(c.value, 1);
        assert_eq!(c.interface_classes(), vec![[8, 6, 0x50]]);
        let ep2 = EndpointNumber::new(2).unwrap();
        let ep1 = EndpointNumber::new(1).unwrap();
        assert_eq!(
            c.transfer_type(ep1, Direction::In),
            Some(TransferType::Bulk)
        );
        assert_eq!(
            c.transfer_type(ep2, Direction::Out),
            Some(TransferType::Bulk)
        );
        assert_eq!(c.transfer_type(ep2, Direction::In), None);
        assert_eq!(c.endpoint(ep1, Direction::In).unwrap().max_packet_size, 512);
        assert_eq!(c.interface_of(ep2, Direction::Out), Some(0));
        assert_eq!(c.interface_of(ep2, Direction::In), None);
        assert_eq!(
            c.transfer_type(EndpointNumber::CONTROL, Direction::In),
            Some(TransferType::Control)
        );
    }

    #[test]
    fn malformed_chains_are_errors() {
        let mut zero = MSC_CONFIG;
        zero[9] = 0;
        assert!(matches!(
            Configuration::parse(&zero),
            Err(DescriptorError::BadLength { offset: 9, .. })
        ));
        assert!(Configuration::parse(&MSC_CONFIG[..20]).is_err());
        assert!(Configuration::parse(&[]).is_err());
        assert!(matches!(
            Configuration::parse(&[2, 4]),
            Err(DescriptorError::WrongType { .. })
        ));
        assert!(Configuration::parse(&[2, 2]).is_err());
        let short_endpoint = [9, 2, 12, 0, 1, 1, 0, 0x80, 60, 3, 5, 0x81];
        assert!(matches!(
            Configuration::parse(&short_endpoint),
            Err(DescriptorError::TooShort { .. })
        ));
    }

    #[test]
    fn device_descriptor() {
        let d = [
            18, 1, 0, 2, 0, 0, 0, 64, 0x6b, 0x1d, 0x04, 0x01, 0x00, 0x01, 1, 2, 3, 1,
        ];
        let dd = DeviceDescriptor::parse(&d).unwrap();
        assert_eq!((dd.vendor_id, dd.product_id), (0x1d6b, 0x0104));
        assert_eq!(dd.bcd_usb, 0x0200);
        assert!(DeviceDescriptor::parse(&d[..17]).is_err());
    }
}
