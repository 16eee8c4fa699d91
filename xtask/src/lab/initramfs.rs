//! Planning and assembling the guest's initramfs.
//!
//! A plan lists every file that goes in (kernel modules, busybox, glibc binaries and the
//! exact libraries `ldd` resolves for them, the project's binaries, `/init`) before anything
//! is written, so the cache key can cover the real content. Assembly stages the tree under
//! `.lab/stage`, runs `depmod -b` on it and writes an uncompressed newc cpio: with the
//! uncompressed vmlinux, QEMU's PVH boot skips both decompressions.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cache::Key;
use super::cmd;
use super::packages::{self, Apt, Pkg};

/// Modules every scenario relies on; the build fails if the kernel lacks one. Their
/// `modules.dep` closure comes along. `crct10dif_generic` and `crc64_rocksoft_generic` are
/// softdeps of `sd_mod` that busybox modprobe does not follow, so the guest loads them itself.
const REQUIRED_MODULES: &[&str] = &[
    "usbip-core",
    "vhci-hcd",
    "usbip-host",
    "dummy_hcd",
    "configfs",
    "libcomposite",
    "usb_f_mass_storage",
    "usb-storage",
    "sd_mod",
    "crct10dif_generic",
    "crct10dif-pclmul",
    "crc64_rocksoft_generic",
    "sch_netem",
];

/// Modules some scenarios use; a kernel without one still builds, and those scenarios skip
/// with a reason. Every configfs gadget function this kernel family ships is here, with the
/// host-side class drivers that bind to what the functions produce.
const OPTIONAL_MODULES: &[&str] = &[
    "usb_f_acm",
    "usb_f_serial",
    "usb_f_obex",
    "usb_f_hid",
    "usb_f_ss_lb",
    "usb_f_ecm",
    "usb_f_ecm_subset",
    "usb_f_eem",
    "usb_f_ncm",
    "usb_f_rndis",
    "usb_f_fs",
    "usb_f_midi",
    "usb_f_printer",
    "usb_f_uac1",
    "usb_f_uac2",
    "cdc-acm",
    "usbserial",
    "usb_serial_simple",
    "usbnet",
    "cdc_ether",
    "cdc_eem",
    "cdc_ncm",
    "cdc_subset",
    "rndis_host",
    "usblp",
    "snd-usb-audio",
    "usbtest",
    "usbhid",
    "hid-generic",
    "evdev",
    "loop",
    "xhci-pci",
    "xhci-hcd",
    "ftdi_sio",
    // The NAT scenarios: namespaces joined by veth pairs, NAT by nftables.
    "veth",
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    // The bench's encrypted anchor: the kernel's USB/IP inside WireGuard.
    "wireguard",
];

/// Debian packages whose files go into the guest (besides the kernel).
pub const GUEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "usbip",
    "libwrap0",
    "bpftool",
    "iproute2",
    "sg3-utils",
    "alsa-utils",
    "libasound2-data",
    "nftables",
    "wireguard-tools",
    "linux-perf",
];

