//! The KV cache of one sequence: rotated keys and values per layer, in f32.
//!
//! Full-attention layers keep every position. Sliding layers keep only the last `sliding_window`
//! positions in a ring buffer (slot `j % window`): a query at index `t` never sees a key older
//! than `t - window + 1` (spec §2.2), so memory stays bounded however long the sequence grows.

use gptoss_formats::GptOssConfig;

/// Keys and values of one layer, `kv_dim` floats per position.
#[derive(Debug, Clone)]
pub struct LayerKv {
    kv_dim: usize,
    /// `Some(w)` for a sliding layer: only the last `w` positions are kept.
    window: Option<usize>,
    /// Positions appended so far (the sequence index of the next one).
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerKv {
    /// An empty cache for a layer with `kv_dim` floats per position.
    pub fn new(kv_dim: usize, window: Option<usize>) -> Self {
        LayerKv {
            kv_dim,
            window,
            len: 0,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Number of positions appended so far (not the number kept).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sliding window, if this is a sliding layer.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// The oldest sequence index still held.
    pub fn first_kept(&self) -> usize {
        match self.window {
            Some(w) => self.len.saturating_sub(w),
            None => 0,
        }
    }

    fn slot(&self, j: usize) -> usize {
        assert!(
            j < self.len && j >= self.first_kept(),
            "KV index {j} not held (kept {}..{})",
            self.first_kept(),
            self.len
        );
        match self.window {
            Some(w) => j % w,
            None => j,
        }
    }

    /// The key at sequence index `j` (all kv heads concatenated).
    pub fn key(&self, j: usize) -> &[f32] {
        let s = self.slot(j) * self.kv_dim;
        &self.k[s..s + self.kv_dim]
    }

    /// The value at sequence index `j`.
    pub fn value(&self, j: usize) -> &[f32] {
        let s = self.slot(j) * self.kv_dim;
        &self.v[s..s + self.kv_dim]
    }

    /// Appends one position's key and value (overwriting the oldest slot of a full ring).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        assert_eq!((k.len(), v.len()), (self.kv_dim, self.kv_dim));
        let kept = self.k.len() / self.kv_dim;
        match self.window {
            Some(w) if kept == w => {
                let s = (self.len % w) * self.kv_dim;
                self.k[s..s + self.kv_dim].copy_from_slice(k);
                self.v[s..s + self.kv_dim].copy_from_slice(v);
            }
            _ => {
                self.k.extend_from_slice(k);
                self.v.extend_from_slice(v);
            }
        }
        self.len += 1;
    }

    /// Bytes of K and V held.
    pub fn memory_bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * std::mem::size_of::<f32>()
    }
}

/// The KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache shaped for `config` (sliding layers get a `sliding_window` ring).
    pub fn new(config: &GptOssConfig) -> Self {
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let window = config.is_sliding(l).then_some(config.sliding_window);
                LayerKv::new(config.kv_dim(), window)
            })
            .collect();
        KvCache { layers }
    }

    /// Number of tokens appended (the sequence index of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    /// Whether no token was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The cache of layer `l`.
    pub fn layer(&self, l: usize) -> &LayerKv {
        &self.layers[l]
    }

    /// The cache of layer `l`, mutable.
    pub fn layer_mut(&mut self, l: usize) -> &mut LayerKv {
        &mut self.layers[l]
    }

    /// Bytes of K and V held over all layers.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::memory_bytes).sum()
    }

    /// Checks that this cache was made for `config` and that its layers agree on the length.
    pub fn check(&self, config: &GptOssConfig) -> Result<(), String> {
        if self.layers.len() != config.num_hidden_layers {
            return Err(format!(
                "the cache has {} layers, the model {}",
                self.layers.len(),
                config.num_hidden_layers
            ));
        }
        for (l, lc) in self.layers.iter().enumerate() {
            let window = config.is_sliding(l).then_some(config.sliding_window);
            if lc.kv_dim != config.kv_dim() || lc.window != window {
                return Err(format!(
                    "layer {l} of the cache is shaped for another model"
                ));
            }
            if lc.len != self.len() {
                return Err(format!(
                    "layer {l} holds {} positions, layer 0 {}",
                    lc.len,
                    self.len()
                ));
            }
        }
        Ok(())
    }
}
