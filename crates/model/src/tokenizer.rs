//! The o200k_harmony tokenizer used by GPT-OSS.
//!
//! Two interchangeable sources give the same token ids:
//!
//! - [`Tokenizer::embedded`]: the vocabulary compiled into the `tiktoken-rs` crate
//!   (`o200k_harmony()`); needs no file and no network.
//! - [`Tokenizer::from_tokenizer_json`]: a Hugging Face `tokenizer.json` (the one shipped with the
//!   checkpoints), read through the `tokenizers` crate.
//!
//! [`Tokenizer::for_model_dir`] picks the file when the checkpoint has one, else the embedded
//! vocabulary.
//!
//! Only *encoding* goes through the two backends. Decoding always uses a byte table built from the
//! source's vocabulary ([`Tokenizer::token_bytes`]), so [`Tokenizer::decode`] and
//! [`StreamDecoder`] behave identically whatever the source, and they see the raw bytes of tokens
//! that split a multi-byte UTF-8 character (the `tokenizers` crate only exposes lossy strings).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use tokenizers::pipeline::{EncodeOptions, PipelineTokenizer};

/// `<|startoftext|>`: HF `bos_token`; not used in Harmony prompts.
pub const STARTOFTEXT: u32 = 199_998;
/// `<|endoftext|>`: HF `pad_token`, in the HF generation eos list.
pub const ENDOFTEXT: u32 = 199_999;
/// `<|return|>`: end of the final answer; a stop token.
pub const RETURN: u32 = 200_002;
/// `<|constrain|>`: precedes a content type (e.g. `json`) in a tool-call header.
pub const CONSTRAIN: u32 = 200_003;
/// `<|channel|>`: header → channel name.
pub const CHANNEL: u32 = 200_005;
/// `<|start|>`: start of a message, followed by the role / author.
pub const START: u32 = 200_006;
/// `<|end|>`: end of a message.
pub const END: u32 = 200_007;
/// `<|message|>`: header → content.
pub const MESSAGE: u32 = 200_008;
/// `<|call|>`: end of a tool call; a stop token.
pub const CALL: u32 = 200_012;

/// First special id; ids below are the ordinary BPE ranks of `o200k_base`.
pub const FIRST_SPECIAL: u32 = STARTOFTEXT;
/// Number of token ids (= rows of the embedding and of `lm_head`).
pub const VOCAB_SIZE: usize = 201_088;

/// The o200k pre-tokenizer regex (tiktoken's `pat_str`, identical in `openai-harmony`).
pub const O200K_PATTERN: &str = tiktoken_rs::O200K_BASE_PAT_STR;

/// The name o200k_harmony gives a special id (`<|start|>`, `<|reserved_200013|>`, ...), or
/// `None` for an ordinary id or one past the vocabulary.
///
/// These are the names of `tiktoken-rs`' `o200k_harmony()` and `openai-harmony`; HF's
/// `tokenizer.json` calls 200018 `<|endofprompt|>` instead (irrelevant for inference).
pub fn special_token_name(id: u32) -> Option<String> {
    let name = match id {
        STARTOFTEXT => "<|startoftext|>",
        ENDOFTEXT => "<|endoftext|>",
        RETURN => "<|return|>",
        CONSTRAIN => "<|constrain|>",
        CHANNEL => "<|channel|>",
        START => "<|start|>",
        END => "<|end|>",
        MESSAGE => "<|message|>",
        CALL => "<|call|>",
        id if (200_000..VOCAB_SIZE as u32).contains(&id) => {
            return Some(format!("<|reserved_{id}|>"));
        }
        _ => return None,
    };
    Some(name.to_string())
}

/// Why a tokenizer could not be loaded or could not encode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer file is not JSON.
    #[error("tokenizer file {path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The file is JSON but not a tokenizer this engine can use.
    #[error("tokenizer file {path} is not usable: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The `tokenizers` crate refused the file.
    #[error("the tokenizers crate cannot load {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The error it reported.
        reason: String,
    },
    /// The vocabulary embedded in `tiktoken-rs` could not be built (should not happen).
    #[error("cannot build the embedded o200k_harmony tokenizer: {0}")]
    Embedded(String),
    /// Encoding failed (e.g. the pre-tokenizer regex gave up on pathological input).
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// A token id has no entry in the vocabulary.
    #[error("token id {0} is not in the vocabulary")]
    UnknownId(u32),
}

