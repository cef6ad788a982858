//! Single-flight gates: one async lock per key, so that concurrent cold requests for the
//! same thing wait for one fetch instead of each making it (registries rate-limit). Gates
//! are held weakly and pruned, so keys cost nothing once nobody waits on them.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

pub(crate) type Gate = Arc<tokio::sync::Mutex<()>>;

pub(crate) struct Gates {
    gates: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Dead entries are swept once the map holds this many.
    prune_at: usize,
}

impl Gates {
    pub(crate) fn new(prune_at: usize) -> Gates {
        Gates {
            gates: Mutex::new(HashMap::new()),
            prune_at,
        }
    }

    /// The gate for `key`; hold its lock while fetching, then look again for what the holder
    /// before you fetched.
    pub(crate) fn gate(&self, key: &str) -> Gate {
        let mut gates = self.gates.lock();
        if let Some(gate) = gates.get(key).and_then(Weak::upgrade) {
            return gate;
        }
        if gates.len() >= self.prune_at {
            gates.retain(|_, w| w.strong_count() > 0);
        }
        let gate = Gate::default();
        gates.insert(key.to_string(), Arc::downgrade(&gate));
        gate
    }
}