/// Programs taken from those packages: (package, path in package, path in guest).
const PACKAGE_PROGRAMS: &[(&str, &str, &str)] = &[
    ("usbip", "usr/sbin/usbip", "/usr/sbin/usbip"),
    ("usbip", "usr/sbin/usbipd", "/usr/sbin/usbipd"),
    ("bpftool", "usr/sbin/bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "sbin/tc", "/usr/sbin/tc"),
    // Network namespaces for the device-kind suite (busybox's ip has no `netns`).
    ("iproute2", "bin/ip", "/usr/sbin/ip"),
    // A SCSI command with a data phase the gadget stalls (device-kind suite, mass storage).
    ("sg3-utils", "usr/bin/sg_raw", "/usr/bin/sg_raw"),
    // Playing into a sound card through the tunnel (isochronous OUT).
    ("alsa-utils", "usr/bin/aplay", "/usr/bin/aplay"),
    // NAT routers between the NAT scenarios' namespaces.
    ("nftables", "usr/sbin/nft", "/usr/sbin/nft"),
    // WireGuard keys and peers for the bench's encrypted anchor.
    ("wireguard-tools", "usr/bin/wg", "/usr/bin/wg"),
    // Where the daemons' CPU goes, by symbol, kernel included (`cargo xtask bench profile`).
    ("linux-perf", "usr/bin/perf", "/usr/bin/perf"),
];

/// Data directories taken whole from those packages: (package, directory in package, in
/// guest). alsa-lib cannot name any card without its configuration.
const PACKAGE_TREES: &[(&str, &str, &str)] =
    &[("libasound2-data", "usr/share/alsa", "/usr/share/alsa")];

/// Every regular file under `root` (links followed, dangling ones skipped) at the same place
/// under `dest` in the guest.
fn add_tree(root: &Path, dest: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let path = entry.path();
        let inside = dest.join(entry.file_name());
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => add_tree(&path, &inside, files)?,
            Ok(m) if m.is_file() => {
                files.insert(inside.to_string_lossy().into_owned(), path);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where every shared library goes: the first directory of glibc's built-in search path,
/// so the guest needs no `ld.so.cache`.
const GUEST_LIB_DIR: &str = "/lib/x86_64-linux-gnu";

/// A file to install: (path in the guest, file on the host).
type GuestFile = (String, PathBuf);

/// Dependency rounds to follow when a downloaded program needs a library the host lacks.
const LIB_FETCH_ROUNDS: usize = 3;

/// Everything that goes into one initramfs, resolved but not yet written.
pub struct Plan {
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kver: String,
    kernel_root: PathBuf,
    /// Module paths relative to `lib/modules/<kver>`, dependency closure included.
    modules: BTreeSet<String>,
    /// Optional modules this kernel does not have (reported, not fatal).
    pub missing_optional: Vec<String>,
    busybox: PathBuf,
    /// Guest path -> host source, for programs and libraries.
    files: BTreeMap<String, PathBuf>,
    /// (name, version) of every package the content comes from.
    pub packages: Vec<(String, String)>,
}

/// The project's binaries to ship: (host path, guest path).
pub struct Binaries {
    /// The guest init (`lab-guest`), installed as `/init`.
    pub guest: PathBuf,
    /// Project programs, installed in `/usr/bin`.
    pub project: Vec<PathBuf>,
}

/// Resolves modules, programs and their libraries for `kernel` and the guest packages.
pub fn plan(apt: &Apt, kernel: &Pkg, guest_pkgs: &[Pkg], bins: &Binaries) -> Result<Plan> {
    let kver = kernel
        .name
        .strip_prefix("linux-image-")
        .context("kernel package name does not start with linux-image-")?
        .to_owned();
    let moddir = kernel.root.join("lib/modules").join(&kver);
    if !moddir.is_dir() {
        bail!("{} has no lib/modules/{kver}", kernel.deb.display());
    }
    if !moddir.join("modules.dep").is_file() {
        eprintln!("lab: depmod for the unpacked {kver} kernel");
        cmd::output(
            Command::new("depmod")
                .arg("-b")
                .arg(&kernel.root)
                .arg(&kver),
        )?;
    }
    let (modules, missing_optional) = module_closure(&moddir)?;

    let pkg = |name: &str| {
        guest_pkgs
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("package {name} was not fetched"))
    };
    let busybox = pkg("busybox-static")?.root.join("bin/busybox");
    if !busybox.is_file() {
        bail!("busybox-static has no bin/busybox");
    }

    let mut libs = LibResolver::new(apt, guest_pkgs);
    let mut files = BTreeMap::new();
    for (name, inner, dest) in PACKAGE_PROGRAMS {
        let owner = pkg(name)?;
        let src = owner.root.join(inner);
        if !src.is_file() {
            bail!("package {name} has no {inner}");
        }
        files.insert((*dest).to_owned(), src.clone());
        libs.add_program(&src, Some(owner), &mut files)?;
    }
    for (name, inner, dest) in PACKAGE_TREES {
        let root = pkg(name)?.root.join(inner);
        if !root.is_dir() {
            bail!("package {name} has no {inner}");
        }
        add_tree(&root, Path::new(dest), &mut files)?;
    }
    files.insert("/init".to_owned(), bins.guest.clone());
    libs.add_program(&bins.guest, None, &mut files)?;
    for bin in &bins.project {
        let name = bin.file_name().context("binary path has no file name")?;
        files.insert(format!("/usr/bin/{}", name.to_string_lossy()), bin.clone());
        libs.add_program(bin, None, &mut files)?;
    }

    let mut packages: Vec<(String, String)> = std::iter::once(kernel)
        .chain(guest_pkgs)
        .chain(&libs.fetched)
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect();
    packages.sort();
    packages.dedup();
    Ok(Plan {
        kver,
        kernel_root: kernel.root.clone(),
        modules,
        missing_optional,
        busybox,
        files,
        packages,
    })
}

impl Plan {
    /// Mixes everything the initramfs is made of into `key`.
    pub fn add_to_key(&self, key: &mut Key) -> Result<()> {
        for (name, version) in &self.packages {
            key.add(name.as_bytes());
            key.add(version.as_bytes());
        }
        for m in &self.modules {
            key.add(m.as_bytes());
        }
        for (dest, src) in &self.files {
            key.add(dest.as_bytes());
            key.add_file(src)?;
        }
        Ok(())
    }

    /// How many kernel modules go in.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Writes the initramfs to `out`, staging the tree in `stage`; returns its size.
    pub fn assemble(&self, stage: &Path, out: &Path) -> Result<u64> {
        if stage.exists() {
            fs::remove_dir_all(stage).with_context(|| format!("clearing {}", stage.display()))?;
        }
        for dir in [
            "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root",
            "mnt", "etc", "boot", "lib64", "var",
        ] {
            fs::create_dir_all(stage.join(dir))?;
        }
        fs::create_dir_all(stage.join(GUEST_LIB_DIR.trim_start_matches('/')))?;
        symlink("../run", stage.join("var/run"))?;
        fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        fs::write(stage.join("etc/group"), "root:x:0:\n")?;
        // usbip looks names up here and prints an error on every call when it is missing;
        // an empty database is enough (it falls back to "unknown vendor").
        fs::create_dir_all(stage.join("usr/share/misc"))?;
        fs::write(stage.join("usr/share/misc/usb.ids"), "")?;

        self.install_busybox(stage)?;
        self.install_modules(stage)?;
        for (dest, src) in &self.files {
            let to = stage.join(dest.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            if to.symlink_metadata().is_ok() {
                fs::remove_file(&to)?;
            }
            fs::copy(src, &to)
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
        }
        let config = self.kernel_root.join(format!("boot/config-{}", self.kver));
        if config.is_file() {
            fs::copy(&config, stage.join(format!("boot/config-{}", self.kver)))?;
        }

        let tmp = out.with_extension("tmp");
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = super::cpio::Writer::new(BufWriter::new(file));
        w.add_tree(stage)?;
        // The kernel opens /dev/console for init, and std opens /dev/null for a child's
        // null stdin, both before init has mounted devtmpfs.
        w.add_char_device("dev/console", 5, 1)?;
        w.add_char_device("dev/null", 1, 3)?;
        let size = w.finish()?;
        fs::rename(&tmp, out)?;
        Ok(size)
    }

    /// Busybox applets become symlinks wherever busybox says they live, unless a real
    /// program is planned there (e.g. Debian's `tc`, which unlike busybox's can do netem).
    fn install_busybox(&self, stage: &Path) -> Result<()> {
        fs::copy(&self.busybox, stage.join("bin/busybox"))?;
        let list = cmd::output(Command::new(&self.busybox).arg("--list-full"))?;
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if self.files.contains_key(&format!("/{applet}")) || applet == "bin/busybox" {
                continue;
            }
            let link = stage.join(applet);
            if link.symlink_metadata().is_ok() {
                continue;
            }
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent)?;
            }
            symlink("/bin/busybox", &link)?;
        }
        Ok(())
    }

    fn install_modules(&self, stage: &Path) -> Result<()> {
        let from = self.kernel_root.join("lib/modules").join(&self.kver);
        let to = stage.join("lib/modules").join(&self.kver);
        for rel in &self.modules {
            let dest = to.join(rel);
            fs::create_dir_all(dest.parent().context("module path has no parent")?)?;
            fs::copy(from.join(rel), &dest).with_context(|| format!("copying module {rel}"))?;
        }
        for meta in [
            "modules.order",
            "modules.builtin",
            "modules.builtin.modinfo",
        ] {
            if from.join(meta).is_file() {
                fs::copy(from.join(meta), to.join(meta))?;
            }
        }
        cmd::output(Command::new("depmod").arg("-b").arg(stage).arg(&self.kver))?;
        Ok(())
    }
}

