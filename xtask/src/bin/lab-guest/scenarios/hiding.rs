//! Latency hiding against the real kernel: the mass-storage gadget attached with no flags, so
//! with the defaults (read-ahead and 1 MiB SCSI commands), over a 2 ms round trip. What it
//! proves is correctness, not speed (the bench measures that): usb-storage's cap on the vhci
//! disk is raised, and every byte read directly (sequential READs widened, the next ones
//! answered from the data they brought), read in READs of changing lengths (one longer than
//! the data kept for it takes that data first), read through the page cache and written (each
//! write's CBW answered ahead of the device) and read back after the writes (nothing kept from
//! before them) comes out exact.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::project::{
    SharedDisk, attach_disk_with, client_log, detach_and_wait, log_count, show_client_log,
};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem};

const SIZE: usize = 32 * MIB;
const WRITE: usize = 8 * MIB;
const BUFFERED: usize = 4 * MIB;
const VARIED: usize = 4 * MIB;
/// Each under vhci's 128 KiB of scattered pages, so each is one READ of its own length.
const VARIED_SIZES: [usize; 6] = [
    12 * 1024,
    20 * 1024,
    8 * 1024,
    36 * 1024,
    60 * 1024,
    28 * 1024,
];

/// Attach tuned, check the cap, read, write and read back under netem, detach.
pub fn run() -> Result<()> {
    modules::load(modules::NETEM)?;
    let SharedDisk {
        gadget,
        backing,
        vid_pid,
        ticket,
        server: _server,
    } = SharedDisk::start("hiding", SIZE, 0x4d)?;
    let backing = backing.as_path();
    // No flags: read-ahead and 1 MiB SCSI commands are the defaults.
    let (mut attached, disk) =
        attach_disk_with("friend", &[], &ticket, &vid_pid, gadget.vid, gadget.pid)?;
    usbdev::wait_max_sectors(&disk, 2048).inspect_err(|_| show_client_log("friend"))?;
    log!(
        "max_sectors 2048 on {}: {}",
        disk.display(),
        usbdev::queue_limits(&disk)
    );

    netem::set(Duration::from_millis(1), 0.0)?;
    let result = exercise(&disk, backing);
    netem::clear()?;
    if result.is_err() {
        show_client_log("friend");
    }
    let want = result?;

    detach_and_wait("friend", &mut attached)?;
    let local =
        usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))
            .context("after detach the gadget did not come back as a local disk")?;
    ensure!(
        bench::md5(&local, Some(WRITE))? == want,
        "the write did not reach the gadget's backing store"
    );
    log!("detached; the gadget holds what was written");
    let line = read_ahead_line("friend")?;
    let count = |name: &str| {
        log_count(&line, name).with_context(|| format!("no {name}= on the read-ahead line"))
    };
    let hits = count("hits")?;
    ensure!(
        hits > 0,
        "read-ahead answered no READ: is it off by default?"
    );
    log!("read-ahead answered {hits} URBs (on by default)");
    metric("read_ahead_hits", hits as f64);
    let cbws = count("write_cbws_ahead")?;
    let read_cbws = count("read_cbws_ahead")?;
    let refused = count("cbws_failed_late")?;
    ensure!(
        cbws > 0,
        "no write's CBW was answered ahead: the writes above waited a round trip more"
    );
    ensure!(
        read_cbws > 0,
        "no read's CBW was answered ahead: each read waited a kernel turn more"
    );
    ensure!(
        refused == 0,
        "the device refused {refused} CBWs answered ahead"
    );
    log!("{cbws} write and {read_cbws} read CBWs answered ahead, none refused afterwards");
    let widened = count("widened")?;
    let served = count("served")?;
    let widen_failed = count("widen_failed")?;
    ensure!(
        served > 0,
        "no READ was answered from a widened one: each sequential READ cost a round trip \
         ({widened} widened)"
    );
    ensure!(
        widen_failed == 0,
        "{widen_failed} widened READs did not pass whole"
    );
    let joined = count("joined")?;
    ensure!(
        joined > 0,
        "no READ longer than the data kept for it took that data first: the reads of \
         changing lengths read it twice"
    );
    log!(
        "{widened} READs widened, {served} answered from their data and {joined} partly, \
         none failed"
    );
    metric("reads_widened", widened as f64);
    metric("reads_served", served as f64);
    metric("reads_joined", joined as f64);
    metric("read_cbws_ahead", read_cbws as f64);
    metric("write_cbws_ahead", cbws as f64);
    Ok(())
}

/// Direct and buffered reads checked against `backing`, then a write read back; returns the
/// written bytes' md5.
fn exercise(disk: &Path, backing: &Path) -> Result<String> {
    let read = bench::read_verify_mib_s(disk, SIZE, backing)?;
    log!(
        "read {} MiB byte-exact at {read:.1} MiB/s (direct I/O, 2 ms RTT)",
        SIZE / MIB
    );
    metric("read_mib_s_rtt2", read);
    // READs whose lengths change from one to the next, as a reader's whose pages are more or
    // less contiguous: some run past the data kept for them and take it first.
    bench::read_verify_in(disk, VARIED, backing, &VARIED_SIZES)?;
    log!(
        "read {} MiB byte-exact in direct reads of changing lengths",
        VARIED / MIB
    );
    ensure!(
        bench::md5(disk, Some(BUFFERED))? == bench::md5(backing, Some(BUFFERED))?,
        "the first {} MiB read through the page cache differ from the backing file",
        BUFFERED / MIB
    );
    log!("buffered read of {} MiB byte-exact", BUFFERED / MIB);
    let write = bench::write_mib_s(disk, WRITE)?;
    let written = Path::new("/tmp/hiding-written.bin");
    bench::written_pattern(written, WRITE)?;
    bench::read_verify_mib_s(disk, WRITE, written)
        .context("what was written and read back differ")?;
    log!(
        "wrote {} MiB at {write:.1} MiB/s, read back byte-exact",
        WRITE / MIB
    );
    metric("write_mib_s_rtt2", write);
    bench::md5(written, None)
}

/// The `read-ahead` line the client logs as an attachment ends, with its counters.
fn read_ahead_line(who: &str) -> Result<String> {
    client_log(who)
        .lines()
        .rfind(|l| l.contains("read-ahead") && l.contains("hits="))
        .map(str::to_owned)
        .context("the client logged no read-ahead line as the attachment ended")
}
