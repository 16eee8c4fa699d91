//! The host side of the lab's real host controller: QEMU's xHCI, the backends of the devices
//! scenarios plug into it, and the answers to their `LAB-HOST` requests (over QMP).
//!
//! Every host-side end lives in the run's directory (`.lab/run/`): QMP's socket, the answer
//! channel's socket, the disk image and the serial adapter's far end, which a thread here
//! echoes back and hashes so both directions can be checked.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::audio;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use xtask::qemu_usb::{self, FNV_START, QemuDevice, XHCI_BUS, XHCI_ID, fnv1a, op};

/// Size of the SuperSpeed disk's image (sparse).
const SSD_BYTES: u64 = 96 << 20;
/// How long QEMU gets to create its sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// What QEMU's audio device played, in the run's directory.
const AUDIO_FILE: &str = "audio.wav";
/// The trace event QEMU's FTDI model emits on SET_BAUDRATE, on QEMU's stderr.
const BAUD_TRACE: &str = "usb_serial_set_baud";

/// The run's directory and what QEMU needs on its command line for the xHCI and its devices.
pub struct Plan {
    dir: PathBuf,
    /// Devices this QEMU has (from `-device help`), by driver name.
    drivers: HashSet<String>,
}

impl Plan {
    /// Fresh backends in `dir` (cleared first), and the QEMU models this QEMU offers.
    pub fn prepare(dir: &Path) -> Result<Plan> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let img = fs::File::create(dir.join("ssd.img"))?;
        img.set_len(SSD_BYTES)?;
        let help = Command::new("qemu-system-x86_64")
            .args(["-device", "help"])
            .output()
            .context("asking QEMU for its device models")?;
        let text = String::from_utf8_lossy(&help.stdout);
        let mut drivers: HashSet<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name \""))
            .filter_map(|l| l.split('"').next())
            .map(str::to_owned)
            .collect();
        // The audio device records through the `wav` backend; without it, it is missing.
        let audio = Command::new("qemu-system-x86_64")
            .args(["-audiodev", "help"])
            .output()
            .context("asking QEMU for its audio backends")?;
        if !String::from_utf8_lossy(&audio.stdout)
            .lines()
            .any(|l| l.trim() == "wav")
        {
            drivers.remove("usb-audio");
        }
        Ok(Plan {
            dir: dir.to_path_buf(),
            drivers,
        })
    }

    /// Whether this QEMU has the xHCI at all.
    pub fn has_xhci(&self) -> bool {
        self.drivers.contains("qemu-xhci")
    }

    /// QEMU arguments: the xHCI (15 USB 2 and 15 USB 3 ports: when ports run out QEMU chains
    /// a full-speed hub and devices come up at the wrong speed), QMP, the answer channel as
    /// COM2, and every device's backend.
    pub fn qemu_args(&self) -> Vec<String> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        let mut args = vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path("qmp.sock")),
            "-chardev".into(),
            format!(
                "socket,id=lab-answers,path={},server=on,wait=off",
                path("answers.sock")
            ),
            // COM1 stays the console on stdio, as -nographic would have made it; naming any
            // serial port turns that default off, so it is named here too.
            "-serial".into(),
            "mon:stdio".into(),
            "-serial".into(),
            "chardev:lab-answers".into(),
        ];
        if self.has_xhci() {
            args.extend([
                "-device".into(),
                format!("qemu-xhci,id={XHCI_ID},p2=15,p3=15"),
                "-blockdev".into(),
                format!(
                    "driver=raw,node-name=ssd-img,file.driver=file,file.filename={}",
                    path("ssd.img")
                ),
                "-chardev".into(),
                format!(
                    "socket,id=ftdi-far,path={},server=on,wait=off",
                    path("ftdi.sock")
                ),
                "-trace".into(),
                BAUD_TRACE.into(),
            ]);
        }
        if self.has_xhci() && self.drivers.contains("usb-audio") {
            args.extend([
                "-audiodev".into(),
                format!(
                    "wav,id=lab-audio,path={},out.frequency={},out.channels=2,out.format=s16",
                    path(AUDIO_FILE),
                    audio::RATE
                ),
            ]);
        }
        args
    }

    /// Connects to the sockets QEMU just created.
    pub fn connect(&self) -> Result<Host> {
        let qmp = Qmp::connect(&self.dir.join("qmp.sock"))?;
        let answers = wait_connect(&self.dir.join("answers.sock"))?;
        let serial = Arc::new(Mutex::new(SerialStats::default()));
        if self.has_xhci() {
            let far = wait_connect(&self.dir.join("ftdi.sock"))?;
            let stats = serial.clone();
            thread::spawn(move || echo(far, &stats));
        }
        Ok(Host {
            qmp,
            answers,
            serial,
            drivers: self.drivers.clone(),
            has_xhci: self.has_xhci(),
            baud: None,
            audio: self.dir.join(AUDIO_FILE),
        })
    }

    /// The run directory, for `LAB-RUN`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What the serial adapter's far end received since the last reset.
