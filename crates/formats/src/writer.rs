//! Writing checkpoints: safetensors shards, the index and `config.json`.
//!
//! Tensors come in [`TensorGroup`]s (e.g. one quantized weight with its five companion tensors),
//! produced in parallel a window at a time and written in order, so memory stays bounded by a
//! window of groups whatever the checkpoint's size.
//!
//! Why not `safetensors::serialize_to_file`: it sorts tensors by dtype, which separates a
//! quantized weight from its companions (and needs every tensor's size before writing), so each
//! weight would have to be quantized twice or kept in memory until the end. Here the header space
//! is reserved first, the data streamed, and the header written last (padded with spaces, as the
//! format allows). Files are written under temporary names and renamed when complete, so an
//! interrupted run never leaves a checkpoint that looks whole.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::checkpoint::{DType, INDEX_FILE, SINGLE_FILE};
use crate::error::{FormatError, Result};

/// A tensor held in memory, ready to be written.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// A tensor from raw bytes; the length is checked when written.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Self {
        OwnedTensor {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    }

    /// An F32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(name, DType::F32, shape, data)
    }

    /// A BF16 tensor from f32 values (rounded to nearest even).
    pub fn bf16(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        Self::new(name, DType::BF16, shape, data)
    }
}

/// Work that produces some tensors, run when the writer reaches it.
pub type Producer<'a> = Box<dyn FnOnce() -> Result<Vec<OwnedTensor>> + Send + 'a>;

/// Tensors produced together: their names (known up front, to size the shard header), an
/// estimate of their bytes (to split shards) and the work that produces them.
pub struct TensorGroup<'a> {
    pub names: Vec<String>,
    pub approx_bytes: u64,
    pub produce: Producer<'a>,
}

impl<'a> TensorGroup<'a> {
    /// A group from its tensor names, a size estimate and a producer.
    pub fn new(
        names: Vec<String>,
        approx_bytes: u64,
        produce: impl FnOnce() -> Result<Vec<OwnedTensor>> + Send + 'a,
    ) -> Self {
        TensorGroup {
            names,
            approx_bytes,
            produce: Box::new(produce),
        }
    }
}

/// How shard files are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardNaming {
    /// `model-00001-of-00003.safetensors` … (Hugging Face, Unsloth).
    OneBased,
    /// `model-00000-of-00002.safetensors` … (OpenAI's gpt-oss repos: "of" is the last index).
    ZeroBased,
}

/// Options for [`write_checkpoint`].
pub struct WriteOptions {
    /// Start a new shard once this many bytes are in the current one (estimate).
    pub max_shard_bytes: u64,
    pub naming: ShardNaming,
    /// Always write an index, even for one shard (OpenAI style).
    pub force_index: bool,
    /// Called after each group with the bytes written so far.
    pub progress: Option<Box<dyn Fn(u64) + Sync>>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            max_shard_bytes: 5 << 30,
            naming: ShardNaming::OneBased,
            force_index: false,
            progress: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct WriteSummary {
    pub shards: Vec<PathBuf>,
    pub tensors: usize,
    pub bytes: u64,
}

fn dtype_name(d: DType) -> Result<&'static str> {
    d.safetensors_name()
        .ok_or_else(|| FormatError::Invalid("cannot write a tensor of unknown dtype".into()))
}

