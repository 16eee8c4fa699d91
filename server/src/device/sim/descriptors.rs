//! The descriptors of the simulated disk: a high-speed, bus-powered mass-storage device with one
//! Bulk-Only Transport interface, shaped like the configfs mass-storage gadget the lab uses as
//! the real-hardware reference, so the kernel takes the same paths for both.

/// pid.codes' test vendor id: free for devices that never leave a test bench.
pub const VENDOR_ID: u16 = 0x1209;
/// pid.codes' shared test product id.
pub const PRODUCT_ID: u16 = 0x0001;
/// `bcdDevice`: bumped if the simulated device ever changes behaviour a host could notice.
pub const BCD_DEVICE: u16 = 0x0100;
/// `iManufacturer`'s text.
pub const MANUFACTURER: &str = "rust-p2p-usb";
/// `iProduct`'s text.
pub const PRODUCT: &str = "Simulated Disk";
/// The bulk IN endpoint's address.
pub const BULK_IN: u8 = 0x81;
/// The bulk OUT endpoint's address.
pub const BULK_OUT: u8 = 0x02;
/// `wMaxPacketSize` of both bulk endpoints: the only size high speed allows for bulk.
pub const BULK_MAX_PACKET: u16 = 512;
/// The only `bConfigurationValue`.
pub const CONFIGURATION_VALUE: u8 = 1;
/// The only interface's number.
pub const INTERFACE_NUMBER: u8 = 0;

/// `bDescriptorType` of a string descriptor.
pub const STRING: u8 = 3;
/// `bDescriptorType` of a device qualifier.
pub const DEVICE_QUALIFIER: u8 = 6;
/// String index of the manufacturer.
const MANUFACTURER_INDEX: u8 = 1;
/// String index of the product.
const PRODUCT_INDEX: u8 = 2;
/// String index of the serial number.
const SERIAL_INDEX: u8 = 3;
/// US English, the one language the strings come in.
const LANGID_EN_US: u16 = 0x0409;

/// The 18-byte device descriptor. Class 0: the interface says what the device is.
pub fn device() -> [u8; 18] {
    let [vid_lo, vid_hi] = VENDOR_ID.to_le_bytes();
    let [pid_lo, pid_hi] = PRODUCT_ID.to_le_bytes();
    let [bcd_lo, bcd_hi] = BCD_DEVICE.to_le_bytes();
    [
        18,
        protocol::descriptors::DEVICE,
        0x00,
        0x02, // bcdUSB 2.00
        0,
        0,
        0,  // class in the interface
        64, // bMaxPacketSize0
        vid_lo,
        vid_hi,
        pid_lo,
        pid_hi,
        bcd_lo,
        bcd_hi,
        MANUFACTURER_INDEX,
        PRODUCT_INDEX,
        SERIAL_INDEX,
        1, // bNumConfigurations
    ]
}

/// The full configuration descriptor (`wTotalLength` = 32 bytes): one interface of class 08
/// (mass storage), subclass 06 (SCSI transparent), protocol 50 (Bulk-Only).
pub fn configuration() -> [u8; 32] {
    let [mps_lo, mps_hi] = BULK_MAX_PACKET.to_le_bytes();
    [
        // configuration: 32 bytes total, 1 interface, bus powered, 100 mA
        9,
        protocol::descriptors::CONFIGURATION,
        32,
        0,
        1,
        CONFIGURATION_VALUE,
        0,
        0x80,
        50,
        // interface 0, alternate 0, 2 endpoints, 08/06/50
        9,
        protocol::descriptors::INTERFACE,
        INTERFACE_NUMBER,
        0,
        2,
        0x08,
        0x06,
        0x50,
        0,
        // bulk IN
        7,
        protocol::descriptors::ENDPOINT,
        BULK_IN,
        0x02,
        mps_lo,
        mps_hi,
        0,
        // bulk OUT
        7,
        protocol::descriptors::ENDPOINT,
        BULK_OUT,
        0x02,
        mps_lo,
        mps_hi,
        0,
    ]
}

/// The device qualifier: what the device would look like at full speed. A high-speed device
/// must answer it, or the kernel logs that it cannot tell the other speed's shape.
pub fn device_qualifier() -> [u8; 10] {
    [10, DEVICE_QUALIFIER, 0x00, 0x02, 0, 0, 0, 64, 1, 0]
}