struct SerialStats {
    bytes: u64,
    fnv: u64,
}

impl Default for SerialStats {
    fn default() -> Self {
        SerialStats {
            bytes: 0,
            fnv: FNV_START,
        }
    }
}

/// The far end of QEMU's `usb-serial`: sends back every byte, counting and hashing them.
fn echo(mut far: UnixStream, stats: &Mutex<SerialStats>) {
    let mut back = match far.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut buf = [0u8; 4096];
    loop {
        let n = match far.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            s.bytes += n as u64;
            s.fnv = fnv1a(s.fnv, &buf[..n]);
        }
        if back.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn wait_connect(path: &Path) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > SOCKET_WAIT => {
                return Err(e).with_context(|| format!("QEMU never offered {}", path.display()));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A QMP connection: one JSON object per line, asynchronous events in between.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let stream = wait_connect(path)?;
        stream.set_read_timeout(Some(QMP_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeted with {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))
            .map_err(|e| anyhow!("QMP capabilities: {e}"))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value> {
        let mut text = String::new();
        if self.reader.read_line(&mut text)? == 0 {
            bail!("QMP closed");
        }
        serde_json::from_str(&text).with_context(|| format!("QMP sent {text:?}"))
    }

    /// Runs a command; `Err` carries QEMU's own error text.
    fn execute(&mut self, command: &str, arguments: Value) -> std::result::Result<Value, String> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let reply = self.line().map_err(|e| format!("{e:#}"))?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let class = e["class"].as_str().unwrap_or("?");
                let desc = e["desc"].as_str().unwrap_or("?");
                return Err(format!("QEMU refused {command}: {desc} ({class})"));
            }
            // An event ("DEVICE_DELETED", ...): not the answer.
        }
    }
}

/// The host's side of a boot with the xHCI: answers scenarios' requests.
pub struct Host {
    qmp: Qmp,
    answers: UnixStream,
    serial: Arc<Mutex<SerialStats>>,
    drivers: HashSet<String>,
    has_xhci: bool,
    baud: Option<u64>,
    audio: PathBuf,
}

/// What a request comes to.
enum Answer {
    Ok(Value),
    Error(String),
    Missing(String),
}

impl Host {
    /// Notes what QEMU printed about the devices (its trace lines come on stderr).
    pub fn console_line(&mut self, line: &str) {
        if let Some(rest) = line.split(BAUD_TRACE).nth(1)
            && let Some(baud) = rest.rsplit(' ').next().and_then(|b| b.trim().parse().ok())
        {
            self.baud = Some(baud);
        }
    }

    /// Carries out one `LAB-HOST` request and writes the answer to the guest.
    pub fn request(&mut self, request: &Value) {
        let seq = request["seq"].clone();
        let answer = match self.carry_out(request) {
            Answer::Ok(v) => json!({"seq": seq, "ok": v}),
            Answer::Error(e) => {
                eprintln!("lab: host request {request} failed: {e}");
                json!({"seq": seq, "error": e})
            }
            Answer::Missing(m) => json!({"seq": seq, "missing": m}),
        };
        if let Err(e) = writeln!(self.answers, "{answer}") {
            eprintln!("lab: could not answer the guest: {e}");
        }
    }

