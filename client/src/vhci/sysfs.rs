//! vhci-hcd's sysfs interface: port status, attach and detach.
//!
//! Everything lives under `/sys/devices/platform/vhci_hcd.0`, even with several controllers
//! (`vhci_hcd.N`): `nports` counts the ports of all of them, `status` lists controller 0's ports
//! and `status.N` controller N's, and `attach`/`detach` take global port numbers
//! (`drivers/usb/usbip/vhci_sysfs.c`). Each controller has two root hubs of
//! `VHCI_HC_PORTS` ports: a high-speed one (low, full and high-speed devices) and a SuperSpeed
//! one, global port `controller * 2 * VHCI_HC_PORTS + hub * VHCI_HC_PORTS + rhport`. The kernel
//! picks the hub from the speed written to `attach` and the root-hub port from the port number
//! modulo `VHCI_HC_PORTS`, so we pick a free port of the right hub and write its number.
//!
//! All file access goes through [`VhciSys`], so the error paths are tested with a fake.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

use protocol::usb::Speed;

/// `VDEV_ST_NULL`: the port is free.
pub const VDEV_ST_NULL: u32 = 4;
/// `VDEV_ST_NOTASSIGNED`: attached, the device is being set up.
pub const VDEV_ST_NOTASSIGNED: u32 = 5;
/// `VDEV_ST_USED`: attached and running.
pub const VDEV_ST_USED: u32 = 6;
/// `VDEV_ST_ERROR`: the connection failed; the port frees itself shortly.
pub const VDEV_ST_ERROR: u32 = 7;

/// How often [`Vhci::attach_any`] moves on to another port when the kernel says the one it
/// picked was taken in the meantime (another attacher raced us).
const ATTACH_RETRIES: usize = 4;

/// The file operations vhci needs, so tests can replace the kernel.
pub trait VhciSys {
    /// Indices `N` of the `vhci_hcd.N` platform devices present.
    fn controllers(&self) -> io::Result<Vec<u32>>;
    /// Contents of a readable attribute of `vhci_hcd.0` (`nports`, `status`, `status.N`).
    fn read(&self, attribute: &str) -> io::Result<String>;
    /// Writes one line to a writable attribute of `vhci_hcd.0` (`attach`, `detach`).
    fn write(&self, attribute: &str, line: &str) -> io::Result<()>;
}

/// The real sysfs, rooted at `/sys/devices/platform` unless told otherwise.
#[derive(Debug, Clone)]
pub struct RealSys {
    platform: PathBuf,
}

impl Default for RealSys {
    fn default() -> Self {
        RealSys {
            platform: PathBuf::from("/sys/devices/platform"),
        }
    }
}

impl RealSys {
    /// A sysfs rooted elsewhere (a copy of the tree, a container's mount).
    pub fn with_platform_dir(platform: impl Into<PathBuf>) -> Self {
        RealSys {
            platform: platform.into(),
        }
    }
}

impl VhciSys for RealSys {
    fn controllers(&self) -> io::Result<Vec<u32>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.platform)? {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("vhci_hcd."))
                .and_then(|n| n.parse().ok())
            {
                found.push(n);
            }
        }
        found.sort_unstable();
        Ok(found)
    }

    fn read(&self, attribute: &str) -> io::Result<String> {
        fs::read_to_string(self.platform.join("vhci_hcd.0").join(attribute))
    }

    fn write(&self, attribute: &str, line: &str) -> io::Result<()> {
        // One write(2) with the whole line: sysfs stores parse the buffer of a single write.
        fs::write(self.platform.join("vhci_hcd.0").join(attribute), line)
    }
}

/// Which root hub a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hub {
    /// USB 2 hub: low, full and high-speed devices.
    High,
    /// USB 3 hub: SuperSpeed devices.
    Super,
}

impl Hub {
    /// The hub a device of `speed` attaches to, `None` for speeds vhci refuses.
    pub fn for_speed(speed: Speed) -> Option<Hub> {
        match speed {
            Speed::Low | Speed::Full | Speed::High | Speed::Wireless => Some(Hub::High),
            Speed::Super | Speed::SuperPlus => Some(Hub::Super),
            Speed::Unknown => None,
        }
    }
}