/// One safetensors file being streamed: header space reserved up front, written at the end.
struct ShardFile {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: BufWriter<File>,
    reserved: usize,
    header: Vec<(String, &'static str, Vec<usize>, usize, usize)>,
    offset: usize,
}

impl ShardFile {
    fn create(final_path: PathBuf, reserved: usize) -> Result<Self> {
        let tmp_path = final_path.with_extension("safetensors.partial");
        let file = File::create(&tmp_path).map_err(|e| FormatError::io(&tmp_path, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.seek(SeekFrom::Start(8 + reserved as u64))
            .map_err(|e| FormatError::io(&tmp_path, e))?;
        Ok(ShardFile {
            final_path,
            tmp_path,
            out,
            reserved,
            header: Vec::new(),
            offset: 0,
        })
    }

    fn push(&mut self, t: &OwnedTensor) -> Result<()> {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.data.len() != expected {
            return Err(FormatError::Invalid(format!(
                "internal: tensor `{}` has {} bytes, expected {expected} for {} {:?}",
                t.name,
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        self.out
            .write_all(&t.data)
            .map_err(|e| FormatError::io(&self.tmp_path, e))?;
        let start = self.offset;
        self.offset += t.data.len();
        self.header.push((
            t.name.clone(),
            dtype_name(t.dtype)?,
            t.shape.clone(),
            start,
            self.offset,
        ));
        Ok(())
    }

    fn finish(mut self) -> Result<PathBuf> {
        let mut map = serde_json::Map::new();
        map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        for (name, dtype, shape, s, e) in &self.header {
            map.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [s, e]}),
            );
        }
        let mut json = serde_json::to_vec(&map).expect("header serializes");
        if json.len() > self.reserved {
            return Err(FormatError::Invalid(format!(
                "internal: safetensors header of {} bytes exceeds the {} reserved",
                json.len(),
                self.reserved
            )));
        }
        json.resize(self.reserved, b' ');
        let io = |e| FormatError::io(&self.tmp_path, e);
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out
            .write_all(&(self.reserved as u64).to_le_bytes())
            .map_err(io)?;
        self.out.write_all(&json).map_err(io)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| FormatError::io(&self.tmp_path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| FormatError::io(&self.tmp_path, e))?;
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| FormatError::io(&self.final_path, e))?;
        Ok(self.final_path)
    }
}

/// Header bytes to reserve for a shard with these tensor names (generous: ~200 bytes of
/// dtype/shape/offsets per tensor beyond the name, rounded up to 8).
fn header_reserve(names_len: usize, count: usize) -> usize {
    (names_len + count * 200 + 256).next_multiple_of(8)
}

/// Writes a complete checkpoint directory: shards (+ index when more than one, or when forced)
/// and `config.json`. Refuses to write into a directory that already holds a checkpoint.
pub fn write_checkpoint(
    out: &Path,
    config_json: &str,
    groups: Vec<TensorGroup<'_>>,
    opts: WriteOptions,
) -> Result<WriteSummary> {
    if out.join("config.json").exists()
        || out.join(SINGLE_FILE).exists()
        || out.join(INDEX_FILE).exists()
    {
        return Err(FormatError::Invalid(format!(
            "{}: already holds a checkpoint; choose an empty or new directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| FormatError::io(out, e))?;

    // Assign groups to shards by estimated size.
    let mut shard_of = Vec::with_capacity(groups.len());
    let mut reserve: Vec<(usize, usize)> = vec![(0, 0)];
    let (mut shard, mut acc) = (0usize, 0u64);
    for g in &groups {
        if acc > 0 && acc + g.approx_bytes > opts.max_shard_bytes {
            shard += 1;
            acc = 0;
            reserve.push((0, 0));
        }
        acc += g.approx_bytes;
        shard_of.push(shard);
        reserve[shard].0 += g.names.iter().map(|n| n.len()).sum::<usize>();
        reserve[shard].1 += g.names.len();
    }
    let n_shards = shard + 1;
    let single = n_shards == 1 && !opts.force_index;
    let shard_name = |i: usize| -> String {
        if single {
            return SINGLE_FILE.to_string();
        }
        match opts.naming {
            ShardNaming::OneBased => format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards),
            ShardNaming::ZeroBased => format!("model-{:05}-of-{:05}.safetensors", i, n_shards - 1),
        }
    };

    let window = rayon::current_num_threads().max(2);
    let mut groups = groups.into_iter().zip(shard_of).peekable();
    let mut current: Option<(usize, ShardFile)> = None;
    let mut weight_map = BTreeMap::new();
    let mut summary = WriteSummary {
        shards: Vec::new(),
        tensors: 0,
        bytes: 0,
    };
    while groups.peek().is_some() {
        let batch: Vec<(TensorGroup<'_>, usize)> = groups.by_ref().take(window).collect();
        let produced: Vec<(Result<Vec<OwnedTensor>>, usize)> = batch
            .into_par_iter()
            .map(|(g, s)| ((g.produce)(), s))
            .collect();
        for (tensors, s) in produced {
            let tensors = tensors?;
            if current.as_ref().map(|(i, _)| *i) != Some(s) {
                if let Some((_, f)) = current.take() {
                    summary.shards.push(f.finish()?);
                }
                let path = out.join(shard_name(s));
                let (names_len, count) = reserve[s];
                current = Some((
                    s,
                    ShardFile::create(path, header_reserve(names_len, count))?,
                ));
            }
            let (_, f) = current.as_mut().expect("shard open");
            for t in &tensors {
                weight_map.insert(t.name.clone(), shard_name(s));
                f.push(t)?;
                summary.tensors += 1;
                summary.bytes += t.data.len() as u64;
            }
            if let Some(p) = &opts.progress {
                p(summary.bytes);
            }
        }
    }
    if let Some((_, f)) = current.take() {
        summary.shards.push(f.finish()?);
    }
    if !single {
        let index = serde_json::json!({"metadata": {"total_size": summary.bytes}, "weight_map": weight_map});
        write_atomic(
            &out.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)
                .expect("json")
                .as_bytes(),
        )?;
    }
    write_atomic(&out.join("config.json"), config_json.as_bytes())?;
    Ok(summary)
}

/// Writes a small file under a temporary name, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| FormatError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FormatError::io(path, e))
}
