//! A model directory on disk: `config.json` plus `model.safetensors` or an index with any number
//! of shards. Shards are memory-mapped; tensors are handed out as borrowed byte slices (zero copy).
//! Opening reads only the safetensors headers, so it is fast even for a 65 GB checkpoint.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::config::GptOssConfig;
use crate::error::{FormatError, Result};

/// Element type of a stored tensor, as named in the safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    BF16,
    F16,
    F32,
    F64,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
    Other,
}

impl DType {
    /// Bytes per element (0 for types the engine never reads).
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::BF16 | DType::F16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::Other => 0,
        }
    }

    /// Whether this is a floating-point type the engine can compute with.
    pub fn is_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }

    fn from_safetensors(d: safetensors::Dtype) -> Self {
        use safetensors::Dtype as S;
        match d {
            S::BF16 => DType::BF16,
            S::F16 => DType::F16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::BOOL => DType::Bool,
            _ => DType::Other,
        }
    }
}

impl DType {
    /// The name safetensors headers use (`"BF16"`, `"U8"`, …); `None` for [`DType::Other`].
    pub fn safetensors_name(self) -> Option<&'static str> {
        Some(match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::Bool => "BOOL",
            DType::Other => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name().unwrap_or("(other)"))
    }
}

/// How the mapped shards are about to be read (see [`Checkpoint::advise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Sparse,
    Sequential,
    Normal,
}

/// One tensor of a checkpoint: its metadata and its bytes in the mapped shard.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// The shard file holding it (for error messages).
    pub path: &'a Path,
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// An error about this tensor, naming its file.
    pub fn error(&self, problem: impl Into<String>) -> FormatError {
        FormatError::tensor(self.path, self.name, problem)
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Mmap,
}

#[derive(Debug)]
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A memory-mapped GPT-OSS checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: GptOssConfig,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Opens a model directory: parses `config.json`, maps every shard and reads its header.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(FormatError::NotFound(format!(
                "{}: not a directory (expected a model directory with config.json and *.safetensors)",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(FormatError::NotFound(format!(
                "{}: no config.json here; expected a Hugging Face model directory (config.json plus model.safetensors or model.safetensors.index.json)",
                dir.display()
            )));
        }
        let config = GptOssConfig::from_file(&config_path)?;
        let (files, index) = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let map = map_file(path)?;
            for (name, entry) in read_header(path, &map, i)? {
                if let Some(prev) = tensors.insert(name.clone(), entry) {
                    let other: &Path = &files[prev.shard];
                    return Err(FormatError::tensor(
                        path,
                        name,
                        format!(
                            "also present in {}; a tensor must be in one shard only",
                            other.display()
                        ),
                    ));
                }
            }
            shards.push(Shard {
                path: path.clone(),
                map,
            });
        }
        if let Some(index) = index {
            for (name, file) in &index.weight_map {
                match tensors.get(name) {
                    Some(e)
                        if files[e.shard]
                            .file_name()
                            .map(|f| f.to_string_lossy() == *file)
                            == Some(true) => {}
                    Some(e) => {
                        return Err(FormatError::tensor(
                            &files[e.shard],
                            name,
                            format!("the index says it is in {file}, but it was found here"),
                        ));
                    }
                    None => {
                        return Err(FormatError::tensor(
                            dir.join(file),
                            name,
                            format!("listed in {INDEX_FILE} but missing from that shard"),
                        ));
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
        })
    }

    /// The directory this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &GptOssConfig {
        &self.config
    }

    /// The shard files, in the order they were opened.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let (name, e) = self.tensors.get_key_value(name)?;
        let shard = &self.shards[e.shard];
        Some(TensorRef {
            name,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &shard.map[e.start..e.end],
            path: &shard.path,
        })
    }

    /// The tensor `name`, or an error saying it is missing.
    pub fn require(&self, name: &str) -> Result<TensorRef<'_>> {
        self.get(name).ok_or_else(|| self.missing(name, ""))
    }

    /// An error for a missing tensor, with an optional hint.
    pub fn missing(&self, name: &str, hint: &str) -> FormatError {
        FormatError::MissingTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        }
    }

    /// Iterates over every tensor.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        self.tensors
            .keys()
            .map(|n| self.get(n).expect("listed tensor"))
    }

    /// Tells the kernel how the mapped shards will be read next: [`Access::Sparse`] turns off
    /// read-around (each page fault reads one page, for scattered small reads such as the
    /// quant-state JSONs), [`Access::Sequential`] asks for aggressive read-ahead (uploading all
    /// weights). Advice only; errors are ignored.
    pub fn advise(&self, access: Access) {
        let advice = match access {
            Access::Sparse => memmap2::Advice::Random,
            Access::Sequential => memmap2::Advice::Sequential,
            Access::Normal => memmap2::Advice::Normal,
        };
        for s in &self.shards {
            let _ = s.map.advise(advice);
        }
    }

    /// Sum of all tensor data bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }
}

