//! The server's sessions over real iroh connections on loopback, against a scripted device:
//! allowlist, handshake, exclusive attach, URBs in flight, unlink, hostile frames, release.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use iroh::{Endpoint, EndpointAddr, SecretKey};
use protocol::usb::{Direction, EndpointNumber, Speed, TransferType, UrbStatus};
use protocol::wire::{
    ALPN, AttachHandle, AttachRefusal, Capabilities, ClassTriple, DeviceId, DeviceInfo, Event,
    UrbClientMessage, UrbComplete, UrbId, UrbServerMessage, UrbStreamOpen, UrbSubmit,
};
use server::config::{ShareRule, rule_from_spec};
use server::connection::{Allowlist, Policy, Server, ServerConfig};
use server::device::{CompletionSender, DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use tokio::sync::broadcast;
use transport::cipher::Suite;
use transport::{ClientError, FramedRecv, FramedSend, NetConfig, ServerConnection, bind_endpoint};

/// A loopback device: bulk OUT on endpoint 2 fills a buffer that bulk IN on endpoint 1 drains;
/// IN URBs wait for data.
struct Loopback {
    buffer: VecDeque<u8>,
    waiting: VecDeque<(UrbSubmit, CompletionSender)>,
    releases: Arc<AtomicUsize>,
    /// Every URB id the device was given, in order.
    submitted: Arc<std::sync::Mutex<Vec<u32>>>,
}

/// How long a client here waits on a silent server: what the daemon uses for its endpoint.
fn silent_after() -> Duration {
    NetConfig::loopback().dead_peer_bound()
}

fn done(id: UrbId, status: UrbStatus, data: Vec<u8>, actual: u32) -> UrbComplete {
    UrbComplete {
        id,
        status,
        actual_length: actual,
        data,
        iso: None,
        timing: None,
    }
}

impl Loopback {
    fn serve_waiting(&mut self) {
        while !self.buffer.is_empty() {
            let Some((urb, tx)) = self.waiting.pop_front() else {
                break;
            };
            let n = (urb.length as usize).min(self.buffer.len());
            let data: Vec<u8> = self.buffer.drain(..n).collect();
            let _ = tx.send(done(urb.id, UrbStatus::Ok, data, n as u32));
        }
    }
}

impl OpenedDevice for Loopback {
    fn submit(&mut self, urb: UrbSubmit, tx: CompletionSender) {
        self.submitted.lock().unwrap().push(urb.id.0);
        match (urb.endpoint.get(), urb.direction) {
            (0, Direction::In) => {
                let data = vec![0xab; urb.length as usize];
                let _ = tx.send(done(urb.id, UrbStatus::Ok, data, urb.length));
            }
            (2, Direction::Out) => {
                let n = urb.data.len() as u32;
                self.buffer.extend(urb.data);
                let _ = tx.send(done(urb.id, UrbStatus::Ok, vec![], n));
                self.serve_waiting();
            }
            (1, Direction::In) => {
                self.waiting.push_back((urb, tx));
                self.serve_waiting();
            }
            _ => {
                let _ = tx.send(done(urb.id, UrbStatus::Stall, vec![], 0));
            }
        }
    }

    fn cancel(&mut self, _: EndpointNumber, _: Direction, id: UrbId) {
        if let Some(pos) = self.waiting.iter().position(|(u, _)| u.id == id) {
            let (urb, tx) = self.waiting.remove(pos).unwrap();
            let _ = tx.send(done(urb.id, UrbStatus::Unlinked, vec![], 0));
        }
    }

    fn release(self: Box<Self>) {
        for (urb, tx) in self.waiting {
            let _ = tx.send(done(urb.id, UrbStatus::NoDevice, vec![], 0));
        }
        self.releases.fetch_add(1, Ordering::SeqCst);
    }
}

struct Source {
    info: DeviceInfo,
    events: broadcast::Sender<DeviceEvent>,
    releases: Arc<AtomicUsize>,
    submitted: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl DeviceSource for Source {
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![self.info.clone()]
    }
    fn open(&self, id: DeviceId) -> Result<Box<dyn OpenedDevice>, OpenError> {
        if id != self.info.id {
            return Err(OpenError::Gone(id));
        }
        Ok(Box::new(Loopback {
            buffer: VecDeque::new(),
            waiting: VecDeque::new(),
            releases: self.releases.clone(),
            submitted: self.submitted.clone(),
        }))
    }
    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }
}