/// One line of a vhci `status` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    /// Root hub.
    pub hub: Hub,
    /// Global port number, as `attach` and `detach` take it.
    pub port: u32,
    /// `VDEV_ST_*` ([`VDEV_ST_NULL`] is free).
    pub status: u32,
    /// Kernel speed code of the attached device (0 when free).
    pub speed: u32,
    /// devid the port was attached with (0 when free).
    pub devid: u32,
    /// The socket fd number the attacher wrote (in the attacher's process).
    pub sockfd: u32,
    /// The bus id the device got on this machine (`0-0` when free).
    pub local_busid: String,
}

impl PortStatus {
    /// Whether the port can take a new device.
    pub fn is_free(&self) -> bool {
        self.status == VDEV_ST_NULL
    }
}

/// Which vhci operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Listing `vhci_hcd.*` controllers.
    ListControllers,
    /// Reading `nports` or a `status` file.
    ReadStatus,
    /// Writing `attach`.
    Attach,
    /// Writing `detach`.
    Detach,
}

/// Why a vhci operation failed, phrased as what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VhciError {
    /// No `vhci_hcd.0`.
    #[error("vhci-hcd is not loaded: run `modprobe vhci-hcd`")]
    NotLoaded,
    /// The sysfs files are root-only.
    #[error("{op:?} on vhci-hcd needs root or CAP_SYS_ADMIN")]
    PermissionDenied {
        /// What we tried.
        op: Op,
        /// The error sysfs gave.
        #[source]
        source: io::Error,
    },
    /// Every port of the hub this speed needs is in use.
    #[error(
        "no free vhci port for a {speed:?}-speed device: detach one, or load vhci-hcd with more controllers (`num_controllers=`)"
    )]
    NoFreePort {
        /// The device's speed.
        speed: Speed,
    },
    /// vhci attaches only known speeds.
    #[error("vhci-hcd cannot attach a device of speed {0:?}")]
    UnsupportedSpeed(Speed),
    /// `attach` said EBUSY: someone took the port between our status read and our write.
    #[error("vhci port {port} was taken by another attach; pick another port")]
    PortBusy {
        /// The port.
        port: u32,
    },
    /// `attach` or `detach` said EINVAL: a bad port, a socket that is not `SOCK_STREAM`, or (on
    /// detach) a port with nothing attached.
    #[error(
        "vhci-hcd refused {op:?} on port {port} (EINVAL): the port is out of range, not attached, or the fd is not a stream socket"
    )]
    Refused {
        /// What we tried.
        op: Op,
        /// The port.
        port: u32,
    },
    /// A `status` line in a format we do not know.
    #[error(
        "line {line} of vhci controller {controller}'s status is not in the format of Linux 4.13 and later"
    )]
    BadStatus {
        /// The controller whose status file it is (`status` is 0, `status.N` is N).
        controller: usize,
        /// 1-based line number.
        line: usize,
    },
    /// `nports` is not a decimal number.
    #[error("vhci `nports` is not a number")]
    BadPortCount,
    /// Any other I/O error.
    #[error("{op:?} on vhci-hcd failed")]
    Io {
        /// What we tried.
        op: Op,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl VhciError {
    fn from_io(op: Op, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => VhciError::PermissionDenied { op, source },
            Some(libc::ENOENT) => VhciError::NotLoaded,
            _ => VhciError::Io { op, source },
        }
    }
}

/// vhci-hcd, through a [`VhciSys`].
#[derive(Debug, Clone, Default)]
pub struct Vhci<S = RealSys> {
    sys: S,
}

impl<S: VhciSys> Vhci<S> {
    /// vhci-hcd as `sys` shows it.
    pub fn new(sys: S) -> Self {
        Vhci { sys }
    }

    /// The underlying file operations (tests inspect their fake through this).
    pub fn sys(&self) -> &S {
        &self.sys
    }

    /// Every port of every controller.
    pub fn ports(&self) -> Result<Vec<PortStatus>, VhciError> {
        let controllers = self
            .sys
            .controllers()
            .map_err(|e| VhciError::from_io(Op::ListControllers, e))?;
        if controllers.is_empty() {
            return Err(VhciError::NotLoaded);
        }
        let mut ports = Vec::new();
        for n in 0..controllers.len() {
            let text = self
                .sys
                .read(&status_file(n))
                .map_err(|e| VhciError::from_io(Op::ReadStatus, e))?;
            ports.extend(parse_status(n, &text)?);
        }
        Ok(ports)
    }

