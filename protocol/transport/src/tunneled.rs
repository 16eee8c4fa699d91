//! Network interfaces that run over a USB/IP attachment: never an address we offer a peer.
//!
//! A USB network adapter attached on this machine (through us, or the kernel's own USB/IP)
//! appears as an interface on whatever network the adapter's cable reaches. iroh offers every
//! local address to the peer as a direct path; offered this one, the peer may move the
//! connection onto a path through the adapter, which, attached through us, our own connection
//! carries. The lab's `kinds-net` saw exactly that: a second after an ECM adapter was attached,
//! the server moved the connection to the client's address on the adapter, and lost it when the
//! adapter's driver was unbound.

use std::path::Path;

/// Whether interface `name` belongs to a device on a vhci-hcd port (sysfs: its `device` link
/// resolves under a `vhci_hcd` platform device). iroh asks this of every interface whenever it
/// gathers our addresses.
pub fn is_usbip_interface(name: &str) -> bool {
    on_vhci(Path::new("/sys/class/net"), name)
}

fn on_vhci(class_net: &Path, name: &str) -> bool {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return false;
    }
    std::fs::canonicalize(class_net.join(name).join("device")).is_ok_and(|device| {
        device
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with("vhci_hcd"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn only_interfaces_of_devices_on_vhci_ports_are_left_out() {
        let root = tempfile::tempdir().unwrap();
        let devices = root.path().join("devices");
        let class_net = root.path().join("class/net");
        let vhci_port = devices.join("platform/vhci_hcd.0/usb3/3-1/3-1:1.0");
        let on_pci = devices.join("pci0000:00/0000:00:1f.6");
        for dir in [
            &vhci_port,
            &on_pci,
            &class_net.join("usb0"),
            &class_net.join("eth0"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::create_dir_all(class_net.join("lo")).unwrap();
        symlink(&vhci_port, class_net.join("usb0/device")).unwrap();
        symlink(&on_pci, class_net.join("eth0/device")).unwrap();
        assert!(on_vhci(&class_net, "usb0"));
        assert!(!on_vhci(&class_net, "eth0"));
        // No device (a virtual interface), no such interface, or not a name at all.
        for name in ["lo", "wg0", "", "..", "usb0/device"] {
            assert!(!on_vhci(&class_net, name), "{name}");
        }
    }
}