/// `vhci-hcd` and `vhci_hcd` name the same module; file names use either.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The wanted modules plus everything they depend on, as paths from `modules.dep`.
fn module_closure(moddir: &Path) -> Result<(BTreeSet<String>, Vec<String>)> {
    let dep_text = fs::read_to_string(moddir.join("modules.dep"))?;
    let deps: BTreeMap<&str, Vec<&str>> = dep_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.trim(), d.split_whitespace().collect()))
        .collect();
    let by_name: BTreeMap<String, &str> = deps.keys().map(|m| (module_name(m), *m)).collect();
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    let mut closure = BTreeSet::new();
    let mut missing_optional = Vec::new();
    let wanted = REQUIRED_MODULES
        .iter()
        .map(|m| (m, true))
        .chain(OPTIONAL_MODULES.iter().map(|m| (m, false)));
    for (name, required) in wanted {
        let key = module_name(name);
        let Some(path) = by_name.get(&key) else {
            if builtin.contains(&key) {
                continue;
            }
            if required {
                bail!("the kernel has no module {name}, which the lab needs");
            }
            missing_optional.push((*name).to_owned());
            continue;
        };
        let mut todo = vec![*path];
        while let Some(m) = todo.pop() {
            if closure.insert(m.to_owned()) {
                todo.extend(deps.get(m).into_iter().flatten());
            }
        }
    }
    Ok((closure, missing_optional))
}

