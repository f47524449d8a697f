//! One async lock per object (container or network id): operations on one object run one
//! after the other, operations on different objects in parallel. Entries exist only while
//! someone holds or waits for the lock, so churn leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyedLocks {
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Held for the whole operation; dropping it releases the object.
pub struct Guard {
    guard: Option<OwnedMutexGuard<()>>,
    key: String,
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> Guard {
        let m = self.map.lock().unwrap().entry(key.to_string()).or_default().clone();
        let guard = m.lock_owned().await;
        Guard { guard: Some(guard), key: key.to_string(), map: self.map.clone() }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().unwrap();
        // Only the table itself still refers to it: nobody holds or waits for this lock.
        if map.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_serialises_other_keys_do_not_wait_and_nothing_stays() {
        let locks = Arc::new(KeyedLocks::default());
        let a = locks.lock("a").await;
        // Another key is free at once.
        let b = tokio::time::timeout(std::time::Duration::from_secs(1), locks.lock("b")).await.expect("b is free");
        // The same key waits until the holder lets go.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock("a").await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a second holder of `a` must wait");
        drop(a);
        let a2 = tokio::time::timeout(std::time::Duration::from_secs(1), waiter).await.unwrap().unwrap();
        drop((a2, b));
        assert_eq!(locks.len(), 0, "no entry outlives its holders");
    }
}
