//! Which AEAD encrypts our QUIC packets: AES-GCM where the CPU has AES instructions,
//! ChaCha20-Poly1305 where it does not.
//!
//! Every byte of a URB is sealed once and opened once, so on a small CPU the cipher is a large
//! part of the cost per byte. Without AES instructions (a Raspberry Pi 4's Cortex-A72 has
//! none) AES-GCM runs as constant-time table-free code several times slower than ChaCha20,
//! which needs only adds, rotates and xors; with them AES-GCM is the faster one. TLS 1.3 lets
//! the client's order decide (a rustls server takes the client's first suite it supports), so
//! each side orders its suites by its own CPU and the client's choice wins; a client talking
//! to a server without AES can set `cipher = "chacha20"`. AES-128-GCM always stays on the list:
//! QUIC's Initial packets use it whatever is negotiated.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider};

/// The `cipher` key of either config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CipherSetting {
    /// AES-GCM if this CPU has AES instructions, else ChaCha20-Poly1305.
    #[default]
    Auto,
    /// Prefer AES-GCM.
    AesGcm,
    /// Prefer ChaCha20-Poly1305.
    #[serde(rename = "chacha20")]
    ChaCha20,
}

/// The AEAD an endpoint puts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256.
    AesGcm,
    /// TLS_CHACHA20_POLY1305_SHA256.
    ChaCha20,
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Suite::AesGcm => "AES-128-GCM",
            Suite::ChaCha20 => "ChaCha20-Poly1305",
        })
    }
}

impl CipherSetting {
    /// The suite to prefer on this machine.
    pub fn suite(self) -> Suite {
        self.suite_for(cpu_has_aes())
    }

    fn suite_for(self, has_aes: bool) -> Suite {
        match self {
            CipherSetting::AesGcm => Suite::AesGcm,
            CipherSetting::ChaCha20 => Suite::ChaCha20,
            CipherSetting::Auto if has_aes => Suite::AesGcm,
            CipherSetting::Auto => Suite::ChaCha20,
        }
    }
}

/// The suite `setting` picks here, logged once with why (a daemon's first lines say it).
pub fn chosen(setting: CipherSetting) -> Suite {
    let suite = setting.suite();
    let why = match setting {
        CipherSetting::Auto if cpu_has_aes() => "this CPU has AES instructions",
        CipherSetting::Auto => "this CPU has no AES instructions",
        _ => "set by cipher in the config",
    };
    tracing::info!("cipher: {suite} first ({why})");
    suite
}

/// Whether this CPU has AES and carry-less multiply instructions (what makes AES-GCM fast).
pub fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// ring's provider with the TLS 1.3 suites in `first`'s order of preference.
pub fn crypto_provider(first: Suite) -> Arc<CryptoProvider> {
    let aes = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let chacha = cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let cipher_suites = match first {
        Suite::AesGcm => vec![aes[0], aes[1], chacha],
        Suite::ChaCha20 => vec![chacha, aes[0], aes[1]],
    };
    Arc::new(CryptoProvider {
        cipher_suites,
        ..default_provider()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    #[test]
    fn auto_follows_the_cpu_and_a_setting_wins() {
        assert_eq!(CipherSetting::Auto.suite_for(true), Suite::AesGcm);
        assert_eq!(CipherSetting::Auto.suite_for(false), Suite::ChaCha20);
        assert_eq!(CipherSetting::AesGcm.suite_for(false), Suite::AesGcm);
        assert_eq!(CipherSetting::ChaCha20.suite_for(true), Suite::ChaCha20);
    }

    #[test]
    fn the_preferred_suite_comes_first_and_aes_128_always_stays() {
        for (first, want) in [
            (Suite::AesGcm, CipherSuite::TLS13_AES_128_GCM_SHA256),
            (Suite::ChaCha20, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
        ] {
            let p = crypto_provider(first);
            assert_eq!(p.cipher_suites[0].suite(), want);
            assert!(
                p.cipher_suites
                    .iter()
                    .any(|s| s.suite() == CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
        }
    }

    #[test]
    fn the_config_key_takes_three_words() {
        #[derive(serde::Deserialize)]
        struct C {
            cipher: CipherSetting,
        }
        let parse = |s: &str| serde_json::from_str::<C>(s).map(|c| c.cipher);
        assert_eq!(parse(r#"{"cipher":"auto"}"#).unwrap(), CipherSetting::Auto);
        assert_eq!(
            parse(r#"{"cipher":"aes-gcm"}"#).unwrap(),
            CipherSetting::AesGcm
        );
        assert_eq!(
            parse(r#"{"cipher":"chacha20"}"#).unwrap(),
            CipherSetting::ChaCha20
        );
        let e = parse(r#"{"cipher":"rot13"}"#).unwrap_err().to_string();
        assert!(e.contains("chacha20"), "{e}");
    }
}
