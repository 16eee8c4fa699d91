//! Getting the lab's inputs from Debian with the package managers.
//!
//! Host tools (QEMU, depmod, xz) are installed with `apt-get install`; everything that goes
//! into the guest (kernel, busybox, usbip, bpftool, tc and their libraries) is fetched with
//! `apt-get download` and unpacked with `dpkg -x`, so the host's own kernel and packages are
//! never touched. Versions come from apt's candidates and feed the cache key.

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cmd;

/// The host programs the lab needs, with the Debian package that provides each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("ldd", "libc-bin"),
    ("dpkg-deb", "dpkg"),
];

/// One downloaded package and where its contents were unpacked.
#[derive(Clone, Debug)]
pub struct Pkg {
    /// Debian package name.
    pub name: String,
    /// The exact version downloaded.
    pub version: String,
    /// The `.deb` file.
    pub deb: PathBuf,
    /// Its `dpkg -x` tree.
    pub root: PathBuf,
}

/// apt access for one lab build; remembers whether `apt-get update` already ran.
pub struct Apt {
    debs: PathBuf,
    pkgs: PathBuf,
    updated: Cell<bool>,
}

impl Apt {
    /// Keeps `.deb` files in `<lab>/debs` and unpacked trees in `<lab>/pkgs`.
    pub fn new(lab_dir: &Path) -> Result<Self> {
        let apt = Apt {
            debs: lab_dir.join("debs"),
            pkgs: lab_dir.join("pkgs"),
            updated: Cell::new(false),
        };
        fs::create_dir_all(&apt.debs)?;
        fs::create_dir_all(&apt.pkgs)?;
        Ok(apt)
    }

    /// Installs missing host tools with `apt-get install`, or says which command would.
    pub fn ensure_host_tools(&self) -> Result<()> {
        install_missing("the lab", HOST_TOOLS, cmd::exists)
    }

    /// Runs `apt-get update` at most once per build: lookups fail on a fresh machine whose
    /// package lists were never fetched or have gone stale.
    fn update(&self) -> Result<()> {
        if self.updated.replace(true) {
            return Ok(());
        }
        if !is_root() {
            bail!("apt's package lists look missing or stale; run: sudo apt-get update");
        }
        eprintln!("lab: apt-get update");
        cmd::status(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed; check the Debian mirrors in /etc/apt/sources.list.d")
    }

    /// Runs an apt query, retrying once after `apt-get update` when it fails or finds nothing.
    fn query(&self, args: &[&str], what: &str) -> Result<String> {
        let attempt = || cmd::output(Command::new(args[0]).args(&args[1..]));
        match attempt() {
            Ok(out) if !out.trim().is_empty() => return Ok(out),
            _ => self.update()?,
        }
        let out = attempt().with_context(|| format!("apt cannot find {what}"))?;
        if out.trim().is_empty() {
            bail!("apt cannot find {what}; check `{}`", args.join(" "));
        }
        Ok(out)
    }

    /// The versioned kernel package that Debian's `linux-image-amd64` currently points at,
    /// so the lab follows kernel security updates without a hardcoded ABI name.
    pub fn kernel_package(&self) -> Result<String> {
        let out = self.query(
            &["apt-cache", "depends", "linux-image-amd64"],
            "linux-image-amd64",
        )?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|d| d.starts_with("linux-image-") && !d.starts_with('<'))
            .map(str::to_owned)
            .context("linux-image-amd64 has no linux-image-* dependency; run apt-get update")
    }

