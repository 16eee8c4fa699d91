//! The byte pumps over a real socketpair: 64 MiB each way at once, byte-exact, and every way a
//! link ends.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use client::vhci::{Backend, KernelLink, LinkEnd, LinkOptions};

const TOTAL: usize = 64 * 1024 * 1024;

/// Deterministic bytes, cheap to regenerate on the checking side.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn options(threads: bool) -> LinkOptions {
    LinkOptions {
        force_threads: threads,
        ..LinkOptions::default()
    }
}

/// The "kernel" writes `TOTAL` bytes in uneven chunks and reads back what the async side
/// echoes; both directions are busy at once.
fn echo_64_mib(threads: bool) {
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let (link, handle) = KernelLink::start_with(OwnedFd::from(ours), &options(threads)).unwrap();
    let expected_backend = if threads {
        Backend::Threads
    } else {
        Backend::IoUring
    };
    assert_eq!(handle.backend(), expected_backend);

    let data = pattern(0x5eed, TOTAL);
    let started = Instant::now();
    let mut kernel_reader = kernel.try_clone().unwrap();
    let check = thread::spawn(move || {
        let expected = pattern(0x5eed, TOTAL);
        let mut got = vec![0u8; TOTAL];
        kernel_reader.read_exact(&mut got).unwrap();
        assert!(got == expected, "echoed bytes differ");
    });
    let writer = thread::spawn(move || {
        let mut at = 0;
        let mut size = 48;
        while at < data.len() {
            let end = (at + size).min(data.len());
            kernel.write_all(&data[at..end]).unwrap();
            at = end;
            size = (size * 7 + 13) % 300_000 + 1;
        }
        kernel
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let KernelLink { tx, mut rx } = link;
    let echoed = runtime.block_on(async move {
        let mut echoed = 0;
        while echoed < TOTAL {
            let bytes = rx.recv().await.expect("link ended early");
            echoed += bytes.len();
            tx.send(bytes).await.unwrap();
        }
        (echoed, tx, rx)
    });
    check.join().unwrap();
    let elapsed = started.elapsed();
    eprintln!(
        "{expected_backend:?}: 64 MiB each way in {elapsed:?} ({:.0} MiB/s each way)",
        64.0 / elapsed.as_secs_f64()
    );
    assert_eq!(echoed.0, TOTAL);

    // The kernel side closes (a detach): the pump reports it.
    drop(writer.join().unwrap());
    let end = runtime.block_on(handle.finished());
    assert!(matches!(end, LinkEnd::KernelClosed), "{end:?}");
    drop(echoed);
}

#[test]
fn io_uring_moves_64_mib_each_way_byte_exact() {
    echo_64_mib(false);
}

#[test]
fn threads_move_64_mib_each_way_byte_exact() {
    echo_64_mib(true);
}

fn ends(threads: bool) {
    // Shutdown: the kernel sees its socket close.
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let (link, handle) = KernelLink::start_with(OwnedFd::from(ours), &options(threads)).unwrap();
    handle.shutdown();
    assert!(matches!(handle.join(), LinkEnd::Shutdown));
    drop(link);
    let mut buf = [0u8; 8];
    assert_eq!(kernel.read(&mut buf).unwrap(), 0);

    // Every sender dropped: what was sent is written first, then the socket closes.
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let (link, handle) = KernelLink::start_with(OwnedFd::from(ours), &options(threads)).unwrap();
    let KernelLink { tx, rx } = link;
    tx.blocking_send(b"last words".to_vec()).unwrap();
    drop(tx);
    assert!(matches!(handle.join(), LinkEnd::SenderDropped));
    let mut got = Vec::new();
    kernel.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    drop(rx);

    // The receiver dropped: noticed at once (io_uring) or at the next bytes (threads).
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let (link, handle) = KernelLink::start_with(OwnedFd::from(ours), &options(threads)).unwrap();
    let KernelLink { tx, rx } = link;
    drop(rx);
    let _ = kernel.write_all(b"anyone?");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handle.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(handle.join(), LinkEnd::ReceiverDropped));
    drop(tx);

    // Bytes the async side is slow to take are held back, not lost.
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let small = LinkOptions {
        channel_capacity: 1,
        read_size: 4096,
        ..options(threads)
    };
    let (link, handle) = KernelLink::start_with(OwnedFd::from(ours), &small).unwrap();
    let KernelLink { tx, mut rx } = link;
    let payload = pattern(7, 1 << 20);
    let sent = payload.clone();
    let writer = thread::spawn(move || {
        kernel.write_all(&sent).unwrap();
        kernel
    });
    let mut got = Vec::new();
    while got.len() < payload.len() {
        thread::sleep(Duration::from_micros(50));
        got.extend(rx.blocking_recv().unwrap());
    }
    assert!(got == payload);
    drop(writer.join().unwrap());
    assert!(matches!(handle.join(), LinkEnd::KernelClosed));
    drop(tx);
}

#[test]
fn io_uring_link_ends_cleanly_every_way() {
    ends(false);
}

#[test]
fn threads_link_ends_cleanly_every_way() {
    ends(true);
}
