//! A receiver busy with a stream must still send its own packets (ACKs, flow-control credit).
//! noq's connection driver used to spend Tokio's cooperative budget on incoming data, after
//! which the socket read as not writable and iroh dropped the datagram instead of waiting: in
//! the lab ~120 drops per 32 MiB read, each a lost packet and most a congestion event
//! (`third_party/README.md`). Loopback on a current-thread runtime, like the client's.

use iroh::{EndpointAddr, SecretKey};
use transport::{NetConfig, bind_endpoint};

const ALPN: &[u8] = b"rust-p2p-usb-test/busy-receiver";
const MIB: usize = 1024 * 1024;
/// Enough for the receiver's driver to take many datagrams per poll.
const SEND: usize = 64 * MIB;

#[tokio::test(flavor = "current_thread")]
async fn a_busy_receiver_loses_none_of_its_own_packets() {
    let net = NetConfig::loopback();
    let receiver = bind_endpoint(SecretKey::generate(), vec![ALPN.to_vec()], &net)
        .await
        .unwrap();
    let sender = bind_endpoint(SecretKey::generate(), vec![], &net)
        .await
        .unwrap();
    let addr = EndpointAddr::new(receiver.id()).with_ip_addr(receiver.bound_sockets()[0]);

    let receiving = tokio::spawn(async move {
        let conn = receiver.accept().await.unwrap().await.unwrap();
        let mut stream = conn.accept_uni().await.unwrap();
        let mut got = 0;
        while let Some(chunk) = stream.read_chunk(usize::MAX).await.unwrap() {
            got += chunk.len();
        }
        (got, conn, receiver)
    });
    let conn = sender.connect(addr, ALPN).await.unwrap();
    let mut stream = conn.open_uni().await.unwrap();
    let block = bytes::Bytes::from(vec![0x5a; MIB]);
    for _ in 0..SEND / MIB {
        stream.write_chunk(block.clone()).await.unwrap();
    }
    stream.finish().unwrap();
    let (got, received_on, _receiver) = receiving.await.unwrap();
    assert_eq!(got, SEND);
    let stats = received_on.stats();
    assert!(stats.sent_packets > 0);
    assert_eq!(
        stats.lost_packets, 0,
        "the receiver lost {} of its {} packets",
        stats.lost_packets, stats.sent_packets
    );
    conn.close(0u32.into(), b"done");
}
