//! What QEMU's `usb-audio` played, read back from its WAV file: how much of it is tone, where
//! it falls silent, and the tone's frequency, so a scenario can check that a 1 kHz tone played
//! on the client came out of the device on the server as 1 kHz.
//!
//! QEMU's `wav` audio backend writes a 44-byte header, then 16-bit stereo frames as the device
//! hands them over; a frame the device never got is simply not in the file (there is no clock
//! that would insert silence), so missing audio shows as fewer tone frames than were played.

use serde_json::{Value, json};

/// The WAV header QEMU writes before the samples.
pub const HEADER_BYTES: u64 = 44;
/// Frames per second QEMU is told to write (`out.frequency`).
pub const RATE: u32 = 48_000;
/// Bytes per frame: 16-bit stereo.
const FRAME_BYTES: usize = 4;
/// Frames per analysis block: 1 ms, one full-speed iso packet's worth.
const BLOCK: usize = RATE as usize / 1000;
/// A block whose loudest left sample is below this is silent (a tone is played at ~12,000).
const SILENT_PEAK: i32 = 1_000;

/// The analysis of one stretch of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Whole frames in the stretch.
    pub frames: u64,
    /// Frames in 1 ms blocks with tone in them.
    pub tone_frames: u64,
    /// Silent blocks between the first and the last tone block (dropouts).
    pub gap_blocks: u64,
    /// Rising zero crossings of the left channel per second over the tone's span, or 0.
    pub freq_hz: f64,
}

impl Stats {
    /// The answer to a scenario's `audio` request.
    pub fn to_json(self, end: u64) -> Value {
        json!({
            "end": end,
            "frames": self.frames,
            "tone_frames": self.tone_frames,
            "gap_blocks": self.gap_blocks,
            "freq_hz": self.freq_hz,
        })
    }
}

/// Analyses 16-bit little-endian stereo samples (a partial last frame is ignored).
pub fn analyse(pcm: &[u8]) -> Stats {
    let left: Vec<i32> = pcm
        .chunks_exact(FRAME_BYTES)
        .map(|f| i32::from(i16::from_le_bytes([f[0], f[1]])))
        .collect();
    let loud: Vec<bool> = left
        .chunks(BLOCK)
        .map(|b| b.iter().any(|s| s.abs() >= SILENT_PEAK))
        .collect();
    let first = loud.iter().position(|&l| l);
    let last = loud.iter().rposition(|&l| l);
    let (Some(first), Some(last)) = (first, last) else {
        return Stats {
            frames: left.len() as u64,
            tone_frames: 0,
            gap_blocks: 0,
            freq_hz: 0.0,
        };
    };
    let tone_blocks = loud.iter().filter(|&&l| l).count() as u64;
    let span = &left[first * BLOCK..((last + 1) * BLOCK).min(left.len())];
    let rising = span.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
    Stats {
        frames: left.len() as u64,
        tone_frames: tone_blocks * BLOCK as u64,
        gap_blocks: (last - first + 1) as u64 - tone_blocks,
        freq_hz: rising as f64 * f64::from(RATE) / span.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f64, ms: usize) -> Vec<u8> {
        (0..ms * BLOCK)
            .flat_map(|i| {
                let s = (12_000.0 * (2.0 * std::f64::consts::PI * hz * i as f64 / 48_000.0).sin())
                    as i16;
                [s.to_le_bytes(), s.to_le_bytes()].concat()
            })
            .collect()
    }

    #[test]
    fn a_1khz_tone_between_silences_is_found_and_measured() {
        let mut pcm = vec![0u8; 100 * BLOCK * FRAME_BYTES];
        pcm.extend(tone(1000.0, 500));
        pcm.extend(vec![0u8; 50 * BLOCK * FRAME_BYTES]);
        let s = analyse(&pcm);
        assert_eq!(s.frames, 650 * BLOCK as u64);
        assert_eq!(s.tone_frames, 500 * BLOCK as u64);
        assert_eq!(s.gap_blocks, 0);
        assert!((s.freq_hz - 1000.0).abs() < 5.0, "{}", s.freq_hz);
    }

    #[test]
    fn dropouts_inside_the_tone_are_gaps() {
        let mut pcm = tone(1000.0, 100);
        pcm.extend(vec![0u8; 3 * BLOCK * FRAME_BYTES]);
        pcm.extend(tone(1000.0, 100));
        let s = analyse(&pcm);
        assert_eq!(s.gap_blocks, 3);
        assert_eq!(s.tone_frames, 200 * BLOCK as u64);
    }

    #[test]
    fn another_frequency_reads_as_itself_and_silence_as_nothing() {
        let s = analyse(&tone(440.0, 300));
        assert!((s.freq_hz - 440.0).abs() < 5.0, "{}", s.freq_hz);
        let quiet = analyse(&vec![0u8; 4000]);
        assert_eq!(
            (quiet.frames, quiet.tone_frames, quiet.freq_hz),
            (1000, 0, 0.0)
        );
        assert_eq!(analyse(&[1, 2, 3]).frames, 0);
    }
}