/// Finds the shared libraries of each program with `ldd`, fetching library packages from
/// apt when a downloaded program needs one the host does not have (e.g. `libwrap0` for
/// usbipd). Host libraries are fine for the rest: the host runs the same Debian release.
struct LibResolver<'a> {
    apt: &'a Apt,
    dirs: Vec<PathBuf>,
    fetched: Vec<Pkg>,
    seen: BTreeSet<String>,
}

impl<'a> LibResolver<'a> {
    fn new(apt: &'a Apt, pkgs: &[Pkg]) -> Self {
        let mut r = LibResolver {
            apt,
            dirs: Vec::new(),
            fetched: Vec::new(),
            seen: pkgs.iter().map(|p| p.name.clone()).collect(),
        };
        pkgs.iter().for_each(|p| r.add_lib_dirs(p));
        r
    }

    fn add_lib_dirs(&mut self, pkg: &Pkg) {
        for sub in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"] {
            let dir = pkg.root.join(sub);
            if dir.is_dir() {
                self.dirs.push(dir);
            }
        }
    }

    /// Plans `program`'s libraries into `files`; `owner` is its package, if it came from apt.
    fn add_program(
        &mut self,
        program: &Path,
        owner: Option<&Pkg>,
        files: &mut BTreeMap<String, PathBuf>,
    ) -> Result<()> {
        let mut frontier: Vec<Pkg> = owner.into_iter().cloned().collect();
        for _ in 0..=LIB_FETCH_ROUNDS {
            let (found, missing) = self.ldd(program)?;
            if missing.is_empty() {
                files.extend(found);
                return Ok(());
            }
            // Fetch the next layer of library dependencies, then look again.
            let mut next = Vec::new();
            for pkg in &frontier {
                for dep in packages::depends(pkg)? {
                    let is_lib = dep.starts_with("lib") || dep.starts_with("zlib");
                    if !is_lib || dep == "libc6" || !self.seen.insert(dep.clone()) {
                        continue;
                    }
                    let got = self.apt.fetch(&dep)?;
                    self.add_lib_dirs(&got);
                    self.fetched.push(got.clone());
                    next.push(got);
                }
            }
            if next.is_empty() {
                bail!(
                    "{} needs {} which neither this host nor its package's dependencies provide; \
                     install the package that ships it (apt-file search {})",
                    program.display(),
                    missing.join(", "),
                    missing[0]
                );
            }
            frontier = next;
        }
        bail!(
            "{}: libraries still missing after {LIB_FETCH_ROUNDS} rounds",
            program.display()
        )
    }

    /// (guest path -> host file) for each resolved library, and the sonames not found.
    fn ldd(&self, program: &Path) -> Result<(Vec<GuestFile>, Vec<String>)> {
        let search = std::env::join_paths(&self.dirs)?;
        let out = cmd::output(
            Command::new("ldd")
                .arg(program)
                .env("LD_LIBRARY_PATH", search),
        )
        .with_context(|| format!("ldd {}", program.display()))?;
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for line in out.lines().map(str::trim) {
            if let Some((soname, rest)) = line.split_once(" => ") {
                let target = rest.split(" (").next().unwrap_or("").trim();
                if target == "not found" {
                    missing.push(soname.to_owned());
                } else if !target.is_empty() {
                    found.push((format!("{GUEST_LIB_DIR}/{soname}"), PathBuf::from(target)));
                }
            } else if line.starts_with('/') {
                // The dynamic loader, e.g. "/lib64/ld-linux-x86-64.so.2 (0x...)".
                let path = line.split(" (").next().unwrap_or(line);
                found.push((path.to_owned(), PathBuf::from(path)));
            }
        }
        Ok((found, missing))
    }
}