/// Where a [`Tokenizer`] got its vocabulary from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The o200k_harmony vocabulary compiled into `tiktoken-rs`.
    Embedded,
    /// A Hugging Face `tokenizer.json`.
    TokenizerJson(PathBuf),
}

/// The id → bytes table shared by both sources, plus the special tokens.
struct Vocab {
    /// All token bytes, concatenated in id order.
    bytes: Vec<u8>,
    /// `bytes[offsets[id]..offsets[id + 1]]` are the bytes of `id`; an empty range means the id
    /// is unused (no real token is empty).
    offsets: Vec<u32>,
    /// `special[id]`: whether `id` is a special (added) token.
    special: Vec<bool>,
    /// Special token name → id.
    special_ids: HashMap<String, u32>,
}

impl Vocab {
    /// Builds the table from `(id, bytes, is_special)` entries (any order; later entries for the
    /// same id win, as added tokens override the model vocabulary in HF).
    fn build(entries: Vec<(u32, Vec<u8>, bool)>) -> Vocab {
        let size = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
        let mut by_id: Vec<Option<(Vec<u8>, bool)>> = vec![None; size];
        for (id, bytes, special) in entries {
            by_id[id as usize] = Some((bytes, special));
        }
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(size + 1);
        let mut special = Vec::with_capacity(size);
        let mut special_ids = HashMap::new();
        offsets.push(0u32);
        for (id, entry) in by_id.into_iter().enumerate() {
            match entry {
                Some((b, is_special)) => {
                    if is_special && let Ok(name) = std::str::from_utf8(&b) {
                        special_ids.insert(name.to_string(), id as u32);
                    }
                    bytes.extend_from_slice(&b);
                    special.push(is_special);
                }
                None => special.push(false),
            }
            offsets.push(bytes.len() as u32);
        }
        Vocab {
            bytes,
            offsets,
            special,
            special_ids,
        }
    }

    fn len(&self) -> usize {
        self.special.len()
    }

    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        if id >= self.len() {
            return None;
        }
        let (start, end) = (self.offsets[id] as usize, self.offsets[id + 1] as usize);
        (end > start).then(|| &self.bytes[start..end])
    }
}

/// The embedded tiktoken encoder, built once per process (parsing the 200k ranks takes a while).
fn embedded_bpe() -> Result<&'static tiktoken_rs::CoreBPE, TokenizerError> {
    static BPE: OnceLock<Result<tiktoken_rs::CoreBPE, String>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_harmony().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| TokenizerError::Embedded(e.clone()))
}

/// The names of all embedded special tokens, the `allowed_special` set of tiktoken's `encode`.
fn embedded_specials(bpe: &'static tiktoken_rs::CoreBPE) -> &'static HashSet<&'static str> {
    static SPECIALS: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SPECIALS.get_or_init(|| bpe.special_tokens())
}

enum Backend {
    Tiktoken(&'static tiktoken_rs::CoreBPE),
    Hf(PipelineTokenizer),
}

struct Inner {
    backend: Backend,
    vocab: Arc<Vocab>,
    source: TokenizerSource,
}

/// The o200k_harmony tokenizer. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.inner.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// The o200k_harmony vocabulary compiled into `tiktoken-rs`: no files, works offline.
    ///
    /// The first call builds it (a fraction of a second in release builds); later calls share it.
    pub fn embedded() -> Result<Tokenizer, TokenizerError> {
        static EMBEDDED: OnceLock<Result<Tokenizer, String>> = OnceLock::new();
        EMBEDDED
            .get_or_init(|| Self::build_embedded().map_err(|e| e.to_string()))
            .clone()
            .map_err(TokenizerError::Embedded)
    }

