//! configfs USB gadgets on dummy_hcd: a real USB device the guest's own host stack enumerates.
//!
//! Debian's kernel has no legacy `g_mass_storage`/`g_zero`, so every device kind is a
//! configfs gadget with one function, or several in one configuration ([`Gadget::composite`]).
//! A [`Gadget`] is torn down (unbound, configfs entries removed in reverse) when dropped, so a
//! failing scenario does not leave the UDC busy for the next one.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::report::log;
use crate::usbdev::{self, Via};
use crate::{modules, sys};

const GADGETS: &str = "/sys/kernel/config/usb_gadget";

/// Linux Foundation's vendor id; the product ids below only need to be distinct per kind
/// inside the VM so lookups by vid:pid cannot confuse two gadgets.
pub const VID: u16 = 0x1d6b;
/// Product id of [`Gadget::mass_storage`].
pub const PID_MASS_STORAGE: u16 = 0x0104;
/// Product id of [`Gadget::acm`].
pub const PID_ACM: u16 = 0x0105;
/// Product id of [`Gadget::hid_keyboard`].
pub const PID_HID: u16 = 0x0106;
/// Product id of gadgets built with [`Gadget::with_function`].
pub const PID_OTHER: u16 = 0x0107;

/// The HID report descriptor of a boot-protocol keyboard (USB HID spec, appendix E.6):
/// 8-byte input reports (modifiers, reserved, six key codes), 1-byte LED output report.
pub const KEYBOARD_REPORT_DESC: &[u8] = &[
    0x05, 0x01, 0x09, 0x06, 0xa1, 0x01, 0x05, 0x07, 0x19, 0xe0, 0x29, 0xe7, 0x15, 0x00, 0x25, 0x01,
    0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x03, 0x95, 0x05, 0x75, 0x01,
    0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91, 0x03, 0x95, 0x06,
    0x75, 0x08, 0x15, 0x00, 0x25, 0x65, 0x05, 0x07, 0x19, 0x00, 0x29, 0x65, 0x81, 0x00, 0xc0,
];

/// One function of a gadget: its module, its configfs directory (`"acm.usb0"`) and the
/// attributes written into it in order. An attribute in a sub-directory (`"lun.1/file"`)
/// creates that directory first.
pub struct Function<'a> {
    /// The kernel module that provides the function, e.g. `usb_f_acm`.
    pub module: &'a str,
    /// The function's configfs directory name, `<function>.<instance>`.
    pub instance: &'a str,
    /// `(attribute, value)` pairs written in order.
    pub attrs: &'a [(&'a str, &'a [u8])],
}

/// One configfs gadget bound to the dummy UDC while plugged.
pub struct Gadget {
    dir: PathBuf,
    /// Function directories, in the order they were linked into the configuration.
    functions: Vec<String>,
    /// Sub-directories made inside function directories (`lun.1`), removed first.
    subdirs: Vec<PathBuf>,
    /// Vendor id the host side sees.
    pub vid: u16,
    /// Product id the host side sees.
    pub pid: u16,
    plugged: bool,
}

impl Gadget {
    /// A USB mass-storage device whose single LUN is `backing` (a file, e.g. on /tmp).
    pub fn mass_storage(backing: &Path) -> Result<Gadget> {
        Gadget::mass_storage_as("lab-msc", PID_MASS_STORAGE, backing)
    }