fn info() -> DeviceInfo {
    DeviceInfo {
        id: DeviceId(7),
        bus_id: "1-1".into(),
        bus_number: 1,
        device_address: 2,
        vendor_id: 0x1209,
        product_id: 0x0001,
        bcd_device: 0x0100,
        class: ClassTriple {
            class: 0,
            subclass: 0,
            protocol: 0,
        },
        speed: Speed::High,
        manufacturer: None,
        product: Some("loopback".into()),
        serial: None,
        device_descriptor: vec![18, 1, 0, 2, 0, 0, 0, 64, 9, 18, 1, 0, 0, 1, 0, 2, 0, 1],
        configurations: vec![],
        active_configuration: 1,
    }
}

struct Lab {
    server_addr: EndpointAddr,
    source: Arc<Source>,
    releases: Arc<AtomicUsize>,
    server: Arc<Server>,
    _server: Endpoint,
}

async fn endpoint(alpns: Vec<Vec<u8>>, net: &NetConfig) -> Endpoint {
    bind_endpoint(SecretKey::generate(), alpns, net)
        .await
        .unwrap()
}

/// A server allowing `allowed` client keys (or anyone when `None`).
async fn lab(allowed: Option<&[&SecretKey]>) -> Lab {
    lab_with(allowed, vec![]).await
}

fn allowlist(allowed: Option<&[&SecretKey]>) -> Allowlist {
    match allowed {
        None => Allowlist::Anyone,
        Some(keys) => Allowlist::Only(keys.iter().map(|k| k.public()).collect::<HashSet<_>>()),
    }
}

/// A server with share rules that may carry PINs.
async fn lab_with(allowed: Option<&[&SecretKey]>, pins: Vec<ShareRule>) -> Lab {
    lab_on(allowed, pins, &NetConfig::loopback()).await
}

/// [`lab_with`] on an endpoint bound with `net`.
async fn lab_on(allowed: Option<&[&SecretKey]>, pins: Vec<ShareRule>, net: &NetConfig) -> Lab {
    let releases = Arc::new(AtomicUsize::new(0));
    let source = Arc::new(Source {
        info: info(),
        events: broadcast::channel(8).0,
        releases: releases.clone(),
        submitted: Arc::default(),
    });
    let config = ServerConfig {
        allow: allowlist(allowed),
        queue_depth: 8,
        pins,
        pin_penalty: Duration::from_millis(10),
        ..ServerConfig::default()
    };
    let ep = endpoint(vec![ALPN.to_vec()], net).await;
    let addr = EndpointAddr::new(ep.id()).with_ip_addr(ep.bound_sockets()[0]);
    let server = Server::new(source.clone(), config);
    tokio::spawn(server.clone().run(ep.clone()));
    Lab {
        server_addr: addr,
        source,
        releases,
        server,
        _server: ep,
    }
}

async fn client(lab: &Lab, key: &SecretKey) -> Result<Arc<ServerConnection>, ClientError> {
    client_on(lab, key, &NetConfig::loopback()).await
}

async fn client_on(
    lab: &Lab,
    key: &SecretKey,
    net: &NetConfig,
) -> Result<Arc<ServerConnection>, ClientError> {
    let ep = bind_endpoint(key.clone(), vec![], net).await.unwrap();
    connect_from(&ep, lab).await
}

/// A client connection to `lab`'s server from an endpoint that already exists.
async fn connect_from(ep: &Endpoint, lab: &Lab) -> Result<Arc<ServerConnection>, ClientError> {
    ServerConnection::connect(
        ep,
        lab.server_addr.clone(),
        Capabilities::TIMING.union(Capabilities::ORDERED_SUBMIT),
        "test",
        silent_after(),
    )
    .await
}

/// One URB stream, as the client holds it.
type Stream = (FramedSend<UrbClientMessage>, FramedRecv<UrbServerMessage>);

/// The loopback's bulk IN (endpoint 1) and bulk OUT (endpoint 2) URB streams.
async fn loopback_streams(c: &ServerConnection, handle: AttachHandle) -> (Stream, Stream) {
    let open = |n, direction| async move {
        c.open_urb_stream(handle, EndpointNumber::new(n).unwrap(), direction)
            .await
            .unwrap()
    };
    (open(1, Direction::In).await, open(2, Direction::Out).await)
}

