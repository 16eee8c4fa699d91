//! The input buffer every incremental decoder in this crate shares.

/// A byte buffer that decoders append to and consume from the front of, without moving the
/// unread tail on every message.
#[derive(Debug, Default)]
pub(crate) struct InBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl InBuf {
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    pub fn unread(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// The first `N` unread bytes, if that many are buffered.
    pub fn peek_array<const N: usize>(&self) -> Option<[u8; N]> {
        self.unread().get(..N).map(|s| {
            let mut a = [0u8; N];
            a.copy_from_slice(s);
            a
        })
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
    }

    /// Takes the rest of the buffer, leaving it empty (phase hand-over).
    pub fn take_all(&mut self) -> Vec<u8> {
        let rest = self.unread().to_vec();
        self.bytes.clear();
        self.start = 0;
        rest
    }
}
