//! Any other gadget function through the generic builder: SourceSink from `usb_f_ss_lb`.
//!
//! The host side has no driver for it in the lab, so enumeration with the right interface
//! class (vendor specific, 0xff) is the whole check; it proves `Gadget::with_function`.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::gadget::{Gadget, PID_OTHER};
use crate::report::log;
use crate::sys;

/// Plug a SourceSink gadget and check what enumerated.
pub fn run() -> Result<()> {
    let mut g = Gadget::with_function("lab-ss", PID_OTHER, "usb_f_ss_lb", "SourceSink.0", &[])?;
    g.plug()?;
    let dev = g.wait_enumerated(Duration::from_secs(10))?;
    let busid = g.busid()?;
    let class = sys::read(dev.join(format!("{busid}:1.0/bInterfaceClass")))?;
    ensure!(
        class == "ff",
        "SourceSink interface class is {class}, expected ff"
    );
    log!("sourcesink: {busid} enumerated, interface class {class}");
    g.unplug()?;
    Ok(())
}