    /// The total port count (`nports`), both hubs of all controllers.
    pub fn nports(&self) -> Result<u32, VhciError> {
        let text = self
            .sys
            .read("nports")
            .map_err(|e| VhciError::from_io(Op::ReadStatus, e))?;
        text.trim().parse().map_err(|_| VhciError::BadPortCount)
    }

    /// The lowest free port for a device of `speed`.
    pub fn free_port(&self, speed: Speed) -> Result<u32, VhciError> {
        self.free_ports(speed)?
            .first()
            .copied()
            .ok_or(VhciError::NoFreePort { speed })
    }

    fn free_ports(&self, speed: Speed) -> Result<Vec<u32>, VhciError> {
        let hub = Hub::for_speed(speed).ok_or(VhciError::UnsupportedSpeed(speed))?;
        Ok(self
            .ports()?
            .into_iter()
            .filter(|p| p.hub == hub && p.is_free())
            .map(|p| p.port)
            .collect())
    }

    /// Attaches `socket` (our end's peer, a `SOCK_STREAM` socket) to `port` as device `devid`
    /// (`busnum << 16 | devnum`). The kernel takes its own reference to the socket; the caller
    /// may close `socket` afterwards.
    pub fn attach(
        &self,
        port: u32,
        socket: BorrowedFd<'_>,
        devid: u32,
        speed: Speed,
    ) -> Result<(), VhciError> {
        if Hub::for_speed(speed).is_none() {
            return Err(VhciError::UnsupportedSpeed(speed));
        }
        let line = format!(
            "{port} {} {devid} {}",
            socket.as_raw_fd(),
            speed.kernel_code()
        );
        self.sys
            .write("attach", &line)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => VhciError::PortBusy { port },
                Some(libc::EINVAL) => VhciError::Refused {
                    op: Op::Attach,
                    port,
                },
                _ => VhciError::from_io(Op::Attach, e),
            })?;
        tracing::info!(port, devid, ?speed, "attached to vhci-hcd");
        Ok(())
    }

    /// Attaches to the first free port of the right hub, moving on if another attacher takes
    /// it first. Returns the port.
    pub fn attach_any(
        &self,
        socket: BorrowedFd<'_>,
        devid: u32,
        speed: Speed,
    ) -> Result<u32, VhciError> {
        for _ in 0..ATTACH_RETRIES {
            let port = self.free_port(speed)?;
            match self.attach(port, socket, devid, speed) {
                Err(VhciError::PortBusy { port }) => {
                    tracing::debug!(port, "vhci port taken meanwhile, trying another");
                }
                other => return other.map(|()| port),
            }
        }
        Err(VhciError::NoFreePort { speed })
    }

    /// Detaches whatever is on `port`. The kernel then shuts its socket down, which ends the
    /// port's byte pump with [`crate::vhci::LinkEnd::KernelClosed`].
    pub fn detach(&self, port: u32) -> Result<(), VhciError> {
        self.sys
            .write("detach", &port.to_string())
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => VhciError::Refused {
                    op: Op::Detach,
                    port,
                },
                _ => VhciError::from_io(Op::Detach, e),
            })?;
        tracing::info!(port, "detached from vhci-hcd");
        Ok(())
    }
}

/// The status attribute of controller `n`: `status`, then `status.1`, `status.2`...
fn status_file(n: usize) -> String {
    match n {
        0 => "status".to_owned(),
        n => format!("status.{n}"),
    }
}

/// Parses one `status` file:
/// `hub port sta spd dev      sockfd local_busid` then lines such as
/// `hs  0000 004 000 00000000 000000 0-0`. Port, status, speed and sockfd are decimal, devid hex.
pub fn parse_status(controller: usize, text: &str) -> Result<Vec<PortStatus>, VhciError> {
    let mut ports = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let bad = || VhciError::BadStatus {
            controller,
            line: index + 1,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if index == 0 {
            if fields.first() != Some(&"hub") {
                return Err(bad());
            }
            continue;
        }
        if fields.is_empty() {
            continue;
        }
        let [hub, port, status, speed, devid, sockfd, busid] = fields[..] else {
            return Err(bad());
        };
        let hub = match hub {
            "hs" => Hub::High,
            "ss" => Hub::Super,
            _ => return Err(bad()),
        };
        let dec = |s: &str| s.parse::<u32>().map_err(|_| bad());
        ports.push(PortStatus {
            hub,
            port: dec(port)?,
            status: dec(status)?,
            speed: dec(speed)?,
            devid: u32::from_str_radix(devid, 16).map_err(|_| bad())?,
            sockfd: dec(sockfd)?,
            local_busid: busid.to_owned(),
        });
    }
    Ok(ports)
}

