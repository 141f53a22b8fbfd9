//! The adapter cache: LoRA adapters loaded to run over a shared base, kept within a memory
//! budget of their own (least recently used out first). An adapter that cannot share its base
//! (it changes the pooler or the embeddings, or brings its own tokenizer) is remembered as such
//! and served merged, as a model of its own.

use crate::model::predict::adapter_serving::LoadedAdapter;
use candle_core::{DType, Device};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// What an adapter id resolves to for serving.
#[derive(Clone)]
pub enum Served {
    /// Over its shared base.
    Shared(Arc<LoadedAdapter>),
    /// Merged into a copy of its base.
    Merged,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, (Served, u64)>,
    clock: u64,
}

/// Loaded adapters by model id.
#[derive(Clone)]
pub struct AdapterCache {
    entries: Arc<Mutex<Entries>>,
    pub budget_bytes: usize,
}

impl AdapterCache {
    pub fn new(budget_mib: usize) -> Self {
        Self { entries: Arc::default(), budget_bytes: budget_mib << 20 }
    }

    /// Adapter `id` (files in `dir`) as served, loading it unless it is loaded.
    pub async fn get(&self, id: &str, dir: PathBuf, device: &Device, dtype: DType) -> anyhow::Result<Served> {
        if let Some(found) = self.touch(id) {
            return Ok(found);
        }
        let device = device.clone();
        let own_tokenizer = dir.join(crate::model::hf::artifacts::TOKENIZER).is_file();
        let loaded = tokio::task::spawn_blocking(move || LoadedAdapter::load(&dir, &device, dtype)).await??;
        let served = match loaded {
            Some(a) if !own_tokenizer => Served::Shared(Arc::new(a)),
            _ => Served::Merged,
        };
        let mut e = self.entries.lock();
        e.clock += 1;
        let clock = e.clock;
        e.by_id.insert(id.to_string(), (served.clone(), clock));
        self.enforce_budget(&mut e, id);
        Ok(served)
    }

    fn touch(&self, id: &str) -> Option<Served> {
        let mut e = self.entries.lock();
        e.clock += 1;
        let clock = e.clock;
        e.by_id.get_mut(id).map(|(served, used)| {
            *used = clock;
            served.clone()
        })
    }

    fn enforce_budget(&self, e: &mut Entries, keep: &str) {
        let bytes_of = |s: &Served| match s {
            Served::Shared(a) => a.bytes,
            Served::Merged => 0,
        };
        while e.by_id.values().map(|(s, _)| bytes_of(s)).sum::<usize>() > self.budget_bytes {
            let victim = e.by_id.iter().filter(|(k, (s, _))| k.as_str() != keep && bytes_of(s) > 0).min_by_key(|(_, (_, used))| *used);
            let Some(victim) = victim.map(|(k, _)| k.clone()) else { return };
            e.by_id.remove(&victim);
            metrics::counter!(crate::monitoring::ADAPTER_CACHE_EVICTIONS).increment(1);
        }
    }

    /// Runs `f` while holding the lock (the test hook of [`super::Predictor::panic_holding_locks`]).
    pub(super) fn with_lock_held(&self, f: impl FnOnce()) {
        let _e = self.entries.lock();
        f();
    }

    /// Forgets adapter `id` (it was deleted).
    pub fn evict(&self, id: &str) {
        self.entries.lock().by_id.remove(id);
    }

    /// Ids of the adapters loaded over a shared base now.
    pub fn loaded_ids(&self) -> Vec<String> {
        let e = self.entries.lock();
        let mut ids: Vec<String> = e.by_id.iter().filter(|(_, (s, _))| matches!(s, Served::Shared(_))).map(|(k, _)| k.clone()).collect();
        ids.sort();
        ids
    }
}