    /// [`Gadget::mass_storage`], plugged in, enumerated, and a disk on this side (the server's)
    /// that opens: where every scenario that shares a disk starts.
    pub fn local_disk(backing: &Path) -> Result<Gadget> {
        let mut gadget = Gadget::mass_storage(backing)?;
        gadget.plug()?;
        gadget.wait_enumerated(Duration::from_secs(10))?;
        usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))?;
        Ok(gadget)
    }

    /// `vid:pid`, as `--share` and `--device` take it.
    pub fn vid_pid(&self) -> String {
        format!("{:04x}:{:04x}", self.vid, self.pid)
    }

    /// A second (third...) disk beside the first: its own configfs name and product id, so
    /// the host side can tell them apart. Needs a free UDC (dummy_hcd is loaded with two).
    pub fn mass_storage_as(name: &str, pid: u16, backing: &Path) -> Result<Gadget> {
        let file = backing.to_string_lossy().into_owned();
        Gadget::with_function(
            name,
            pid,
            "usb_f_mass_storage",
            "mass_storage.0",
            &[("lun.0/removable", b"0"), ("lun.0/file", file.as_bytes())],
        )
    }

    /// A CDC-ACM serial port: `/dev/ttyGS0` on the gadget side, `/dev/ttyACMn` on the host.
    pub fn acm() -> Result<Gadget> {
        Gadget::with_function("lab-acm", PID_ACM, "usb_f_acm", "acm.usb0", &[])
    }

    /// A boot keyboard: reports written to `/dev/hidg0` become key events on the host side.
    pub fn hid_keyboard() -> Result<Gadget> {
        Gadget::with_function(
            "lab-hid",
            PID_HID,
            "usb_f_hid",
            "hid.usb0",
            &[
                ("protocol", b"1"),
                ("subclass", b"1"),
                ("report_length", b"8"),
                ("report_desc", KEYBOARD_REPORT_DESC),
            ],
        )
    }

    /// Any function this kernel ships (`usb_f_ss_lb` "SourceSink.0", `usb_f_ecm` "ecm.usb0",
    /// ...): `instance` is the configfs function directory, `attrs` are written into it in
    /// order. Skips the scenario if the function's module is missing.
    pub fn with_function(
        name: &str,
        pid: u16,
        module: &str,
        instance: &str,
        attrs: &[(&str, &[u8])],
    ) -> Result<Gadget> {
        let function = Function {
            module,
            instance,
            attrs,
        };
        Gadget::composite(name, VID, pid, &[function])
    }

    /// A gadget with every function of `functions` in its one configuration, as `vid:pid`
    /// (some host drivers match only the ids of the devices they were written for, such as
    /// usbtest's gadget zero or cdc_subset's Linux-USB Ethernet gadget). Skips the scenario
    /// if a function's module is missing.
    pub fn composite(name: &str, vid: u16, pid: u16, functions: &[Function<'_>]) -> Result<Gadget> {
        modules::load(modules::GADGET)?;
        for f in functions {
            modules::load(&[f.module])?;
        }
        let dir = Path::new(GADGETS).join(name);
        if dir.exists() {
            bail!("gadget {name} already exists; an earlier scenario did not clean up");
        }
        // Created before the configfs entries so a half-built gadget is still torn down.
        let mut g = Gadget {
            dir: dir.clone(),
            functions: Vec::new(),
            subdirs: Vec::new(),
            vid,
            pid,
            plugged: false,
        };
        mkdir(&dir)?;
        sys::write(dir.join("idVendor"), format!("{vid:#06x}"))?;
        sys::write(dir.join("idProduct"), format!("{pid:#06x}"))?;
        sys::write(dir.join("bcdUSB"), "0x0200")?;
        sys::write(dir.join("bcdDevice"), "0x0100")?;
        let strings = dir.join("strings/0x409");
        mkdir(&strings)?;
        sys::write(strings.join("manufacturer"), "rust-p2p-usb lab")?;
        sys::write(strings.join("product"), name)?;
        sys::write(strings.join("serialnumber"), format!("{pid:04x}0001"))?;
        let config = dir.join("configs/c.1");
        mkdir(&config)?;
        mkdir(&config.join("strings/0x409"))?;
        sys::write(config.join("strings/0x409/configuration"), "lab")?;
        sys::write(config.join("MaxPower"), "120")?;
        for f in functions {
            let function = dir.join("functions").join(f.instance);
            mkdir(&function).with_context(|| {
                format!("creating function {} (module {})", f.instance, f.module)
            })?;
            g.functions.push(f.instance.to_owned());
            for (attr, value) in f.attrs {
                let file = function.join(attr);
                if let Some(parent) = file.parent()
                    && !parent.is_dir()
                {
                    mkdir(parent)?;
                    g.subdirs.push(parent.to_path_buf());
                }
                sys::write(&file, value)?;
            }
            symlink(&function, config.join(f.instance))
                .with_context(|| format!("linking {} into c.1", f.instance))?;
        }
        Ok(g)
    }

    /// Whether one of its functions is an instance of `function` (`SourceSink`, `acm`, ...).
    pub fn has_function(&self, function: &str) -> bool {
        self.functions
            .iter()
            .any(|f| f.split('.').next() == Some(function))
    }

    /// The configfs directory of function `instance`, for attributes the kernel fills in
    /// (`ifname`, `port_num`).
    pub fn function_dir(&self, instance: &str) -> PathBuf {
        self.dir.join("functions").join(instance)
    }

    /// Binds the gadget to the first free dummy UDC: the host side sees a device plugged in.
    pub fn plug(&mut self) -> Result<()> {
        let udc = sys::wait_for(
            "a free UDC in /sys/class/udc",
            Duration::from_secs(5),
            || {
                let mut names: Vec<String> = fs::read_dir("/sys/class/udc")
                    .ok()?
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect();
                names.sort();
                // A bound UDC names its gadget's driver in `function`; a free one has none.
                names.into_iter().find(|n| {
                    sys::read(Path::new("/sys/class/udc").join(n).join("function"))
                        .map_or(true, |f| f.is_empty())
                })
            },
        )?;
        log!("gadget {}: plug into {udc}", self.name());
        sys::write(self.dir.join("UDC"), &udc)?;
        self.plugged = true;
        Ok(())
    }

    /// Unbinds from the UDC: the host side sees the device unplugged.
    pub fn unplug(&mut self) -> Result<()> {
        if self.plugged {
            log!("gadget {}: unplug", self.name());
            sys::write(self.dir.join("UDC"), "\n")?;
            self.plugged = false;
        }
        Ok(())
    }

    /// Waits until the host side has enumerated the gadget; returns its sysfs directory.
    pub fn wait_enumerated(&self, timeout: Duration) -> Result<PathBuf> {
        sys::wait_for(
            &format!("gadget {} to enumerate", self.name()),
            timeout,
            || {
                let dev = usbdev::find_usb_device(self.vid, self.pid, Via::Dummy)?;
                // bConfigurationValue is set once a configuration is selected.
                sys::read(dev.join("bConfigurationValue"))
                    .ok()
                    .filter(|v| !v.is_empty())?;
                Some(dev)
            },
        )
    }

    /// The USB/IP bus id of the enumerated gadget, e.g. `17-1`.
    pub fn busid(&self) -> Result<String> {
        let dev = usbdev::find_usb_device(self.vid, self.pid, Via::Dummy)
            .context("the gadget is not enumerated")?;
        Ok(dev
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned())
    }

    fn name(&self) -> String {
        self.dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Gadget {
    fn drop(&mut self) {
        let _ = self.unplug();
        let config = self.dir.join("configs/c.1");
        for f in self.functions.iter().rev() {
            let _ = fs::remove_file(config.join(f));
        }
        let dirs = self
            .subdirs
            .iter()
            .rev()
            .cloned()
            .chain([config.join("strings/0x409"), config.clone()]);
        let functions = self
            .functions
            .iter()
            .rev()
            .map(|f| self.dir.join("functions").join(f));
        for dir in dirs
            .chain(functions)
            .chain([self.dir.join("strings/0x409"), self.dir.clone()])
        {
            if dir.exists()
                && let Err(e) = fs::remove_dir(&dir)
            {
                log!("gadget cleanup: rmdir {}: {e}", dir.display());
            }
        }
    }
}

/// Tears down every gadget still in configfs. A scenario its timeout killed never ran its
/// gadget's `Drop`, and the next one to build a gadget of that name would fail on it.
pub fn remove_leftovers() {
    let Ok(gadgets) = fs::read_dir(GADGETS) else {
        return;
    };
    for dir in gadgets.flatten().map(|e| e.path()) {
        let functions: Vec<String> = fs::read_dir(dir.join("functions"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .collect();
        // Sub-directories a function made room for (mass storage's extra LUNs).
        let subdirs = functions
            .iter()
            .flat_map(|f| {
                fs::read_dir(dir.join("functions").join(f))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "lun.0"))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("lun."))
            })
            .collect();
        log!(
            "removing gadget {} left by the scenario before",
            dir.display()
        );
        drop(Gadget {
            dir,
            functions,
            subdirs,
            vid: 0,
            pid: 0,
            plugged: true,
        });
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    Ok(())
}