pub mod fake {
    //! An in-memory vhci-hcd for tests: ports that attach and detach as the kernel's do, and
    //! errors injected per operation.

    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io;

    use super::{Hub, VDEV_ST_NULL, VDEV_ST_USED, VhciSys};

    /// One fake port's state.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FakePort {
        /// `VDEV_ST_*`.
        pub status: u32,
        /// Speed code written at attach.
        pub speed: u32,
        /// devid written at attach.
        pub devid: u32,
        /// fd number written at attach.
        pub sockfd: u32,
    }

    /// A fake vhci-hcd with `controllers` controllers of `hc_ports` ports per hub.
    #[derive(Debug)]
    pub struct FakeVhci {
        /// Whether the module is "loaded".
        pub loaded: bool,
        /// `VHCI_HC_PORTS`.
        pub hc_ports: u32,
        /// Errnos the next writes fail with, in order, before any state change.
        pub fail_writes: RefCell<VecDeque<i32>>,
        /// Every line written, as `(attribute, line)`.
        pub writes: RefCell<Vec<(String, String)>>,
        /// Per controller, `2 * hc_ports` ports: high-speed hub first.
        state: RefCell<Vec<Vec<FakePort>>>,
    }

    impl FakeVhci {
        /// A loaded vhci-hcd with all ports free.
        pub fn new(controllers: usize, hc_ports: u32) -> Self {
            let free = FakePort {
                status: VDEV_ST_NULL,
                speed: 0,
                devid: 0,
                sockfd: 0,
            };
            let ports = vec![vec![free; 2 * hc_ports as usize]; controllers];
            FakeVhci {
                loaded: true,
                hc_ports,
                fail_writes: RefCell::new(VecDeque::new()),
                writes: RefCell::new(Vec::new()),
                state: RefCell::new(ports),
            }
        }

        /// The port with global number `port`, as it is now.
        pub fn port(&self, port: u32) -> FakePort {
            let (c, i) = self.locate(port, None);
            self.state.borrow()[c][i].clone()
        }

        /// Marks a port used, as if another program had attached it.
        pub fn occupy(&self, port: u32) {
            let (c, i) = self.locate(port, None);
            self.state.borrow_mut()[c][i].status = VDEV_ST_USED;
        }

        /// (controller, index within it) of a global port; on attach the kernel takes the hub
        /// from the speed and only the root-hub port from the number.
        fn locate(&self, port: u32, hub: Option<Hub>) -> (usize, usize) {
            let per_controller = 2 * self.hc_ports;
            let controller = (port / per_controller) as usize;
            let rhport = port % self.hc_ports;
            let hub = hub.unwrap_or(if (port / self.hc_ports) % 2 == 1 {
                Hub::Super
            } else {
                Hub::High
            });
            let offset = match hub {
                Hub::High => 0,
                Hub::Super => self.hc_ports,
            };
            (controller, (offset + rhport) as usize)
        }

        fn err(errno: i32) -> io::Error {
            io::Error::from_raw_os_error(errno)
        }
    }

    impl VhciSys for FakeVhci {
        fn controllers(&self) -> io::Result<Vec<u32>> {
            if !self.loaded {
                return Ok(Vec::new());
            }
            Ok((0..self.state.borrow().len() as u32).collect())
        }

        fn read(&self, attribute: &str) -> io::Result<String> {
            if !self.loaded {
                return Err(Self::err(libc::ENOENT));
            }
            let state = self.state.borrow();
            if attribute == "nports" {
                return Ok(format!("{}\n", state.len() as u32 * 2 * self.hc_ports));
            }
            let n: usize = match attribute {
                "status" => 0,
                other => other
                    .strip_prefix("status.")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| Self::err(libc::ENOENT))?,
            };
            let ports = state.get(n).ok_or_else(|| Self::err(libc::ENOENT))?;
            let mut out = String::from("hub port sta spd dev      sockfd local_busid\n");
            for (i, p) in ports.iter().enumerate() {
                let hub = if (i as u32) < self.hc_ports {
                    "hs"
                } else {
                    "ss"
                };
                let global = n as u32 * 2 * self.hc_ports + i as u32;
                if p.status == VDEV_ST_NULL {
                    out += &format!(
                        "{hub}  {global:04} {:03} 000 00000000 000000 0-0\n",
                        p.status
                    );
                } else {
                    out += &format!(
                        "{hub}  {global:04} {:03} {:03} {:08x} {:06} {}-1\n",
                        p.status,
                        p.speed,
                        p.devid,
                        p.sockfd,
                        n + 3
                    );
                }
            }
            Ok(out)
        }

        fn write(&self, attribute: &str, line: &str) -> io::Result<()> {
            self.writes
                .borrow_mut()
                .push((attribute.to_owned(), line.to_owned()));
            if !self.loaded {
                return Err(Self::err(libc::ENOENT));
            }
            if let Some(errno) = self.fail_writes.borrow_mut().pop_front() {
                return Err(Self::err(errno));
            }
            let nums: Vec<u32> = line
                .split_whitespace()
                .map(|f| f.parse().map_err(|_| Self::err(libc::EINVAL)))
                .collect::<io::Result<_>>()?;
            let limit = self.state.borrow().len() as u32 * 2 * self.hc_ports;
            match (attribute, &nums[..]) {
                ("attach", &[port, sockfd, devid, speed]) if port < limit => {
                    let hub = if speed >= 5 { Hub::Super } else { Hub::High };
                    let (c, i) = self.locate(port, Some(hub));
                    let mut state = self.state.borrow_mut();
                    let p = &mut state[c][i];
                    if p.status != VDEV_ST_NULL {
                        return Err(Self::err(libc::EBUSY));
                    }
                    *p = FakePort {
                        status: VDEV_ST_USED,
                        speed,
                        devid,
                        sockfd,
                    };
                    Ok(())
                }
                ("detach", &[port]) if port < limit => {
                    let (c, i) = self.locate(port, None);
                    let mut state = self.state.borrow_mut();
                    let p = &mut state[c][i];
                    if p.status == VDEV_ST_NULL {
                        return Err(Self::err(libc::EINVAL));
                    }
                    p.status = VDEV_ST_NULL;
                    Ok(())
                }
                _ => Err(Self::err(libc::EINVAL)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status file as Linux 6.1's vhci_sysfs.c prints it, 2 ports per hub, one attached.
    const STATUS: &str = "hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00010002 000007 3-1
hs  0001 004 000 00000000 000000 0-0
ss  0002 004 000 00000000 000000 0-0
ss  0003 004 000 00000000 000000 0-0
";

    #[test]
    fn parses_the_kernels_status_format() {
        let ports = parse_status(0, STATUS).unwrap();
        assert_eq!(ports.len(), 4);
        assert_eq!(
            ports[0],
            PortStatus {
                hub: Hub::High,
                port: 0,
                status: VDEV_ST_USED,
                speed: 3,
                devid: 0x0001_0002,
                sockfd: 7,
                local_busid: "3-1".into(),
            }
        );
        assert!(ports[1].is_free());
        assert_eq!(ports[2].hub, Hub::Super);
        assert_eq!(ports[3].port, 3);
    }

    #[test]
    fn refuses_the_pre_4_13_format_by_line() {
        let old = "port sta spd dev      socket           local_busid\n";
        assert!(matches!(
            parse_status(0, old),
            Err(VhciError::BadStatus { line: 1, .. })
        ));
        let bad = "hub port sta spd dev sockfd local_busid\nhs 0000 zzz 000 0 0 0-0\n";
        assert!(matches!(
            parse_status(0, bad),
            Err(VhciError::BadStatus { line: 2, .. })
        ));
    }

    #[test]
    fn speeds_pick_their_hub() {
        assert_eq!(Hub::for_speed(Speed::Full), Some(Hub::High));
        assert_eq!(Hub::for_speed(Speed::High), Some(Hub::High));
        assert_eq!(Hub::for_speed(Speed::Super), Some(Hub::Super));
        assert_eq!(Hub::for_speed(Speed::Unknown), None);
    }
}
