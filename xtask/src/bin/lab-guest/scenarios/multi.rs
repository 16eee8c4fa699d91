//! Several devices through one connection: two disks exported by one server, attached by one
//! client process, read at the same time; each must come back byte-exact, neither may stall
//! the other (they travel on separate QUIC streams).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::project::{
    client_id, show_client_log, show_server_log, spawn_client, start_server, vhci_ports_in_use,
};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::modules;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};

const SIZE: usize = 32 * MIB;
const SECOND_PID: u16 = 0x0105;

/// Two gadgets, one server, one client, concurrent reads.
pub fn run() -> Result<()> {
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    let (a_file, b_file) = (Path::new("/tmp/multi-a.img"), Path::new("/tmp/multi-b.img"));
    bench::pattern_file(a_file, SIZE, 0xaa)?;
    bench::pattern_file(b_file, SIZE, 0xbb)?;
    let mut a = Gadget::mass_storage(a_file)?;
    let mut b = Gadget::mass_storage_as("lab-msc2", SECOND_PID, b_file)?;
    a.plug()?;
    b.plug()
        .context("a second UDC (dummy_hcd num=2) is needed")?;
    for g in [&a, &b] {
        g.wait_enumerated(Duration::from_secs(10))?;
        usbdev::wait_block_device(g.vid, g.pid, Via::Dummy, Duration::from_secs(15))?;
    }
    let (a_bus, b_bus) = (a.busid()?, b.busid()?);
    let friend = client_id("friend")?;
    let (mut server, ticket) = start_server(&["--share", "all", "--allow", &friend])?;
    let _client = spawn_client(
        "friend",
        &[
            "--json", "attach", &ticket, "--device", &a_bus, "--device", &b_bus,
        ],
    )?;
    let disk = |g: &Gadget| -> Result<PathBuf> {
        usbdev::wait_block_device(g.vid, g.pid, Via::Vhci, Duration::from_secs(30)).inspect_err(
            |_| {
                show_client_log("friend");
                show_server_log();
            },
        )
    };
    let (a_disk, b_disk) = (disk(&a)?, disk(&b)?);
    log!(
        "one client attached {a_bus} as {} and {b_bus} as {}",
        a_disk.display(),
        b_disk.display()
    );
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| bench::read_verify_mib_s(&a_disk, SIZE, a_file));
        let tb = s.spawn(|| bench::read_verify_mib_s(&b_disk, SIZE, b_file));
        (ta.join(), tb.join())
    });
    let (ra, rb) = (
        ra.map_err(|_| anyhow::anyhow!("reader thread panicked"))??,
        rb.map_err(|_| anyhow::anyhow!("reader thread panicked"))??,
    );
    log!("read both at once, byte-exact: A {ra} MiB/s, B {rb} MiB/s");
    metric("multi_read_a_mib_s", ra);
    metric("multi_read_b_mib_s", rb);
    let (used, _) = vhci_ports_in_use()?;
    ensure!(used == 2, "expected two vhci ports in use, found {used}");
    ensure!(server.alive(), "the server died");
    Ok(())
}
