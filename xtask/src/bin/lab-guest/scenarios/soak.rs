//! The long runs behind the CI-sized scenarios, for `cargo xtask soak`: a thousand
//! attach/detach cycles (`cycles` runs a dozen) and a GiB written and read back over a lossy,
//! slow link (`faults` moves 8 MiB).

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};

use super::project::{attach_disk, client, client_id, start_server, vhci_port_in_use};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};

use crate::{modules, netem, sys};

pub use super::cycles::soak as cycles;

/// The disk; the GiB is written over it in passes, each with its own data.
const DISK: usize = 64 * MIB;
const PASSES: usize = 16;

/// 1 GiB written and read back byte-exact through the tunnel at 1 % loss and 20 ms RTT.
pub fn integrity() -> Result<()> {
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    modules::load(modules::NETEM)?;
    let backing = Path::new("/tmp/soak.img");
    bench::pattern_file(backing, DISK, 0x50a)?;
    let gadget = Gadget::local_disk(backing)?;
    let vid_pid = gadget.vid_pid();
    let friend = client_id("friend")?;
    let (mut server, ticket) = start_server(&["--share", &vid_pid, "--allow", &friend])?;
    let (attached, disk) = attach_disk("friend", &ticket, &vid_pid, gadget.vid, gadget.pid)?;
    netem::set(Duration::from_millis(10), 1.0)?;
    let passes = (|| -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut writes, mut reads) = (Vec::new(), Vec::new());
        let pass_file = Path::new("/tmp/soak-pass.bin");
        for pass in 0..PASSES {
            bench::pattern_file(pass_file, DISK, 0x1000 + pass as u64)?;
            let want = bench::md5(pass_file, None)?;
            writes.push(bench::copy_to_device(pass_file, &disk)?);
            sys::write("/proc/sys/vm/drop_caches", "3")?;
            let started = std::time::Instant::now();
            let got = bench::md5(&disk, Some(DISK))?;
            reads.push(DISK as f64 / MIB as f64 / started.elapsed().as_secs_f64());
            ensure!(
                got == want,
                "pass {pass}: the disk read back different data"
            );
            log!(
                "pass {}/{PASSES}: 64 MiB written at {} MiB/s, read back byte-exact",
                pass + 1,
                writes[pass]
            );
        }
        Ok((writes, reads))
    })();
    netem::clear()?;
    let (writes, reads) = passes?;
    metric("soak_integrity_mib", (DISK * PASSES / MIB) as f64);
    metric("soak_lossy_write_mib_s", bench::median(writes));
    metric("soak_lossy_read_mib_s", bench::median(reads));
    let (ok, _, err) = client("friend", &["detach", &vhci_port_in_use()?])?;
    ensure!(ok, "detach failed: {err}");
    drop(attached);
    ensure!(server.alive(), "the server died");
    log!("1 GiB written and read back byte-exact at 1% loss and 20 ms RTT");
    Ok(())
}
