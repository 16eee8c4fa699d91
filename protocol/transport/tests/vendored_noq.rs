//! The vendored noq (`third_party/README.md`) packs more datagrams into one UDP send than
//! upstream does, and takes fewer per receive call. Its send batch must still fit one Linux GSO
//! send of the largest datagram iroh's QUIC sends: above that the kernel refuses the whole send
//! (`EMSGSIZE`) and noq drops it without a word, which the lab saw as thousands of lost packets
//! per connection.

/// UDP payload one IPv4 datagram can carry, and so one GSO send in all.
const MAX_GSO_SEND: u64 = 65_535 - 20 - 8;

/// The line of the vendored noq's `file` that starts with `start`.
fn vendored_line(file: &str, start: &str) -> String {
    let path = format!(
        "{}/../../third_party/noq/src/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let source = std::fs::read_to_string(path).expect("the vendored noq is in third_party/noq");
    source
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("noq's {file} no longer has a line starting {start:?}"))
        .to_owned()
}

/// `MAX_TRANSMIT_SEGMENTS` as the vendored source sets it.
fn vendored_batch() -> u64 {
    let line = vendored_line("connection.rs", "const MAX_TRANSMIT_SEGMENTS");
    let digits: String = line
        .split("new(")
        .nth(1)
        .expect("set with NonZeroUsize::new(n)")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a number")
}

#[test]
fn the_vendored_batch_is_larger_than_upstreams_and_fits_one_gso_send() {
    let batch = vendored_batch();
    let datagram = noq_proto::EndpointConfig::default().get_max_udp_payload_size();
    assert!(
        batch > 10,
        "the vendored noq batches {batch} datagrams, no more than upstream's 10: the patch is gone"
    );
    assert!(
        batch * datagram <= MAX_GSO_SEND,
        "{batch} datagrams of {datagram} bytes are {} bytes, past the {MAX_GSO_SEND} one GSO send \
         may carry",
        batch * datagram
    );
}

/// Each receive slot holds a whole GRO train (94 KB); upstream's 32 of them stayed resident in
/// every daemon, 2.9 MiB, the largest anonymous mapping the lab bench found. The vendored copy
/// offers 8, which the vendored iroh accepts (`busy_receiver.rs` receives through both).
#[test]
fn the_vendored_receive_batch_is_8() {
    let line = vendored_line("endpoint.rs", "const RECV_BATCH");
    assert!(
        line.ends_with("{ 8 };"),
        "the vendored noq's receive batch is no longer 8 ({line}): the patch is gone or changed"
    );
}