    fn carry_out(&mut self, request: &Value) -> Answer {
        let op = request["op"].as_str().unwrap_or_default();
        let named = || {
            let name = request["device"].as_str().unwrap_or_default();
            qemu_usb::device(name).ok_or_else(|| {
                let known: Vec<&str> = qemu_usb::DEVICES.iter().map(|d| d.name).collect();
                format!(
                    "no lab device named {name:?}; the lab has {}",
                    known.join(", ")
                )
            })
        };
        match op {
            op::PLUG | op::UNPLUG => {
                let device = match named() {
                    Ok(d) => d,
                    Err(e) => return Answer::Error(e),
                };
                if !self.has_xhci || !self.drivers.contains(device.driver) {
                    let what = if self.has_xhci {
                        device.driver
                    } else {
                        "qemu-xhci"
                    };
                    return Answer::Missing(format!("this QEMU has no {what} device"));
                }
                let done = if op == op::PLUG {
                    self.plug(device)
                } else {
                    self.qmp.execute("device_del", json!({"id": device.name}))
                };
                match done {
                    Ok(_) => Answer::Ok(json!({})),
                    Err(e) => Answer::Error(e),
                }
            }
            op::KEYS => {
                let keys: Vec<&str> = request["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                for key in keys {
                    for down in [true, false] {
                        let event = json!({"events": [{"type": "key", "data": {
                            "down": down, "key": {"type": "qcode", "data": key}}}]});
                        if let Err(e) = self.qmp.execute("input-send-event", event) {
                            return Answer::Error(e);
                        }
                    }
                }
                Answer::Ok(json!({}))
            }
            op::SERIAL_STATS => {
                let s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                Answer::Ok(json!({"bytes": s.bytes, "fnv": s.fnv, "baud": self.baud}))
            }
            op::SERIAL_RESET => {
                *self.serial.lock().unwrap_or_else(|p| p.into_inner()) = SerialStats::default();
                self.baud = None;
                Answer::Ok(json!({}))
            }
            op::AUDIO => {
                let from = request["from"].as_u64().unwrap_or(audio::HEADER_BYTES);
                match fs::read(&self.audio) {
                    Ok(bytes) => {
                        let end = bytes.len() as u64;
                        let from = from.clamp(audio::HEADER_BYTES.min(end), end) as usize;
                        Answer::Ok(audio::analyse(&bytes[from..]).to_json(end))
                    }
                    Err(e) => Answer::Error(format!("reading {}: {e}", self.audio.display())),
                }
            }
            other => Answer::Error(format!("unknown host request {other:?}")),
        }
    }

