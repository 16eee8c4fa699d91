//! Bigger SCSI commands for a remote USB disk, so a long round trip is paid less often.
//!
//! Bulk-Only Transport runs one SCSI command at a time, and every command costs at least one
//! round trip to the server (one with read-ahead, three without). usb-storage caps a high-speed
//! disk's commands at 240 sectors (120 KiB), so a 1 MiB read is nine commands and nine round
//! trips; at 2,048 sectors (1 MiB, what the kernel itself allows a SuperSpeed disk) it can be
//! one. usb-storage lets the cap be changed at run time through the SCSI device's
//! `max_sectors` attribute, and the block layer applies it to the next request.
//!
//! The cap is not the only bound: vhci gives a URB at most 32 scatter-gather segments
//! (`sg_tablesize`) of at most 64 KiB, so a request over scattered 4 KiB pages stops at
//! 128 KiB. Measured in the lab, direct 1 MiB reads and writes from a fresh buffer came out as
//! commands of 200-512 KiB on average; only physically contiguous memory makes a 1 MiB one.
//!
//! The cap only goes up from usb-storage's own default: a lower value comes from a quirk for a
//! device known to fail larger transfers (`US_FL_MAX_SECTORS_64`), and a higher one was chosen
//! by the kernel or the user; both are left alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// usb-storage's default cap for a high-speed disk (`max_sectors` of its host template).
pub const USB_STORAGE_DEFAULT: u16 = 240;
/// The highest cap we set: the kernel's own for SuperSpeed disks, and the largest data phase
/// read-ahead covers ([`super::readahead::MAX_DATA_LEN`] is this many 512-byte sectors).
pub const MAX_SECTORS_CEILING: u16 = 2048;

/// What happened to one SCSI device's cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuned {
    /// Raised from usb-storage's default.
    Raised {
        /// The `max_sectors` attribute.
        attr: PathBuf,
        /// The value it had.
        from: u16,
    },
    /// Left as it was: not usb-storage's default (a quirk's lower cap, or already higher).
    Kept {
        /// The `max_sectors` attribute.
        attr: PathBuf,
        /// Its value.
        value: u16,
    },
}

/// The `max_sectors` attributes of every SCSI device usb-storage made of the USB device
/// `busid` (one per LUN), under `usb_devices` (`/sys/bus/usb/devices`). Empty while the device
/// is still being probed or is not a usb-storage disk (UAS devices have no such attribute).
///
/// The layout is `<busid>/<busid>:<config>.<interface>/host<N>/target<N:C:T>/<N:C:T:L>/`.
pub fn max_sectors_attrs(usb_devices: &Path, busid: &str) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let interface_prefix = format!("{busid}:");
    for interface in subdirs(&usb_devices.join(busid), |n| {
        n.starts_with(&interface_prefix)
    })? {
        for host in subdirs(&interface, |n| n.starts_with("host"))? {
            for target in subdirs(&host, |n| n.starts_with("target"))? {
                for lun in subdirs(&target, |n| n.contains(':'))? {
                    let attr = lun.join("max_sectors");
                    if attr.is_file() {
                        found.push(attr);
                    }
                }
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Directories in `dir` whose names pass `keep`; none if `dir` is gone (the device went away
/// while we looked).
fn subdirs(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(&keep) && entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// Raises the cap at `attr` to `value` if it is usb-storage's default.
pub fn raise(attr: &Path, value: u16) -> io::Result<Tuned> {
    let text = fs::read_to_string(attr)?;
    let current: u16 = text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {:?}, not a sector count",
                attr.display(),
                text.trim()
            ),
        )
    })?;
    if current != USB_STORAGE_DEFAULT || value <= current {
        return Ok(Tuned::Kept {
            attr: attr.to_owned(),
            value: current,
        });
    }
    // One write(2) with the whole value: sysfs parses the buffer of a single write.
    fs::write(attr, value.to_string())?;
    Ok(Tuned::Raised {
        attr: attr.to_owned(),
        from: current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs tree with one usb-storage device at `busid` and the given LUN caps.
    fn tree(busid: &str, caps: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let target = root
            .path()
            .join(busid)
            .join(format!("{busid}:1.0"))
            .join("host7")
            .join("target7:0:0");
        for (lun, cap) in caps.iter().enumerate() {
            let dir = target.join(format!("7:0:0:{lun}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("max_sectors"), format!("{cap}\n")).unwrap();
        }
        // Siblings that must not be mistaken for the disk.
        fs::create_dir_all(root.path().join(busid).join("power")).unwrap();
        fs::create_dir_all(root.path().join("3-10").join("3-10:1.0")).unwrap();
        root
    }

    #[test]
    fn finds_every_lun_of_the_device_only() {
        let root = tree("3-1", &["240", "240"]);
        let attrs = max_sectors_attrs(root.path(), "3-1").unwrap();
        assert_eq!(attrs.len(), 2);
        assert!(attrs.iter().all(|a| a.ends_with("max_sectors")));
        assert!(max_sectors_attrs(root.path(), "3-10").unwrap().is_empty());
    }

    #[test]
    fn a_device_still_probing_or_gone_has_none() {
        let root = tempfile::tempdir().unwrap();
        assert!(max_sectors_attrs(root.path(), "3-1").unwrap().is_empty());
        fs::create_dir_all(root.path().join("3-1/3-1:1.0")).unwrap();
        assert!(max_sectors_attrs(root.path(), "3-1").unwrap().is_empty());
    }

    #[test]
    fn raises_only_the_default() {
        let root = tree("3-1", &["240", "64", "2048"]);
        let attrs = max_sectors_attrs(root.path(), "3-1").unwrap();
        let results: Vec<Tuned> = attrs.iter().map(|a| raise(a, 2048).unwrap()).collect();
        assert_eq!(
            results[0],
            Tuned::Raised {
                attr: attrs[0].clone(),
                from: 240
            }
        );
        assert_eq!(fs::read_to_string(&attrs[0]).unwrap(), "2048");
        // A quirk's cap and a cap already higher stay.
        assert!(matches!(results[1], Tuned::Kept { value: 64, .. }));
        assert!(matches!(results[2], Tuned::Kept { value: 2048, .. }));
        assert_eq!(fs::read_to_string(&attrs[1]).unwrap(), "64\n");
        // Asking for less than the default changes nothing.
        let root = tree("3-1", &["240"]);
        let attr = &max_sectors_attrs(root.path(), "3-1").unwrap()[0];
        assert!(matches!(
            raise(attr, 128).unwrap(),
            Tuned::Kept { value: 240, .. }
        ));
    }

    #[test]
    fn garbage_in_the_attribute_is_an_error_not_a_write() {
        let root = tree("3-1", &["lots"]);
        let attr = &max_sectors_attrs(root.path(), "3-1").unwrap()[0];
        let e = raise(attr, 2048).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fs::read_to_string(attr).unwrap(), "lots\n");
    }
}