    fn build_embedded() -> Result<Tokenizer, TokenizerError> {
        let bpe = embedded_bpe()?;
        let mut entries = Vec::with_capacity(VOCAB_SIZE);
        for id in 0..VOCAB_SIZE as u32 {
            // Every id of o200k_harmony is defined (ordinary ranks, then named/reserved specials).
            if let Ok(bytes) = bpe.decode_bytes(&[id]) {
                entries.push((id, bytes, id >= FIRST_SPECIAL));
            }
        }
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                backend: Backend::Tiktoken(bpe),
                vocab: Arc::new(Vocab::build(entries)),
                source: TokenizerSource::Embedded,
            }),
        })
    }

    /// Loads a Hugging Face `tokenizer.json` (byte-level BPE, as shipped with GPT-OSS).
    ///
    /// Files in the legacy (`"version": "1.0"`) layout are first rewritten into the canonical
    /// layout that `tokenizers` 1.0 reads. Errors name the file.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut json: Value =
            serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        drop(text);
        // Idempotent: a canonical file goes through unchanged.
        tokenizers::canonicalize_value(&mut json).map_err(|e| invalid(e.to_string()))?;
        let entries = hf_vocab_entries(&json).map_err(invalid)?;
        let canonical = serde_json::to_string(&json).map_err(|e| invalid(e.to_string()))?;
        drop(json);
        let pipeline = tokenizers::from_json(&canonical).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                backend: Backend::Hf(pipeline),
                vocab: Arc::new(Vocab::build(entries)),
                source: TokenizerSource::TokenizerJson(path.to_path_buf()),
            }),
        })
    }

    /// `dir/tokenizer.json` when the checkpoint directory has one, else [`Tokenizer::embedded`].
    /// A `tokenizer.json` that exists but cannot be loaded is an error, not a silent fallback.
    pub fn for_model_dir(dir: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let file = dir.as_ref().join("tokenizer.json");
        if file.is_file() {
            Self::from_tokenizer_json(file)
        } else {
            Self::embedded()
        }
    }

    /// Where the vocabulary came from.
    pub fn source(&self) -> &TokenizerSource {
        &self.inner.source
    }

    /// Number of token ids (201088 for o200k_harmony).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab.len()
    }

    /// Encodes `text`. With `allow_special`, special-token names in the text (`<|start|>`, ...)
    /// become their ids; without, they are encoded as ordinary text.
    ///
    /// Never pass untrusted text (user messages) with `allow_special = true`: it could inject
    /// message boundaries.
    pub fn encode(&self, text: &str, allow_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner.backend {
            Backend::Tiktoken(bpe) => {
                let empty = HashSet::new();
                let allowed = if allow_special {
                    embedded_specials(bpe)
                } else {
                    &empty
                };
                bpe.encode(text, allowed)
                    .map(|(ids, _)| ids)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))
            }
            Backend::Hf(pipeline) => {
                let options = EncodeOptions {
                    add_special_tokens: false,
                    encode_special_tokens: !allow_special,
                    ..EncodeOptions::default()
                };
                let mut out = Vec::with_capacity(text.len() / 3 + 1);
                pipeline
                    .encode_into(text, &options, &mut out)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                Ok(out.into_iter().map(u32::from).collect())
            }
        }
    }

    /// Encodes `text` with special-token names treated as ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(text, false)
    }

    /// The raw bytes of one token (special tokens: their name), or `None` for an unused id.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.inner.vocab.token_bytes(id)
    }

    /// Concatenated bytes of `ids`; an error names the first id not in the vocabulary.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id).ok_or(TokenizerError::UnknownId(id))?);
        }
        Ok(out)
    }

    /// Decodes `ids` to text, lossily: invalid UTF-8 and unknown ids become U+FFFD. Special
    /// tokens appear as their names.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut decoder = self.stream_decoder();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&decoder.push(id));
        }
        out.push_str(&decoder.flush());
        out
    }

    /// An incremental decoder for streaming generated tokens.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder {
            vocab: self.inner.vocab.clone(),
            pending: Vec::new(),
        }
    }

    /// The id of a special token by name (`"<|start|>"` → 200006), or `None`.
    pub fn token_to_id(&self, name: &str) -> Option<u32> {
        self.inner.vocab.special_ids.get(name).copied()
    }

    /// Whether `id` is a special token (`<|start|>`, reserved ids, ...).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .vocab
            .special
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }
}

/// Incremental detokenizer: push token ids as they are generated, get back the text they
/// complete.
///
/// A token may end in the middle of a multi-byte UTF-8 character (emoji, CJK); those bytes are
/// held back until the character is complete. Bytes that can never become valid UTF-8 come out
/// as U+FFFD; so do unknown ids.
#[derive(Clone)]
pub struct StreamDecoder {
    vocab: Arc<Vocab>,
    pending: Vec<u8>,
}