    fn plug(&mut self, device: &QemuDevice) -> std::result::Result<Value, String> {
        let mut args = json!({"driver": device.driver, "id": device.name, "bus": XHCI_BUS});
        for (k, v) in device.props {
            args[*k] = json!(v);
        }
        self.qmp.execute("device_add", args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host whose QMP peer is a thread answering with `reply` (given each command), and the
    /// guest's end of the answer channel.
    fn host(
        drivers: &[&str],
        reply: impl Fn(&Value) -> Value + Send + 'static,
    ) -> (Host, BufReader<UnixStream>, thread::JoinHandle<Vec<Value>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qemu = thread::spawn(move || {
            let mut seen = Vec::new();
            let mut out = theirs.try_clone().unwrap();
            for line in BufReader::new(theirs).lines() {
                let command: Value = serde_json::from_str(&line.unwrap()).unwrap();
                // An event first: the client must skip it while waiting for the answer.
                writeln!(out, r#"{{"event":"DEVICE_DELETED","data":{{}}}}"#).unwrap();
                writeln!(out, "{}", reply(&command)).unwrap();
                seen.push(command);
            }
            seen
        });
        let (answers, guest) = UnixStream::pair().unwrap();
        let host = Host {
            qmp: Qmp {
                reader: BufReader::new(ours.try_clone().unwrap()),
                writer: ours,
            },
            answers,
            serial: Arc::new(Mutex::new(SerialStats::default())),
            drivers: drivers.iter().map(|d| d.to_string()).collect(),
            has_xhci: true,
            baud: None,
            audio: PathBuf::from("/nonexistent/audio.wav"),
        };
        (host, BufReader::new(guest), qemu)
    }

    fn answer(guest: &mut BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        guest.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    const ALL: &[&str] = &["usb-storage", "usb-serial", "usb-kbd"];

    #[test]
    fn a_plug_is_a_device_add_on_the_xhci_bus_with_the_backend() {
        let (mut h, mut guest, qemu) = host(ALL, |_| json!({"return": {}}));
        h.request(&json!({"seq": 7, "op": "plug", "device": "ssd"}));
        assert_eq!(answer(&mut guest), json!({"seq": 7, "ok": {}}));
        drop(h);
        let seen = qemu.join().unwrap();
        assert_eq!(
            seen,
            [json!({"execute": "device_add", "arguments": {
                "driver": "usb-storage", "id": "ssd", "bus": "xhci.0", "drive": "ssd-img"}})]
        );
    }

    #[test]
    fn qemus_refusal_reaches_the_scenario_in_qemus_words() {
        let (mut h, mut guest, _qemu) = host(
            ALL,
            |_| json!({"error": {"class": "GenericError", "desc": "Duplicate device ID 'kbd'"}}),
        );
        h.request(&json!({"seq": 1, "op": "plug", "device": "kbd"}));
        let a = answer(&mut guest);
        assert_eq!(a["seq"], 1);
        let e = a["error"].as_str().unwrap();
        assert!(e.contains("Duplicate device ID 'kbd'"), "{e}");
    }

    #[test]
    fn an_unknown_device_fails_with_the_known_ones_and_sends_nothing() {
        let (mut h, mut guest, qemu) = host(ALL, |_| json!({"return": {}}));
        h.request(&json!({"seq": 2, "op": "plug", "device": "webcam"}));
        let e = answer(&mut guest)["error"].as_str().unwrap().to_owned();
        assert!(
            e.contains("\"webcam\"") && e.contains("ssd, ftdi, audio, kbd"),
            "{e}"
        );
        h.request(&json!({"seq": 3, "op": "teleport"}));
        assert!(
            answer(&mut guest)["error"]
                .as_str()
                .unwrap()
                .contains("teleport")
        );
        drop(h);
        assert!(qemu.join().unwrap().is_empty());
    }

    #[test]
    fn a_device_this_qemu_lacks_is_missing_not_an_error() {
        let (mut h, mut guest, qemu) = host(&["usb-kbd"], |_| json!({"return": {}}));
        h.request(&json!({"seq": 4, "op": "plug", "device": "ftdi"}));
        let a = answer(&mut guest);
        assert!(a["missing"].as_str().unwrap().contains("usb-serial"), "{a}");
        h.has_xhci = false;
        h.request(&json!({"seq": 5, "op": "plug", "device": "kbd"}));
        assert!(
            answer(&mut guest)["missing"]
                .as_str()
                .unwrap()
                .contains("qemu-xhci")
        );
        drop(h);
        assert!(qemu.join().unwrap().is_empty());
    }

    #[test]
    fn keys_are_pressed_and_released_in_order() {
        let (mut h, mut guest, qemu) = host(ALL, |_| json!({"return": {}}));
        h.request(&json!({"seq": 6, "op": "keys", "keys": ["a", "b"]}));
        assert_eq!(answer(&mut guest)["ok"], json!({}));
        drop(h);
        let keys: Vec<(String, bool)> = qemu
            .join()
            .unwrap()
            .iter()
            .map(|c| {
                let e = &c["arguments"]["events"][0]["data"];
                (
                    e["key"]["data"].as_str().unwrap().into(),
                    e["down"].as_bool().unwrap(),
                )
            })
            .collect();
        let want = [("a", true), ("a", false), ("b", true), ("b", false)];
        assert_eq!(keys, want.map(|(k, d)| (k.to_owned(), d)));
    }

    #[test]
    fn serial_stats_count_what_the_far_end_saw_and_the_traced_baud() {
        let (mut h, mut guest, _qemu) = host(ALL, |_| json!({"return": {}}));
        {
            let mut s = h.serial.lock().unwrap();
            s.bytes = 3;
            s.fnv = fnv1a(FNV_START, b"abc");
        }
        h.console_line("usb_serial_set_baud dev 0:1 baud rate 57553");
        h.console_line("[guest] unrelated line with a number 12");
        h.request(&json!({"seq": 8, "op": "serial-stats"}));
        let ok = answer(&mut guest)["ok"].clone();
        assert_eq!(ok["bytes"], 3);
        assert_eq!(ok["fnv"], fnv1a(FNV_START, b"abc"));
        assert_eq!(ok["baud"], 57553);
        h.request(&json!({"seq": 9, "op": "serial-reset"}));
        answer(&mut guest);
        h.request(&json!({"seq": 10, "op": "serial-stats"}));
        let ok = answer(&mut guest)["ok"].clone();
        assert_eq!(
            (ok["bytes"].clone(), ok["baud"].clone()),
            (json!(0), Value::Null)
        );
    }
}