fn submit(id: u32, ep: u8, direction: Direction, length: u32, data: Vec<u8>) -> UrbClientMessage {
    UrbClientMessage::Submit(UrbSubmit {
        id: UrbId(id),
        endpoint: EndpointNumber::new(ep).unwrap(),
        direction,
        transfer_type: TransferType::Bulk,
        flags: 0,
        setup: None,
        length,
        data,
        interval: 0,
        iso: None,
    })
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_preferring_different_ciphers_still_connect() {
    let with = |cipher| NetConfig {
        cipher,
        ..NetConfig::loopback()
    };
    for (server, client) in [
        (Suite::ChaCha20, Suite::AesGcm),
        (Suite::AesGcm, Suite::ChaCha20),
        (Suite::ChaCha20, Suite::ChaCha20),
    ] {
        let lab = lab_on(None, vec![], &with(server)).await;
        let conn = client_on(&lab, &SecretKey::generate(), &with(client))
            .await
            .unwrap_or_else(|e| panic!("server {server}, client {client}: {e}"));
        assert_eq!(conn.list_devices().await.unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_on_the_allowlist_gets_nothing() {
    let allowed = SecretKey::generate();
    let lab = lab(Some(&[&allowed])).await;
    let stranger = SecretKey::generate();
    match client(&lab, &stranger).await {
        Err(ClientError::NotAllowed) => {}
        Err(other) => panic!("expected NotAllowed, got {other}"),
        Ok(_) => panic!("a stranger got a session"),
    }
    let friend = client(&lab, &allowed).await.unwrap();
    assert_eq!(friend.list_devices().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_exclusive_and_urbs_flow_with_many_in_flight() {
    let lab = lab(None).await;
    let a = client(&lab, &SecretKey::generate()).await.unwrap();
    let b = client(&lab, &SecretKey::generate()).await.unwrap();
    assert!(a.welcome().capabilities.contains(Capabilities::TIMING));
    assert!(a.ping().await.unwrap() < Duration::from_secs(1));

    let (handle, device) = a.attach(DeviceId(7), None).await.unwrap();
    assert_eq!(device.product.as_deref(), Some("loopback"));
    assert!(matches!(
        b.attach(DeviceId(7), None).await,
        Err(ClientError::Refused(AttachRefusal::Busy))
    ));
    assert!(matches!(
        a.attach(DeviceId(99), None).await,
        Err(ClientError::Refused(AttachRefusal::Gone))
    ));

    let ((mut in_tx, mut in_rx), (mut out_tx, mut out_rx)) = loopback_streams(&a, handle).await;
    // Four reads in flight before any data exists, then one write that feeds them all.
    for id in 1..=4 {
        in_tx
            .queue(&submit(id, 1, Direction::In, 512, vec![]))
            .unwrap();
    }
    in_tx
        .queue(&submit(5, 1, Direction::In, 512, vec![]))
        .unwrap();
    in_tx.flush().await.unwrap();
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    out_tx
        .send(&submit(100, 2, Direction::Out, 2048, pattern.clone()))
        .await
        .unwrap();
    match out_rx.next().await.unwrap().unwrap() {
        UrbServerMessage::Complete(c) => {
            assert_eq!((c.status, c.actual_length), (UrbStatus::Ok, 2048))
        }
        other => panic!("{other:?}"),
    }
    let mut read = Vec::new();
    for id in 1..=4 {
        match in_rx.next().await.unwrap().unwrap() {
            UrbServerMessage::Complete(c) => {
                assert_eq!(c.id, UrbId(id), "completions in submission order");
                assert!(c.timing.is_some(), "timing was negotiated");
                read.extend(c.data);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(read, pattern, "byte-exact through the loopback");

    // URB 5 has no data to wait for: unlink it.
    in_tx
        .send(&UrbClientMessage::Unlink(UrbId(5)))
        .await
        .unwrap();
    let c = in_rx.next().await.unwrap().unwrap();
    assert!(
        matches!(c, UrbServerMessage::Complete(ref c) if c.status == UrbStatus::Unlinked),
        "{c:?}"
    );
    assert_eq!(
        in_rx.next().await.unwrap().unwrap(),
        UrbServerMessage::UnlinkDone {
            id: UrbId(5),
            cancelled: true
        }
    );
    in_tx
        .send(&UrbClientMessage::Unlink(UrbId(5)))
        .await
        .unwrap();
    assert_eq!(
        in_rx.next().await.unwrap().unwrap(),
        UrbServerMessage::UnlinkDone {
            id: UrbId(5),
            cancelled: false
        }
    );

    a.detach(handle).await.unwrap();
    assert_eq!(lab.releases.load(Ordering::SeqCst), 1);
    assert!(
        in_rx.next().await.unwrap().is_none(),
        "the stream ends with its attachment"
    );
    b.attach(DeviceId(7), None)
        .await
        .expect("free again after detach");
}

/// Large URBs go from their own buffers both ways (`queue_owned`), between small frames in
/// the same batch; a read sent to follow a write (`SubmitAfter`) waits for it on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_urbs_and_ordered_reads_cross_byte_exact() {
    const BIG: usize = 64 * 1024;
    let lab = lab(None).await;
    let a = client(&lab, &SecretKey::generate()).await.unwrap();
    assert!(
        a.welcome()
            .capabilities
            .contains(Capabilities::ORDERED_SUBMIT)
    );
    let (handle, _) = a.attach(DeviceId(7), None).await.unwrap();
    let ((mut in_tx, mut in_rx), (mut out_tx, mut out_rx)) = loopback_streams(&a, handle).await;
    // The reads go first, each to follow its write, which is not even sent yet.
    for id in 0..3u32 {
        let UrbClientMessage::Submit(urb) = submit(10 + id, 1, Direction::In, BIG as u32, vec![])
        else {
            unreachable!()
        };
        in_tx
            .queue_owned(UrbClientMessage::SubmitAfter {
                after: UrbId(100 + id),
                urb,
            })
            .unwrap();
    }
    in_tx.flush().await.unwrap();
    let pattern: Vec<u8> = (0..3 * BIG as u32)
        .map(|i| (i * 13 + i / 251) as u8)
        .collect();
    for (id, chunk) in pattern.chunks(BIG).enumerate() {
        let id = 100 + id as u32;
        out_tx
            .queue_owned(submit(id, 2, Direction::Out, BIG as u32, chunk.to_vec()))
            .unwrap();
        // A small frame between the large ones, in the same write.
        out_tx
            .queue_owned(submit(200 + id, 2, Direction::Out, 1, vec![0xee]))
            .unwrap();
    }
    out_tx.flush().await.unwrap();
    for _ in 0..6 {
        match out_rx.next().await.unwrap().unwrap() {
            UrbServerMessage::Complete(c) => assert_eq!(c.status, UrbStatus::Ok),
            other => panic!("{other:?}"),
        }
    }
    let mut read = Vec::new();
    for id in 0..3u32 {
        match in_rx.next().await.unwrap().unwrap() {
            UrbServerMessage::Complete(c) => {
                assert_eq!((c.id, c.status), (UrbId(10 + id), UrbStatus::Ok));
                read.extend(c.data);
            }
            other => panic!("{other:?}"),
        }
    }
    // The loopback hands out bytes in arrival order: each big write, then its small one.
    let mut want = Vec::new();
    for chunk in pattern.chunks(BIG) {
        want.extend_from_slice(chunk);
        want.push(0xee);
    }
    assert_eq!(read.len(), 3 * BIG);
    assert_eq!(read, want[..3 * BIG], "byte-exact, in order");
    let submitted = lab.source.submitted.lock().unwrap().clone();
    let at = |id: u32| submitted.iter().position(|&i| i == id).unwrap();
    for i in 0..3 {
        assert!(
            at(10 + i) > at(100 + i),
            "read {} reached the device only after its write: {submitted:?}",
            10 + i
        );
    }
    a.detach(handle).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_frame_closes_only_that_connection_and_frees_its_claim() {
    let lab = lab(None).await;
    let bad = client(&lab, &SecretKey::generate()).await.unwrap();
    let good = client(&lab, &SecretKey::generate()).await.unwrap();
    let (handle, _) = bad.attach(DeviceId(7), None).await.unwrap();
    let (send, _recv) = bad.connection().open_bi().await.unwrap();
    let mut send = send;
    // A length prefix far past the frame bound.
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0]).await.unwrap();
    let _ = handle;
    eventually("the claim is released", || {
        lab.releases.load(Ordering::SeqCst) == 1
    })
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(2), bad.connection().closed()).await;
    assert!(closed.is_ok(), "the hostile connection is closed");
    assert!(good.ping().await.is_ok(), "other sessions are untouched");
    good.attach(DeviceId(7), None)
        .await
        .expect("the device is free for others");
}

/// A replayed submission (an id still in flight) and an out-of-order frame (a second `Open`)
/// each close that peer's connection, free its claim, and leave the other session serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_or_out_of_order_urb_frame_closes_only_that_connection() {
    let lab = lab(None).await;
    let good = client(&lab, &SecretKey::generate()).await.unwrap();
    let ep1 = EndpointNumber::new(1).unwrap();
    for (round, replay) in [(1, true), (2, false)] {
        let bad = client(&lab, &SecretKey::generate()).await.unwrap();
        let (handle, _) = bad.attach(DeviceId(7), None).await.unwrap();
        let (mut tx, _rx) = bad
            .open_urb_stream(handle, ep1, Direction::In)
            .await
            .unwrap();
        // A bulk IN read waits for data that never comes, so its id stays in flight.
        let urb = submit(1, 1, Direction::In, 512, vec![]);
        tx.queue(&urb).unwrap();
        if replay {
            tx.queue(&urb).unwrap();
        } else {
            tx.queue(&UrbClientMessage::Open(UrbStreamOpen {
                handle,
                endpoint: ep1,
                direction: Direction::In,
            }))
            .unwrap();
        }
        tx.flush().await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), bad.connection().closed()).await;
        assert!(closed.is_ok(), "round {round}: the connection is closed");
        eventually("the claim is released", || {
            lab.releases.load(Ordering::SeqCst) == round
        })
        .await;
        assert!(good.ping().await.is_ok(), "other sessions are untouched");
    }
    let (handle, _) = good
        .attach(DeviceId(7), None)
        .await
        .expect("the device is free for others");
    good.detach(handle).await.unwrap();
}

/// What `p2p-usb-client run` does after a drop: close the connection, dial again from the same
/// endpoint, and claim the device anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_from_the_same_endpoint_after_closing_a_connection() {
    let lab = lab(None).await;
    let ep = bind_endpoint(SecretKey::generate(), vec![], &NetConfig::loopback())
        .await
        .unwrap();
    for round in 1..=3 {
        let conn = connect_from(&ep, &lab)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        conn.attach(DeviceId(7), None).await.unwrap();
        conn.close_connection();
        eventually("the claim is released", || {
            lab.releases.load(Ordering::SeqCst) == round
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_endpoint_closes_releases_its_claim_within_two_seconds() {
    let lab = lab(None).await;
    let key = SecretKey::generate();
    let ep = bind_endpoint(key, vec![], &NetConfig::loopback())
        .await
        .unwrap();
    let gone = ServerConnection::connect(
        &ep,
        lab.server_addr.clone(),
        Capabilities::default(),
        "t",
        silent_after(),
    )
    .await
    .unwrap();
    gone.attach(DeviceId(7), None).await.unwrap();
    // Close the whole endpoint instead of detaching: the server must release on its own.
    ep.close().await;
    drop(gone);
    let start = std::time::Instant::now();
    eventually("the claim is released", || {
        lab.releases.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
}

/// A SIGKILLed or frozen client sends nothing more, not even a close: only the idle timeout can
/// free its device. The client here runs on a runtime whose thread stops polling after the
/// attach, with its socket left open, and the server must still release within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_silent_loses_its_claim_within_two_seconds() {
    let lab = lab(None).await;
    let addr = lab.server_addr.clone();
    let (attached, silent) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let ep = bind_endpoint(SecretKey::generate(), vec![], &NetConfig::loopback())
                .await
                .unwrap();
            let conn =
                ServerConnection::connect(&ep, addr, Capabilities::default(), "t", silent_after())
                    .await
                    .unwrap();
            conn.attach(DeviceId(7), None).await.unwrap();
            // Let the acks and a keep-alive exchange settle, so the server's last word is not
            // an unanswered packet: that is the case where its own keep-alive adds to the wait.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = attached.send(std::time::Instant::now());
            loop {
                std::thread::park();
            }
        });
    });
    let silent_since = silent.await.unwrap();
    let bound = NetConfig::loopback().dead_peer_bound();
    while lab.releases.load(Ordering::SeqCst) == 0 {
        assert!(
            silent_since.elapsed() < Duration::from_secs(5),
            "a silent client kept its claim"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = silent_since.elapsed();
    assert!(
        took < Duration::from_secs(2) && took <= bound + Duration::from_millis(100),
        "released after {took:?}; the dead-peer bound is {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_ends_the_attachment_and_is_announced() {
    let lab = lab(None).await;
    let c = client(&lab, &SecretKey::generate()).await.unwrap();
    let mut events = c.take_events().unwrap();
    let (handle, _) = c.attach(DeviceId(7), None).await.unwrap();
    lab.source
        .events
        .send(DeviceEvent::Removed(DeviceId(7)))
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Event::AttachmentEnded { handle: h, .. } if h == handle),
        "{first:?}"
    );
    let second = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, Event::DeviceRemoved(DeviceId(7)));
    assert_eq!(lab.releases.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_clients_racing_for_one_device_exactly_one_wins() {
    let lab = lab(None).await;
    for round in 0..10 {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(client(&lab, &SecretKey::generate()).await.unwrap());
        }
        let mut attempts = tokio::task::JoinSet::new();
        for c in &clients {
            let c = c.clone();
            attempts.spawn(async move { c.attach(DeviceId(7), None).await });
        }
        let results: Vec<_> = attempts.join_all().await;
        let winners: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(ClientError::Refused(AttachRefusal::Busy))))
            .count();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert_eq!(busy, 3, "round {round}: the others get Busy");
        for c in &clients {
            c.close().await;
        }
        eventually("the winner's claim is released", || {
            lab.releases.load(Ordering::SeqCst) == round + 1
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_a_pin_needs_the_right_one() {
    let rule = ShareRule {
        matcher: rule_from_spec("1209:0001").unwrap(),
        pin: Some("2468".into()),
    };
    let lab = lab_with(None, vec![rule]).await;
    let c = client(&lab, &SecretKey::generate()).await.unwrap();
    assert!(matches!(
        c.attach(DeviceId(7), None).await,
        Err(ClientError::Refused(AttachRefusal::PinRequired))
    ));
    assert!(matches!(
        c.attach(DeviceId(7), Some("2469".into())).await,
        Err(ClientError::Refused(AttachRefusal::PinWrong))
    ));
    assert!(matches!(
        c.attach(DeviceId(7), Some("24680".into())).await,
        Err(ClientError::Refused(AttachRefusal::PinWrong))
    ));
    let (handle, _) = c.attach(DeviceId(7), Some("2468".into())).await.unwrap();
    let snap = lab.server.snapshot();
    assert!(snap.devices[0].pin);
    assert!(snap.devices[0].attached_to.is_some());
    c.detach(handle).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_connected_client_disconnects_it_and_frees_its_device() {
    let keep = SecretKey::generate();
    let drop = SecretKey::generate();
    let lab = lab(Some(&[&keep, &drop])).await;
    let dropped = client(&lab, &drop).await.unwrap();
    let kept = client(&lab, &keep).await.unwrap();
    dropped.attach(DeviceId(7), None).await.unwrap();
    eventually("both clients in the snapshot", || {
        lab.server.snapshot().clients.len() == 2
    })
    .await;

    lab.server.set_policy(Policy {
        allow: allowlist(Some(&[&keep])),
        pins: vec![],
    });
    eventually("the revoked client's device released", || {
        lab.releases.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        dropped.list_devices().await.is_err(),
        "revoked: no more requests"
    );
    kept.attach(DeviceId(7), None)
        .await
        .expect("the device is free for an allowed client");
    let snap = lab.server.snapshot();
    assert_eq!(snap.clients.len(), 1);
    assert_eq!(snap.clients[0].id, keep.public().to_string());
    assert_eq!(snap.clients[0].agent, "test");
    assert_eq!(snap.devices[0].attached_to, Some(keep.public().to_string()));
    assert!(matches!(
        client(&lab, &drop).await,
        Err(ClientError::NotAllowed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_counts_bytes_each_way() {
    let lab = lab(None).await;
    let c = client(&lab, &SecretKey::generate()).await.unwrap();
    let (handle, _) = c.attach(DeviceId(7), None).await.unwrap();
    let ((mut in_tx, mut in_rx), (mut out_tx, mut out_rx)) = loopback_streams(&c, handle).await;
    out_tx
        .send(&submit(1, 2, Direction::Out, 3000, vec![1; 3000]))
        .await
        .unwrap();
    out_rx.next().await.unwrap().unwrap();
    in_tx
        .send(&submit(2, 1, Direction::In, 1000, vec![]))
        .await
        .unwrap();
    in_rx.next().await.unwrap().unwrap();
    let d = &lab.server.snapshot().devices[0];
    assert_eq!(
        (d.bytes_to_device, d.bytes_from_device, d.urbs),
        (3000, 1000, 2)
    );
}