/// Finds the shard files: the index's files (sorted, deduplicated), or `model.safetensors`.
fn shard_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<IndexFile>)> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| FormatError::io(&index_path, e))?;
        let index: IndexFile = serde_json::from_str(&text).map_err(|e| {
            FormatError::file(
                &index_path,
                format!("malformed index (expected {{\"weight_map\": {{tensor: file}}}}): {e}"),
            )
        })?;
        let mut names: Vec<&String> = index
            .weight_map
            .values()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        names.sort();
        let mut files = Vec::new();
        for name in names {
            if name.contains('/') || name.contains('\\') || name == ".." {
                return Err(FormatError::file(
                    &index_path,
                    format!("shard name \"{name}\" must be a plain file name"),
                ));
            }
            let p = dir.join(name);
            if !p.exists() {
                return Err(FormatError::file(
                    &index_path,
                    format!(
                        "names shard \"{name}\", which does not exist in {} (incomplete download?)",
                        dir.display()
                    ),
                ));
            }
            files.push(p);
        }
        if files.is_empty() {
            return Err(FormatError::file(&index_path, "weight_map is empty"));
        }
        return Ok((files, Some(index)));
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok((vec![single], None));
    }
    Err(FormatError::NotFound(format!(
        "{}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE}",
        dir.display()
    )))
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified underneath a running engine is outside
    // what any loader can defend against (the same contract as safetensors' own mmap loading).
    unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))
}

/// One tensor's entry in a safetensors header, as [`parse_safetensors_header`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// Parses and validates the header of a whole safetensors file held in `bytes` (`path` only
/// names it in errors). Used by [`Checkpoint::open`] and by the fuzz targets.
pub fn parse_safetensors_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>> {
    Ok(read_header(path, bytes, 0)?
        .into_iter()
        .map(|(name, e)| HeaderEntry {
            name,
            dtype: e.dtype,
            shape: e.shape,
            range: e.start..e.end,
        })
        .collect())
}

/// Parses a safetensors header (through the `safetensors` crate, which also checks that the data
/// offsets are contiguous and match the file size) and returns each tensor's absolute byte range.
fn read_header(path: &Path, map: &[u8], shard: usize) -> Result<Vec<(String, Entry)>> {
    if map.len() < 8 {
        return Err(FormatError::file(
            path,
            format!(
                "truncated safetensors file: {} bytes, shorter than the 8-byte header length",
                map.len()
            ),
        ));
    }
    let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if header_len > (map.len() as u64).saturating_sub(8) {
        return Err(FormatError::file(
            path,
            format!(
                "safetensors header claims {header_len} bytes but the file has only {} bytes after the length field (truncated or not a safetensors file)",
                map.len() - 8
            ),
        ));
    }
    let (n, meta) = safetensors::SafeTensors::read_metadata(map).map_err(|e| {
        FormatError::file(
            path,
            format!("invalid safetensors header: {}", describe_st_error(&e)),
        )
    })?;
    let data_start = 8 + n;
    let data_len = map.len() - data_start;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        if e > data_len || s > e {
            return Err(FormatError::tensor(
                path,
                name,
                format!(
                    "data offsets {s}..{e} lie beyond the {data_len} data bytes of the file (truncated shard?)"
                ),
            ));
        }
        let dtype = DType::from_safetensors(info.dtype);
        if dtype == DType::Other {
            return Err(FormatError::tensor(
                path,
                name,
                format!("unsupported dtype {:?}", info.dtype),
            ));
        }
        out.push((
            name,
            Entry {
                shard,
                dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            },
        ));
    }
    Ok(out)
}

fn describe_st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the data section is shorter than the header says (truncated file)".into()
        }
        E::HeaderTooLarge => "header length is implausibly large (not a safetensors file?)".into(),
        E::HeaderTooSmall => "file too small for a safetensors header".into(),
        other => other.to_string(),
    }
}
