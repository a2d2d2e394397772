//! The one way fleecefs takes a lock whose holder may have panicked.
//!
//! Release and dev builds abort on panic (`panic = "abort"`), so there a poisoned lock is
//! never seen: the process is gone. Tests unwind, and a test thread that panics while it
//! holds a lock must not turn every later lock of it into a second panic that hides the
//! first. What fleecefs guards with locks is never left half-updated across a call that
//! can panic (queues, maps of `Arc`s, `Option`s, headers written whole), so the data of
//! a poisoned lock is used as it is.

use std::sync::{LockResult, PoisonError};

/// Takes the guard out of a [`LockResult`], also when the lock is poisoned.
pub trait Recover<T> {
    /// The guard (or the guard and the wait result of a condition variable).
    fn recover(self) -> T;
}

impl<T> Recover<T> for LockResult<T> {
    fn recover(self) -> T {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().recover();
            panic!("poisons the lock");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.lock().recover(), 1);
    }
}
