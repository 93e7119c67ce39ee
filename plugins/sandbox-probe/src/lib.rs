//! Fixture task: try everything a sandboxed task must not be able to do and
//! report what worked.
//!
//! Input `{"ro_dir": "<a preopened read-only dir>" | null}` (or no input).
//! Output:
//!
//! ```json
//! {
//!   "readable": ["<paths it could open and read, or list>"],
//!   "env": ["<names of the environment variables it sees>"],
//!   "network": ["<network operations that succeeded>"],
//!   "ro_write": false,
//!   "errors": ["<what failed and why, for humans>"]
//! }
//! ```
//!
//! The paths tried are `/etc/passwd`, `/etc/hostname`, `/proc/self/environ`,
//! `/`, `..`, `../..`, `/root`, `/tmp`, plus `<ro_dir>/../..` when `ro_dir`
//! is set. The network operations are named `tcp connect 127.0.0.1:80`,
//! `tcp connect 127.0.0.1:22`, `tcp listen 127.0.0.1:0`, `udp bind 0.0.0.0:0`
//! and `dns resolve localhost`. `ro_write` is whether creating
//! `<ro_dir>/probe-write.txt` succeeded, `null` without `ro_dir`. A correctly
//! locked-down host yields empty `readable` (unless the host preopens one of
//! these paths on purpose), `env` and `network` lists and `ro_write: false`.
//!
//! The probe never panics: every failure is a line in `errors`.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Result};

const PATHS: [&str; 8] = [
    "/etc/passwd",
    "/etc/hostname",
    "/proc/self/environ",
    "/",
    "..",
    "../..",
    "/root",
    "/tmp",
];

/// One network operation; `Ok` means the sandbox let it through.
type Attempt = fn() -> std::io::Result<()>;

#[derive(Deserialize)]
struct Input {
    ro_dir: Option<String>,
}

#[derive(Serialize, Default)]
struct Report {
    readable: Vec<String>,
    env: Vec<String>,
    network: Vec<String>,
    ro_write: Option<bool>,
    errors: Vec<String>,
}

fn run(_ctx: &Context, input: Option<Input>) -> Result<Report> {
    let ro_dir = input.and_then(|input| input.ro_dir);
    let mut report = Report::default();

    let mut paths: Vec<String> = PATHS.iter().map(|path| (*path).to_owned()).collect();
    if let Some(dir) = &ro_dir {
        paths.push(format!("{dir}/../.."));
    }
    for path in paths {
        match try_read(&path) {
            Ok(()) => report.readable.push(path),
            Err(error) => report.errors.push(format!("read {path}: {error}")),
        }
    }

    let mut env: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    env.sort();
    report.env = env;

    let attempts: [(&str, Attempt); 5] = [
        ("tcp connect 127.0.0.1:80", || {
            TcpStream::connect("127.0.0.1:80").map(drop)
        }),
        ("tcp connect 127.0.0.1:22", || {
            TcpStream::connect("127.0.0.1:22").map(drop)
        }),
        ("tcp listen 127.0.0.1:0", || {
            TcpListener::bind("127.0.0.1:0").map(drop)
        }),
        ("udp bind 0.0.0.0:0", || {
            UdpSocket::bind("0.0.0.0:0").map(drop)
        }),
        ("dns resolve localhost", || {
            ("localhost", 80).to_socket_addrs().map(drop)
        }),
    ];
    for (name, attempt) in attempts {
        match attempt() {
            Ok(()) => report.network.push(name.to_owned()),
            Err(error) => report.errors.push(format!("{name}: {error}")),
        }
    }

    if let Some(dir) = &ro_dir {
        let path = format!("{dir}/probe-write.txt");
        let written = fs::File::create(&path).and_then(|mut file| file.write_all(b"probe\n"));
        match written {
            Ok(()) => {
                report.ro_write = Some(true);
                // Leave the read-only directory as it was; the report already
                // says the write got through.
                let _ = fs::remove_file(&path);
            }
            Err(error) => {
                report.ro_write = Some(false);
                report.errors.push(format!("create {path}: {error}"));
            }
        }
    }

    Ok(report)
}

/// Open and read a few bytes of a file, or list a directory.
fn try_read(path: &str) -> std::io::Result<()> {
    if fs::metadata(path)?.is_dir() {
        fs::read_dir(path)?.next().transpose()?;
    } else {
        // Reading even an empty file proves it was opened for reading.
        let mut buf = [0u8; 64];
        let _read: usize = fs::File::open(path)?.read(&mut buf)?;
    }
    Ok(())
}

wasmtask_guest::task!(run);
