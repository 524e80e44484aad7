//! Single-flight: callers asking for the same key while a load for it is running wait
//! for that load instead of starting their own. So a burst of cache misses for one
//! product costs the database one query per process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared, WeakShared};

type Flight<V> = Shared<BoxFuture<'static, V>>;

struct Entry<V> {
    id: u64,
    /// Weak: when every caller has gone, the load is dropped (with any database
    /// connection it holds) rather than kept for a caller who may never come.
    flight: WeakShared<BoxFuture<'static, V>>,
}

/// Loads in flight, by key.
pub struct Flights<V: Clone> {
    running: Arc<Mutex<HashMap<String, Entry<V>>>>,
    next_id: AtomicU64,
}

impl<V: Clone> Default for Flights<V> {
    fn default() -> Self {
        Self {
            running: Arc::default(),
            next_id: AtomicU64::new(0),
        }
    }
}

/// Removes its flight from the map when the flight ends, panics or is dropped unfinished,
/// unless a newer flight took the key meanwhile. Runs with the map unlocked: a flight is
/// only ever dropped outside the lock.
struct Landing<V> {
    running: Arc<Mutex<HashMap<String, Entry<V>>>>,
    key: String,
    id: u64,
}

impl<V> Drop for Landing<V> {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.get(&self.key).is_some_and(|e| e.id == self.id) {
            running.remove(&self.key);
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Flights<V> {
    /// The value of `load` for `key`, from the load already running for `key` if there
    /// is one. `load` runs only when none is. The load keeps running as long as any caller
    /// waits for it, even if the one that started it went away.
    pub async fn run<F>(&self, key: String, load: F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        self.join(key, load).await
    }

    /// The flight for `key`, joined or started. No await between looking and inserting,
    /// so two callers cannot both start one.
    fn join<F>(&self, key: String, load: F) -> Flight<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = running.get(&key).and_then(|e| e.flight.upgrade()) {
            return flight;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let landing = Landing {
            running: self.running.clone(),
            key: key.clone(),
            id,
        };
        let flight = async move {
            let value = load.await;
            drop(landing);
            value
        }
        .boxed()
        .shared();
        if let Some(weak) = flight.downgrade() {
            running.insert(key, Entry { id, flight: weak });
        }
        flight
    }

    /// Makes callers from now on start a new load for every key starting with `prefix`:
    /// a load running now may have read what a change just replaced.
    pub fn forget(&self, prefix: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| !key.starts_with(prefix));
    }

    /// Flights running for keys starting with `prefix` (tests).
    #[cfg(test)]
    pub fn in_flight(&self, prefix: &str) -> usize {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count()
    }

    /// Callers waiting for `key` (tests).
    #[cfg(test)]
    fn waiting(&self, key: &str) -> usize {
        let flight = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .and_then(|e| e.flight.upgrade());
        // Each waiting caller holds one handle, and this function one more.
        flight.and_then(|f| f.strong_count()).map_or(0, |n| n - 1)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::watch;

    use super::*;

    /// A load that counts its runs and finishes when `release` says so.
    fn load(
        runs: &Arc<AtomicUsize>,
        release: &watch::Receiver<bool>,
        value: u32,
    ) -> impl Future<Output = u32> + Send + 'static {
        let runs = runs.clone();
        let mut release = release.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = release.wait_for(|go| *go).await;
            value
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if check() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let callers: Vec<_> = (0..50)
            .map(|i| {
                let flights = flights.clone();
                let load = load(&runs, &released, i);
                tokio::spawn(async move { flights.run("product:1".into(), load).await })
            })
            .collect();
        until("every caller waits", || flights.waiting("product:1") == 50).await;
        release.send_replace(true);
        let mut values = Vec::new();
        for caller in callers {
            values.push(caller.await.expect("caller"));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one load for 50 callers");
        assert!(
            values.iter().all(|v| *v == values[0]),
            "all see the same value"
        );
        assert_eq!(flights.waiting("product:1"), 0, "the flight landed");

        // The next caller, after the flight, loads again.
        let again = flights
            .run("product:1".into(), load(&runs, &released, 99))
            .await;
        assert_eq!(again, 99);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn different_keys_load_separately() {
        let flights = Flights::<u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (_release, released) = watch::channel(true);
        let (a, b) = tokio::join!(
            flights.run("a".into(), load(&runs, &released, 1)),
            flights.run("b".into(), load(&runs, &released, 2)),
        );
        assert_eq!((a, b), (1, 2));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_forgotten_flight_is_not_joined_and_its_landing_spares_the_new_one() {
        let flights = Arc::new(Flights::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let old = {
            let flights = flights.clone();
            let load = load(&runs, &released, 1);
            tokio::spawn(async move { flights.run("product:7".into(), load).await })
        };
        until("the old flight runs", || flights.waiting("product:7") == 1).await;
        flights.forget("product:");
        let new = {
            let flights = flights.clone();
            let load = load(&runs, &released, 2);
            tokio::spawn(async move { flights.run("product:7".into(), load).await })
        };
        until("the new flight runs", || flights.waiting("product:7") == 1).await;
        release.send_replace(true);
        assert_eq!(old.await.expect("old"), 1);
        assert_eq!(new.await.expect("new"), 2, "a new load, not the old one");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_flight_whose_callers_all_left_is_removed() {
        let flights = Flights::<u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (_release, released) = watch::channel(false);
        let abandoned = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            flights.run("k".into(), load(&runs, &released, 1)),
        )
        .await;
        assert!(abandoned.is_err(), "still loading when abandoned");
        assert_eq!(flights.waiting("k"), 0);
        let (_release, released) = watch::channel(true);
        assert_eq!(flights.run("k".into(), load(&runs, &released, 2)).await, 2);
    }
}
