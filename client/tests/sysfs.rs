//! Attaching and detaching through a fake vhci-hcd, and the real sysfs code on a copied tree.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use client::vhci::sysfs::fake::FakeVhci;
use client::vhci::sysfs::{Hub, Op, VDEV_ST_USED};
use client::vhci::{RealSys, Vhci, VhciError};
use protocol::usb::Speed;

const DEVID: u32 = 0x0001_0002;

#[test]
fn attaches_to_free_ports_of_the_right_hub_and_detaches() {
    let vhci = Vhci::new(FakeVhci::new(1, 8));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_fd();

    assert_eq!(vhci.nports().unwrap(), 16);
    assert_eq!(vhci.attach_any(fd, DEVID, Speed::High).unwrap(), 0);
    assert_eq!(vhci.attach_any(fd, DEVID, Speed::Full).unwrap(), 1);
    assert_eq!(vhci.attach_any(fd, DEVID, Speed::Super).unwrap(), 8);

    let writes = vhci.sys().writes.borrow().clone();
    let raw = {
        use std::os::fd::AsRawFd;
        theirs.as_raw_fd()
    };
    assert_eq!(
        writes,
        [
            ("attach".to_owned(), format!("0 {raw} 65538 3")),
            ("attach".to_owned(), format!("1 {raw} 65538 2")),
            ("attach".to_owned(), format!("8 {raw} 65538 5")),
        ]
    );
    let ports = vhci.ports().unwrap();
    let used: Vec<(Hub, u32, u32)> = ports
        .iter()
        .filter(|p| !p.is_free())
        .map(|p| (p.hub, p.port, p.speed))
        .collect();
    assert_eq!(
        used,
        [(Hub::High, 0, 3), (Hub::High, 1, 2), (Hub::Super, 8, 5)]
    );
    assert_eq!(ports[0].devid, DEVID);
    assert_eq!(ports[0].status, VDEV_ST_USED);

    vhci.detach(1).unwrap();
    assert!(vhci.sys().port(1).status != VDEV_ST_USED);
    assert!(matches!(
        vhci.detach(1),
        Err(VhciError::Refused {
            op: Op::Detach,
            port: 1
        })
    ));
    drop(ours);
}

#[test]
fn a_full_hub_says_so_and_the_other_hub_still_works() {
    let vhci = Vhci::new(FakeVhci::new(1, 2));
    vhci.sys().occupy(0);
    vhci.sys().occupy(1);
    let (_a, b) = UnixStream::pair().unwrap();
    let err = vhci.attach_any(b.as_fd(), DEVID, Speed::High).unwrap_err();
    assert!(matches!(err, VhciError::NoFreePort { speed: Speed::High }));
    assert!(err.to_string().contains("detach one"));
    assert_eq!(vhci.attach_any(b.as_fd(), DEVID, Speed::Super).unwrap(), 2);
    assert!(matches!(
        vhci.attach_any(b.as_fd(), DEVID, Speed::Unknown),
        Err(VhciError::UnsupportedSpeed(Speed::Unknown))
    ));
}

#[test]
fn ports_of_a_second_controller_come_from_status_1() {
    let vhci = Vhci::new(FakeVhci::new(2, 4));
    for port in 0..4 {
        vhci.sys().occupy(port);
    }
    assert_eq!(vhci.nports().unwrap(), 16);
    assert_eq!(vhci.ports().unwrap().len(), 16);
    let (_a, b) = UnixStream::pair().unwrap();
    assert_eq!(vhci.attach_any(b.as_fd(), DEVID, Speed::High).unwrap(), 8);
    assert_eq!(vhci.attach_any(b.as_fd(), DEVID, Speed::Super).unwrap(), 4);
    assert_eq!(vhci.sys().port(8).status, VDEV_ST_USED);
}

#[test]
fn kernel_errors_become_instructions() {
    let (_a, b) = UnixStream::pair().unwrap();

    let mut unloaded = FakeVhci::new(1, 8);
    unloaded.loaded = false;
    let err = Vhci::new(unloaded).free_port(Speed::High).unwrap_err();
    assert!(matches!(err, VhciError::NotLoaded));
    assert!(err.to_string().contains("modprobe vhci-hcd"));

    let denied = FakeVhci::new(1, 8);
    denied.fail_writes.borrow_mut().push_back(libc::EACCES);
    let err = Vhci::new(denied)
        .attach(0, b.as_fd(), DEVID, Speed::High)
        .unwrap_err();
    assert!(matches!(
        err,
        VhciError::PermissionDenied { op: Op::Attach, .. }
    ));
    assert!(err.to_string().contains("root or CAP_SYS_ADMIN"));

    let refused = FakeVhci::new(1, 8);
    refused.fail_writes.borrow_mut().push_back(libc::EINVAL);
    assert!(matches!(
        Vhci::new(refused).attach(3, b.as_fd(), DEVID, Speed::High),
        Err(VhciError::Refused {
            op: Op::Attach,
            port: 3
        })
    ));

    // EBUSY: another attacher won the race; attach_any looks again and gets a port.
    let raced = Vhci::new(FakeVhci::new(1, 8));
    raced.sys().fail_writes.borrow_mut().push_back(libc::EBUSY);
    assert_eq!(raced.attach_any(b.as_fd(), DEVID, Speed::High).unwrap(), 0);
    assert_eq!(raced.sys().writes.borrow().len(), 2);
    raced
        .sys()
        .fail_writes
        .borrow_mut()
        .extend([libc::EBUSY; 8]);
    assert!(matches!(
        raced.attach_any(b.as_fd(), DEVID, Speed::High),
        Err(VhciError::NoFreePort { .. })
    ));
}

#[test]
fn the_real_sysfs_code_reads_and_writes_a_copied_tree() {
    let root = std::env::temp_dir().join(format!("vhci-sysfs-test-{}", std::process::id()));
    let dir = root.join("vhci_hcd.0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(root.join("serial8250")).unwrap();
    std::fs::write(dir.join("nports"), "4\n").unwrap();
    std::fs::write(
        dir.join("status"),
        "hub port sta spd dev      sockfd local_busid\n\
         hs  0000 006 003 00010002 000005 3-1\n\
         hs  0001 004 000 00000000 000000 0-0\n\
         ss  0002 004 000 00000000 000000 0-0\n\
         ss  0003 004 000 00000000 000000 0-0\n",
    )
    .unwrap();
    std::fs::write(dir.join("attach"), "").unwrap();
    let vhci = Vhci::new(RealSys::with_platform_dir(&root));
    assert_eq!(vhci.nports().unwrap(), 4);
    let (_a, b) = UnixStream::pair().unwrap();
    assert_eq!(vhci.attach_any(b.as_fd(), DEVID, Speed::High).unwrap(), 1);
    let written = std::fs::read_to_string(dir.join("attach")).unwrap();
    assert!(
        written.starts_with("1 ") && written.ends_with(" 65538 3"),
        "{written}"
    );

    let missing = Vhci::new(RealSys::with_platform_dir(root.join("nope")));
    assert!(matches!(missing.ports(), Err(VhciError::NotLoaded)));
    std::fs::remove_dir_all(&root).unwrap();
}