/// The string descriptors of one simulated disk: the language table and three strings.
#[derive(Debug, Clone)]
pub struct Strings {
    serial: String,
}

impl Strings {
    /// Strings with this serial number (ASCII, at most 126 characters).
    pub fn new(serial: impl Into<String>) -> Self {
        Strings {
            serial: serial.into(),
        }
    }

    /// The serial number's text.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// String descriptor `index`: index 0 is the language table, the rest are UTF-16LE text.
    /// The language id is not checked: there is one language, and hosts that ask for another
    /// are better served with English than with a stall.
    pub fn descriptor(&self, index: u8) -> Option<Vec<u8>> {
        let text = match index {
            0 => {
                let [lo, hi] = LANGID_EN_US.to_le_bytes();
                return Some(vec![4, STRING, lo, hi]);
            }
            MANUFACTURER_INDEX => MANUFACTURER,
            PRODUCT_INDEX => PRODUCT,
            SERIAL_INDEX => &self.serial,
            _ => return None,
        };
        // bLength is one byte: at most 126 UTF-16 units fit.
        let units: Vec<u16> = text.encode_utf16().take(126).collect();
        let mut d = Vec::with_capacity(2 + 2 * units.len());
        d.push((2 + 2 * units.len()) as u8);
        d.push(STRING);
        d.extend(units.iter().flat_map(|u| u.to_le_bytes()));
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::descriptors::{Configuration, DeviceDescriptor};
    use protocol::usb::{Direction, EndpointNumber, TransferType};

    #[test]
    fn device_descriptor_parses() {
        let d = DeviceDescriptor::parse(&device()).unwrap();
        assert_eq!((d.vendor_id, d.product_id), (VENDOR_ID, PRODUCT_ID));
        assert_eq!(d.bcd_usb, 0x0200);
        assert_eq!(d.max_packet_size_0, 64);
        assert_eq!(d.num_configurations, 1);
        assert_eq!(d.class, [0, 0, 0]);
    }

    #[test]
    fn configuration_is_one_bulk_only_interface() {
        let bytes = configuration();
        assert_eq!(
            u16::from_le_bytes([bytes[2], bytes[3]]) as usize,
            bytes.len()
        );
        let c = Configuration::parse(&bytes).unwrap();
        assert_eq!(c.value, CONFIGURATION_VALUE);
        assert_eq!(c.interface_classes(), vec![[8, 6, 0x50]]);
        let ep1 = EndpointNumber::new(1).unwrap();
        let ep2 = EndpointNumber::new(2).unwrap();
        let bulk_in = c.endpoint(ep1, Direction::In).unwrap();
        let bulk_out = c.endpoint(ep2, Direction::Out).unwrap();
        assert_eq!(bulk_in.transfer_type, TransferType::Bulk);
        assert_eq!(bulk_out.transfer_type, TransferType::Bulk);
        assert_eq!(bulk_in.max_packet_size, 512);
        assert_eq!(bulk_out.max_packet_size, 512);
    }

    #[test]
    fn strings_are_utf16le_with_a_language_table() {
        let s = Strings::new("53494D000001");
        assert_eq!(s.descriptor(0).unwrap(), [4, 3, 0x09, 0x04]);
        let product = s.descriptor(2).unwrap();
        assert_eq!(product[0] as usize, product.len());
        assert_eq!(product[1], STRING);
        assert_eq!(&product[2..6], b"S\0i\0");
        assert_eq!(product.len(), 2 + 2 * PRODUCT.len());
        assert_eq!(s.descriptor(3).unwrap().len(), 2 + 24);
        assert!(s.descriptor(4).is_none());
    }

    #[test]
    fn overlong_strings_are_cut_to_fit_blength() {
        let s = Strings::new("x".repeat(300));
        let d = s.descriptor(3).unwrap();
        assert_eq!(d.len(), 254);
        assert_eq!(d[0], 254);
    }

    #[test]
    fn qualifier_is_ten_bytes() {
        let q = device_qualifier();
        assert_eq!(q[0] as usize, q.len());
        assert_eq!(q[1], DEVICE_QUALIFIER);
    }
}
