//! A scripted [`Backend`] for tests and demos of the API's structure: it answers each prompt
//! with a fixed token sequence (a Harmony analysis message, a final answer, a tool call, …)
//! chosen by a script function, so Harmony parsing, tool calls and reasoning can be tested
//! end to end without a trained model. It honours the backend contract (positions, release).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gptoss_engine::backend::{
    Backend, BackendError, Logits, LogitsWanted, SeqId, StepBatch, check_start_positions,
    validate_batch,
};
use gptoss_formats::GptOssConfig;
use gptoss_formats::synth::{Preset, SynthLayout, synth_config_json};
use gptoss_model::tokenizer::{self, Tokenizer};

/// Chooses the completion of a prompt: given the prompt's tokens, the tokens to generate
/// (after them the backend emits `<|return|>`).
pub type Script = Arc<dyn Fn(&[u32]) -> Vec<u32> + Send + Sync>;

/// The scripted backend.
pub struct ScriptedBackend {
    cfg: GptOssConfig,
    script: Script,
    seqs: HashMap<SeqId, Vec<u32>>,
    cache: HashMap<Vec<u32>, Vec<u32>>,
    delay: Duration,
}

/// The configuration of the tiny preset (real vocabulary).
pub fn tiny_config() -> GptOssConfig {
    let text = serde_json::to_string(&synth_config_json(Preset::Tiny, SynthLayout::UnslothNf4))
        .expect("config json");
    GptOssConfig::from_json_str(&text).expect("valid tiny config")
}

/// Tokens of Harmony text where `<|…|>` pieces are special tokens and the rest ordinary text,
/// e.g. `"<|channel|>final<|message|>Hi<|return|>"`.
pub fn harmony_tokens(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.find("<|") {
            Some(0) => {
                let end = rest.find("|>").map_or(rest.len(), |e| e + 2);
                let name = &rest[..end];
                match tok.token_to_id(name) {
                    Some(id) => out.push(id),
                    None => out.extend(tok.encode_ordinary(name).unwrap_or_default()),
                }
                rest = &rest[end..];
            }
            Some(i) => {
                out.extend(tok.encode_ordinary(&rest[..i]).unwrap_or_default());
                rest = &rest[i..];
            }
            None => {
                out.extend(tok.encode_ordinary(rest).unwrap_or_default());
                rest = "";
            }
        }
    }
    out
}

impl ScriptedBackend {
    /// A backend answering with `script(prompt)`.
    pub fn new(script: Script) -> Self {
        ScriptedBackend {
            cfg: tiny_config(),
            script,
            seqs: HashMap::new(),
            cache: HashMap::new(),
            delay: Duration::ZERO,
        }
    }

    /// Sleeps this long per forward call (to test timing-dependent behaviour).
    pub fn with_step_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn script_for(&mut self, prompt: &[u32]) -> &[u32] {
        if !self.cache.contains_key(prompt) {
            let s = (self.script)(prompt);
            self.cache.insert(prompt.to_vec(), s);
        }
        &self.cache[prompt]
    }

    /// The next token of a sequence: the generated part is the longest suffix `g` such that
    /// `g` is a prefix of the script of what precedes it. Prompts are recognised as ending with
    /// `<|start|>assistant` (chat) — any other sequence is treated as all prompt.
    fn next_token(&mut self, seq: &[u32]) -> u32 {
        const PROMPT_END: [u32; 2] = [tokenizer::START, 173_781];
        for k in (0..=seq.len()).rev() {
            let (prompt, generated) = seq.split_at(seq.len() - k);
            // Chat prompts end with `<|start|>assistant`, possibly followed by a forced prefix
            // that is then part of `generated`'s script match below.
            if !prompt.ends_with(&PROMPT_END) {
                continue;
            }
            let script = self.script_for(prompt).to_vec();
            if script.len() >= k && script[..k] == *generated {
                return script.get(k).copied().unwrap_or(tokenizer::RETURN);
            }
        }
        tokenizer::RETURN
    }
}

impl Backend for ScriptedBackend {
    fn name(&self) -> &str {
        "scripted"
    }

    fn config(&self) -> &GptOssConfig {
        &self.cfg
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        validate_batch(batch, self.max_batch_tokens())?;
        check_start_positions(batch, |seq| self.seqs.get(&seq).map_or(0, Vec::len))?;
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let vocab = self.cfg.vocab_size;
        let mut rows = Vec::with_capacity(batch.steps.len());
        let mut greedy = Vec::with_capacity(batch.steps.len());
        for s in &batch.steps {
            let mut seq = self.seqs.remove(&s.seq).unwrap_or_default();
            seq.extend_from_slice(&s.tokens);
            let next = self.next_token(&seq);
            self.seqs.insert(s.seq, seq);
            if s.want_logits == LogitsWanted::LastGreedy {
                // The arg-max of the row the other kinds get.
                rows.push(Vec::new());
                greedy.push(Some(next));
            } else {
                let mut row = vec![0.0f32; vocab];
                row[next as usize] = 60.0;
                rows.push(row);
                greedy.push(None);
            }
        }
        Ok(Logits::with_greedy(vocab, rows, greedy))
    }

    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn max_batch_tokens(&self) -> usize {
        1 << 16
    }
}

impl ScriptedBackend {
    /// Live sequences (holding a cache).
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
}