impl fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("pending", &self.pending)
            .finish()
    }
}

impl StreamDecoder {
    /// Adds one token and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        match self.vocab.token_bytes(id) {
            Some(bytes) => {
                self.pending.extend_from_slice(bytes);
                take_valid_utf8(&mut self.pending)
            }
            None => {
                // An unknown id also ends any incomplete character before it.
                let mut out =
                    String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
                out.push(char::REPLACEMENT_CHARACTER);
                out
            }
        }
    }

    /// Adds raw bytes (e.g. a token's bytes obtained elsewhere) and returns completed text.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        take_valid_utf8(&mut self.pending)
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: held-back bytes come out as U+FFFD.
    pub fn flush(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned()
    }
}

/// Removes and returns the longest prefix of `pending` that is complete text, turning invalid
/// sequences into U+FFFD and keeping only a trailing incomplete character.
pub(crate) fn take_valid_utf8(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&pending[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = pending.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // Safe: from_utf8 validated these bytes.
                out.push_str(std::str::from_utf8(&pending[start..start + valid]).unwrap_or(""));
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start += valid + bad;
                    }
                    None => {
                        start += valid;
                        break;
                    }
                }
            }
        }
    }
    pending.drain(..start);
    out
}

/// GPT-2 byte-level alphabet: the printable bytes map to themselves, the others to U+0100.. in
/// byte order. Returns the char → byte inverse.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            char::from_u32(b)
        } else {
            n += 1;
            char::from_u32(255 + n)
        };
        if let Some(c) = c {
            map.insert(c, b as u8);
        }
    }
    map
}

/// Reads `(id, bytes, special)` for every token of a canonical `tokenizer.json`: the model's
/// byte-level vocabulary and the added tokens.
fn hf_vocab_entries(json: &Value) -> Result<Vec<(u32, Vec<u8>, bool)>, String> {
    let model = json.get("model").ok_or("no `model`")?;
    let kind = model.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "BPE" {
        return Err(format!(
            "model type is {kind:?}, expected a byte-level \"BPE\""
        ));
    }
    if model.get("byte_level").and_then(Value::as_bool) != Some(true) {
        return Err("the BPE model is not byte-level (o200k_harmony is)".to_string());
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("the model has no `vocab` object")?;
    let alphabet = byte_level_decoder();
    let mut entries = Vec::with_capacity(vocab.len() + 1100);
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("vocab entry {token:?} has a bad id {id}"))?;
        // As `tokenizers` does: a char outside the byte alphabet stands for its own UTF-8.
        let mut bytes = Vec::with_capacity(token.len());
        for c in token.chars() {
            match alphabet.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        entries.push((id, bytes, false));
    }
    if let Some(added) = json.get("added_tokens").and_then(Value::as_array) {
        for token in added {
            let id = token
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| format!("added token {token} has no valid id"))?;
            let content = token
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("added token {id} has no content"))?;
            let special = token
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            entries.push((id, content.as_bytes().to_vec(), special));
        }
    }
    if entries.iter().any(|e| e.0 as usize >= 1 << 24) {
        return Err("token ids above 2^24 are not plausible".to_string());
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_valid_utf8_holds_back_incomplete_chars() {
        let heart = "💖".as_bytes();
        let mut pending = heart[..2].to_vec();
        assert_eq!(take_valid_utf8(&mut pending), "");
        assert_eq!(pending.len(), 2);
        pending.extend_from_slice(&heart[2..]);
        pending.extend_from_slice(b"ok");
        assert_eq!(take_valid_utf8(&mut pending), "💖ok");
        assert!(pending.is_empty());
        // An invalid byte in the middle becomes U+FFFD, the rest goes on.
        let mut pending = vec![b'a', 0xFF, b'b', 0xE2, 0x82];
        assert_eq!(take_valid_utf8(&mut pending), "a\u{FFFD}b");
        assert_eq!(pending, vec![0xE2, 0x82]);
    }

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'!'], b'!');
    }

    #[test]
    fn special_names() {
        assert_eq!(special_token_name(START).as_deref(), Some("<|start|>"));
        assert_eq!(
            special_token_name(200_018).as_deref(),
            Some("<|reserved_200018|>")
        );
        assert_eq!(special_token_name(17), None);
        assert_eq!(special_token_name(VOCAB_SIZE as u32), None);
    }
}