/// Extracts the uncompressed kernel from a vmlinuz whose payload is xz: an ELF vmlinux has a
/// PVH note that QEMU boots directly, saving ~2.4 s of in-guest decompression under TCG.
/// Returns `None` if the payload is not xz, in which case the bzImage is booted instead.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<Option<PathBuf>> {
    if out.is_file() {
        return Ok(Some(out.to_path_buf()));
    }
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let Some(at) = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
        return Ok(None);
    };
    eprintln!("lab: extracting uncompressed vmlinux (once per kernel)");
    let payload = out.with_extension("xz");
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&payload, &image[at..])?;
    // --single-stream: the payload is followed by non-xz bytes of the bzImage.
    let tmp = out.with_extension("tmp");
    let status = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .arg(&payload)
        .stdout(fs::File::create(&tmp)?)
        .status()
        .context("running xz")?;
    let _ = fs::remove_file(&payload);
    let elf = fs::read(&tmp)
        .map(|d| d.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if !status.success() || !elf {
        let _ = fs::remove_file(&tmp);
        eprintln!("lab: vmlinuz payload did not decompress to an ELF; booting vmlinuz instead");
        return Ok(None);
    }
    fs::rename(&tmp, out)?;
    Ok(Some(out.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::module_name;

    #[test]
    fn module_names_normalise_dashes_and_suffixes() {
        assert_eq!(
            module_name("kernel/drivers/usb/usbip/vhci-hcd.ko"),
            "vhci_hcd"
        );
        assert_eq!(module_name("vhci_hcd"), "vhci_hcd");
        assert_eq!(module_name("kernel/crypto/crc64.ko.xz"), "crc64");
    }
}
