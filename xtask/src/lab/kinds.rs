//! The device-kind tables: `kernel-notes/DEVICE-KINDS.md` and the short table in README.md,
//! regenerated from a run's `LAB-KIND` lines (the `kinds-*` scenarios), never written by hand.
//! One row per kind: its configfs function, the client-side driver, what was checked, and the
//! result through the kernel's own USB/IP beside ours; then the network adapters' figures and
//! the failures in detail. The text depends only on the lines, in the order they came.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where the full table goes, relative to the workspace.
pub const NOTES: &str = "kernel-notes/DEVICE-KINDS.md";
const README: &str = "README.md";
const BEGIN: &str = "<!-- kinds:begin -->";
const END: &str = "<!-- kinds:end -->";

/// One kind's two routes, in first-seen order.
struct Row<'a> {
    kernel: Option<&'a Value>,
    ours: Option<&'a Value>,
}

fn rows(kinds: &[Value]) -> Vec<(&str, Row<'_>)> {
    let mut order: Vec<&str> = Vec::new();
    let mut by: BTreeMap<&str, Row<'_>> = BTreeMap::new();
    for k in kinds {
        let name = k["kind"].as_str().unwrap_or("?");
        if !by.contains_key(name) {
            order.push(name);
        }
        let row = by.entry(name).or_insert(Row {
            kernel: None,
            ours: None,
        });
        match k["route"].as_str() {
            Some("kernel") => row.kernel = Some(k),
            Some("ours") => row.ours = Some(k),
            _ => {}
        }
    }
    order
        .into_iter()
        .filter_map(|n| by.remove(n).map(|r| (n, r)))
        .collect()
}

/// `pass (5/5)`, `FAIL: check`, `skip`, or `not run`.
fn cell(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "not run".into();
    };
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    let ok = checks
        .iter()
        .filter(|c| c["ok"] == Value::Bool(true))
        .count();
    match v["status"].as_str() {
        Some("pass") => format!("pass ({ok}/{})", checks.len()),
        Some("skip") => format!("skip: {}", text(&v["reason"])),
        _ => {
            let failed = checks
                .iter()
                .find(|c| c["ok"] == Value::Bool(false))
                .and_then(|c| c["name"].as_str())
                .unwrap_or("?");
            format!("**FAIL** at {failed} ({ok}/{} passed)", checks.len())
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or("")
        .replace('|', "\\|")
        .replace('\n', " ")
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into())
}

fn first<'a>(row: &Row<'a>) -> &'a Value {
    row.kernel.or(row.ours).unwrap_or(&Value::Null)
}

fn figure(v: Option<&Value>, name: &str) -> String {
    v.and_then(|v| v["figures"][name].as_f64())
        .map_or("-".into(), |f| format!("{f:.2}"))
}

/// The full document.
pub fn render_notes(kinds: &[Value], kernel: &str) -> String {
    let rows = rows(kinds);
    let mut s = String::new();
    s.push_str("# Device kinds: the kernel's USB/IP beside ours\n\n");
    s.push_str(
        "Generated from the `LAB-KIND` lines of the lab's `kinds-*` scenarios by `cargo xtask \
         kinds` (or any `cargo xtask lab run` that runs all of them); do not edit by hand. Each \
         kind is a configfs gadget on dummy_hcd, imported in the same boot through the \
         kernel's own USB/IP (`usbip attach -r 127.0.0.1`) and through ours (`p2p-usb-server` \
         to `p2p-usb-client attach` over iroh on loopback); the same checks run on the client \
         side each time. Every route also checks that the descriptors read through it equal \
         the gadget's and that the named drivers bind. The scenarios and checks are in \
         `xtask/src/bin/lab-guest/scenarios/kinds/`.\n\n",
    );
    s.push_str(&format!("Kernel: `{kernel}`.\n\n"));
    s.push_str("| kind | function(s) | client driver | checked | kernel USB/IP | ours |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- |\n");
    for (name, row) in &rows {
        let v = first(row);
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            text(&v["functions"]),
            list(&v["drivers"]),
            text(&v["covers"]),
            cell(row.kernel),
            cell(row.ours)
        ));
    }
    let nets: Vec<&(&str, Row<'_>)> = rows
        .iter()
        .filter(|(_, r)| {
            [r.kernel, r.ours].iter().flatten().any(|v| {
                v["figures"].get("ping_ms").is_some()
                    || v["figures"].get("to_gadget_mib_s").is_some()
            })
        })
        .collect();
    if !nets.is_empty() {
        s.push_str(
            "\n## Network adapters: figures\n\nPing RTT (average of 5) and one 2 MiB TCP stream \
             each way, between the client side and the gadget's network namespace; one run, \
             TCG, so compare the routes within a row, not across runs. `-`: the check did not \
             pass.\n\n",
        );
        s.push_str("| kind | RTT ms, kernel | RTT ms, ours | to gadget MiB/s, kernel | to gadget MiB/s, ours | from gadget MiB/s, kernel | from gadget MiB/s, ours |\n");
        s.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for (name, row) in nets {
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} |\n",
                figure(row.kernel, "ping_ms"),
                figure(row.ours, "ping_ms"),
                figure(row.kernel, "to_gadget_mib_s"),
                figure(row.ours, "to_gadget_mib_s"),
                figure(row.kernel, "from_gadget_mib_s"),
                figure(row.ours, "from_gadget_mib_s"),
            ));
        }
    }
    let failures: Vec<(&str, &str, &Value)> = rows
        .iter()
        .flat_map(|(n, r)| {
            [("kernel USB/IP", r.kernel), ("ours", r.ours)]
                .into_iter()
                .filter_map(move |(route, v)| Some((*n, route, v?)))
        })
        .filter(|(_, _, v)| v["status"] == "fail")
        .collect();
    if !failures.is_empty() {
        s.push_str("\n## Failures in detail\n\nEach check as it ran, then the kernel log and our daemons' warnings from that route.\n");
        for (name, route, v) in failures {
            s.push_str(&format!("\n### {name} through {route}\n\n"));
            for c in v["checks"].as_array().into_iter().flatten() {
                let mark = match c["ok"].as_bool() {
                    Some(true) => "ok",
                    Some(false) => "FAILED",
                    None => "not run",
                };
                let detail = text(&c["detail"]);
                s.push_str(&format!("- {} ({mark}): {detail}\n", text(&c["name"])));
            }
            let notes: Vec<String> = v["notes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            if !notes.is_empty() {
                s.push_str("\n```\n");
                for n in notes {
                    s.push_str(&n);
                    s.push('\n');
                }
                s.push_str("```\n");
            }
        }
    }
    s
}

