//! The one way this crate takes a lock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`. A panic elsewhere while holding the lock leaves plain data behind (tables,
/// counters, outcomes), never a half-made invariant worth dying for: keep serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
