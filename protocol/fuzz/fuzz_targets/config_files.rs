//! The server's and the client's TOML config parsers on whatever a user (or an editor gone
//! wrong) could leave in the file: they must never panic, and every refusal must point at a
//! real spot in the file (path, line, column), which is what the operator is told to fix.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

const PATH: &str = "/etc/p2p-usb/fuzz.toml";

fn check_spot(message: String, path: &Path, line: usize, column: usize, text: &str) {
    assert_eq!(path, Path::new(PATH), "{message}");
    let lines = text.lines().count().max(1) + 1;
    assert!((1..=lines).contains(&line), "line {line} of {lines}: {message}");
    assert!(column >= 1, "column 0: {message}");
}

fuzz_target!(|input: (bool, &str)| {
    let (server, text) = input;
    let path = Path::new(PATH);
    if server {
        use server::config::{Config, ConfigError};
        match Config::parse(text, path) {
            Ok(_) => {}
            Err(ConfigError::Invalid { path, line, column, message }) => {
                check_spot(message, &path, line, column, text)
            }
            Err(other) => panic!("parsing text gave a non-parse error: {other}"),
        }
    } else {
        use client::config::{Config, ConfigError};
        match Config::parse(text, path) {
            Ok(_) => {}
            Err(ConfigError::Invalid { path, line, column, message }) => {
                check_spot(message, &path, line, column, text)
            }
            Err(other) => panic!("parsing text gave a non-parse error: {other}"),
        }
    }
});