/// The README's short table (between the markers).
pub fn render_short(kinds: &[Value]) -> String {
    let mut s = String::from(
        "| kind | client driver | kernel USB/IP | ours |\n| --- | --- | --- | --- |\n",
    );
    for (name, row) in rows(kinds) {
        let short = |v: Option<&Value>| match v.and_then(|v| v["status"].as_str()) {
            Some("pass") => "pass".to_owned(),
            Some("skip") => "skip".to_owned(),
            Some(_) => "**fail**".to_owned(),
            None => "not run".to_owned(),
        };
        s.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            list(&first(&row)["drivers"]),
            short(row.kernel),
            short(row.ours)
        ));
    }
    s
}

/// Writes both tables under `ws`.
pub fn write(ws: &Path, kinds: &[Value], kernel: &str) -> Result<()> {
    if kinds.is_empty() {
        bail!("the run produced no LAB-KIND lines");
    }
    let notes = ws.join(NOTES);
    fs::write(&notes, render_notes(kinds, kernel))
        .with_context(|| format!("writing {}", notes.display()))?;
    let readme = ws.join(README);
    let text = fs::read_to_string(&readme)?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{README} has no {BEGIN} ... {END} markers");
    };
    let updated = format!(
        "{}{BEGIN}\n{}{}",
        &text[..b],
        render_short(kinds),
        &text[e..]
    );
    fs::write(&readme, updated)?;
    eprintln!(
        "lab: wrote {NOTES} and the table in {README} from {} LAB-KIND lines",
        kinds.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_kind_failing_through_ours_shows_its_failed_check() {
        let kinds = vec![
            json!({"kind": "ecm", "functions": "ecm", "drivers": ["cdc_ether"], "covers": "ping",
                   "route": "kernel", "status": "pass",
                   "checks": [{"name": "ping", "ok": true, "detail": "RTT 1 ms"}],
                   "figures": {"ping_ms": 1.25}, "notes": []}),
            json!({"kind": "ecm", "functions": "ecm", "drivers": ["cdc_ether"], "covers": "ping",
                   "route": "ours", "status": "fail", "reason": "ping: timed out",
                   "checks": [{"name": "ping", "ok": false, "detail": "timed out"}],
                   "figures": {}, "notes": ["server: WARN x"]}),
        ];
        let notes = render_notes(&kinds, "6.1.0-57-amd64");
        assert!(notes.contains(
            "| ecm | ecm | `cdc_ether` | ping | pass (1/1) | **FAIL** at ping (0/1 passed) |"
        ));
        assert!(notes.contains("| ecm | 1.25 | - |"));
        assert!(notes.contains("### ecm through ours"));
        assert!(notes.contains("server: WARN x"));
        assert_eq!(
            render_short(&kinds),
            "| kind | client driver | kernel USB/IP | ours |\n| --- | --- | --- | --- |\n| ecm | `cdc_ether` | pass | **fail** |\n"
        );
    }
}
