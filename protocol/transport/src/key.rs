//! The endpoint's secret key on disk: the server's (and client's) identity across restarts.

use std::path::{Path, PathBuf};

use iroh::SecretKey;

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but does not hold a key.
    #[error(
        "key file {0} does not hold a 32-byte secret key; move it away to create a new identity"
    )]
    Malformed(PathBuf),
    /// Others may read the key: refuse rather than use a leaked identity silently.
    #[error("key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the key at `path`, or creates one there (mode 0600, parent directories 0700) if there
/// is none.
pub async fn load_or_create_secret_key(path: &Path) -> Result<SecretKey, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let mode = tokio::fs::metadata(path)
                .await
                .map_err(io)?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode: mode & 0o777,
                });
            }
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| KeyError::Malformed(path.to_owned()))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await.map_err(io)?;
            }
            let key = SecretKey::generate();
            let mut options = tokio::fs::OpenOptions::new();
            options.write(true).create_new(true).mode(0o600);
            let mut file = options.open(path).await.map_err(io)?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &key.to_bytes())
                .await
                .map_err(io)?;
            tokio::io::AsyncWriteExt::flush(&mut file)
                .await
                .map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn creates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let first = load_or_create_secret_key(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create_secret_key(&path).await.unwrap();
        assert_eq!(first.public(), second.public());
    }

    #[tokio::test]
    async fn refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create_secret_key(&path).await,
            Err(KeyError::Malformed(_))
        ));
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_secret_key(&path).await,
            Err(KeyError::Permissions { .. })
        ));
    }
}