    /// apt's candidate version of `name`.
    pub fn candidate(&self, name: &str) -> Result<String> {
        let out = self.query(
            &["apt-cache", "show", "--no-all-versions", name],
            &format!("package {name}"),
        )?;
        out.lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("apt-cache show {name} printed no Version"))
    }

    /// Downloads (if not already here) and unpacks the candidate version of `name`. A
    /// download that fails on lists apt has not refreshed in this build (a machine image's
    /// lists name versions the mirror has since replaced: 404) refreshes them and tries the
    /// new candidate once.
    pub fn fetch(&self, name: &str) -> Result<Pkg> {
        match self.fetch_candidate(name) {
            Err(e) if !self.updated.get() => {
                eprintln!("lab: {e:#}");
                eprintln!("lab: refreshing apt's package lists and trying {name} again");
                self.update()?;
                self.fetch_candidate(name)
            }
            done => done,
        }
    }

    fn fetch_candidate(&self, name: &str) -> Result<Pkg> {
        let version = self.candidate(name)?;
        let deb = match self.find_deb(name, &version)? {
            Some(deb) => deb,
            None => {
                eprintln!("lab: downloading {name} {version}");
                cmd::output(
                    Command::new("apt-get")
                        .args(["download", "-q", &format!("{name}={version}")])
                        .current_dir(&self.debs),
                )
                .with_context(|| {
                    format!("could not download {name}; try `apt-get update`, then `apt-get download {name}`")
                })?;
                self.find_deb(name, &version)?.with_context(|| {
                    format!(
                        "apt-get download {name} left no .deb in {}",
                        self.debs.display()
                    )
                })?
            }
        };
        let root = self
            .pkgs
            .join(format!("{name}_{}", version.replace(':', "_")));
        if !root.join(".unpacked").exists() {
            let tmp = root.with_extension("tmp");
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp)?;
            cmd::output(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
            let _ = fs::remove_dir_all(&root);
            fs::rename(&tmp, &root)?;
            fs::write(root.join(".unpacked"), "")?;
        }
        Ok(Pkg {
            name: name.to_owned(),
            version,
            deb,
            root,
        })
    }

    /// apt names files `<name>_<version with ':' as %3a>_<arch>.deb`.
    fn find_deb(&self, name: &str, version: &str) -> Result<Option<PathBuf>> {
        let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
        for entry in fs::read_dir(&self.debs)? {
            let path = entry?.path();
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            if file.starts_with(&prefix) && file.ends_with(".deb") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }
}

/// The packages a `.deb` declares in `Depends` (first alternative of each, no versions).
pub fn depends(pkg: &Pkg) -> Result<Vec<String>> {
    let out = cmd::output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&pkg.deb)
            .arg("Depends"),
    )?;
    Ok(parse_depends(&out))
}

fn parse_depends(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let name = first.split([' ', '(']).next()?.trim();
            let name = name.split(':').next()?;
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

/// Installs with apt the package of each `(proof, package)` pair whose proof (a program on
/// `PATH` or a file, as `present` checks) is missing, refreshing stale package lists once;
/// without root it says which command would. `purpose` names who needs them, for the messages.
pub fn install_missing(
    purpose: &str,
    wanted: &[(&str, &str)],
    present: impl Fn(&str) -> bool,
) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(proof, _)| !present(proof))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let fix = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!(
            "{purpose} needs {}; install with: sudo {fix}",
            missing.join(", ")
        );
    }
    eprintln!("{purpose}: installing {}", missing.join(" "));
    let install = || {
        cmd::status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        // A fresh machine may never have fetched its package lists.
        eprintln!("{purpose}: apt-get update");
        cmd::status(Command::new("apt-get").args(["update", "-q"])).context(
            "apt-get update failed; check the Debian mirrors in /etc/apt/sources.list.d",
        )?;
        install().with_context(|| format!("could not install them; try: {fix}"))?;
    }
    for (proof, pkg) in wanted {
        if !present(proof) {
            bail!("`{proof}` is still missing after installing {pkg}; try: {fix}");
        }
    }
    Ok(())
}

fn is_root() -> bool {
    // `id -u` avoids an unsafe geteuid() call for a check that runs once per build.
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|out| out.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::parse_depends;

    #[test]
    fn depends_field() {
        let d = "usb.ids, libc6 (>= 2.34), debconf (>= 0.5) | debconf-2.0, libfoo1:any";
        assert_eq!(parse_depends(d), ["usb.ids", "libc6", "debconf", "libfoo1"]);
        assert!(parse_depends("").is_empty());
    }
}
