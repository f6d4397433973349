//! Generation stop conditions: stop token ids and stop strings.
//!
//! Stop strings are matched on the *detokenised text stream*, which arrives
//! in deltas (one per token, or coarser). A stop string may span several
//! deltas, so [`StopMatcher::push`] withholds the longest tail of the text
//! that could still be the beginning of a stop string, and releases it once
//! the following text rules the match out (or via [`StopMatcher::finish`]
//! when generation ends for another reason).
//!
//! Semantics follow OpenAI's `stop` parameter: the stop sequence itself is
//! not part of the output, and nothing after it is either. When several
//! stop strings could match, the one that is *completed first* in the stream
//! wins (ties: the longest one), which makes the result independent of how
//! the text happened to be split into deltas.
//!
//! All slicing is on `char` boundaries, so multi-byte UTF-8 text and stop
//! strings are handled correctly (deltas are `&str`, i.e. whole characters;
//! assembling bytes into characters is the detokeniser's job).
//!
//! ```
//! use gptoss_engine::stop::{StopMatcher, StopReason};
//! let mut m = StopMatcher::new([], ["END"]);
//! assert_eq!(m.push("hello E").emit, "hello ");   // "E" withheld
//! let r = m.push("ND and more");
//! assert_eq!(r.emit, ""); // the stop string is not emitted
//! assert_eq!(r.stopped, Some(StopReason::String("END".into())));
//! ```

use std::collections::HashSet;

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// One of the stop token ids was generated.
    Token(u32),
    /// A stop string was found in the text; holds that stop string.
    String(String),
}

/// The outcome of feeding one delta to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopResult {
    /// Text that is safe to send to the client now (possibly empty).
    pub emit: String,
    /// `Some` once a stop condition has been met; the sequence is finished
    /// and `emit` holds the last of its text.
    pub stopped: Option<StopReason>,
}

/// Incremental matcher of stop token ids and stop strings for one sequence.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stop_token_ids: HashSet<u32>,
    stop_strings: Vec<String>,
    /// Text received but not yet emitted: the longest tail that is a proper
    /// prefix of some stop string.
    pending: String,
    stopped: Option<StopReason>,
}

impl StopMatcher {
    /// Creates a matcher. Empty stop strings are ignored (they would match
    /// before any text), as are duplicates.
    pub fn new<S: Into<String>>(
        stop_token_ids: impl IntoIterator<Item = u32>,
        stop_strings: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut strings: Vec<String> = Vec::new();
        for s in stop_strings {
            let s = s.into();
            if !s.is_empty() && !strings.contains(&s) {
                strings.push(s);
            }
        }
        Self {
            stop_token_ids: stop_token_ids.into_iter().collect(),
            stop_strings: strings,
            pending: String::new(),
            stopped: None,
        }
    }

    /// Whether `id` is one of the stop token ids.
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_token_ids.contains(&id)
    }

    /// The stop strings in use (empty ones and duplicates removed).
    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }

    /// Text currently withheld because it may start a stop string.
    pub fn pending(&self) -> &str {
        &self.pending
    }

    /// The stop condition met so far, if any.
    pub fn stopped(&self) -> Option<&StopReason> {
        self.stopped.as_ref()
    }

    /// Feeds a generated token together with its text delta.
    ///
    /// If `id` is a stop token, the sequence stops: the withheld text is
    /// released and `delta` (the stop token's own text) is dropped.
    /// Otherwise this is [`StopMatcher::push`]`(delta)`.
    pub fn push_token(&mut self, id: u32, delta: &str) -> StopResult {
        if self.stopped.is_none() && self.is_stop_token(id) {
            self.stopped = Some(StopReason::Token(id));
            return StopResult {
                emit: std::mem::take(&mut self.pending),
                stopped: self.stopped.clone(),
            };
        }
        self.push(delta)
    }

    /// Feeds the next piece of detokenised text.
    ///
    /// Returns the text that can be emitted now: everything except a tail
    /// that could be the start of a stop string. If a stop string is
    /// completed, returns the text before it and the reason; the stop string
    /// and everything after it are discarded. After a stop, further calls
    /// emit nothing and repeat the reason.
    pub fn push(&mut self, delta: &str) -> StopResult {
        if self.stopped.is_some() {
            return StopResult {
                emit: String::new(),
                stopped: self.stopped.clone(),
            };
        }
        self.pending.push_str(delta);

        // `pending` held no complete stop string before, so any match ends
        // inside `delta`. Pick the match completed first, then the longest.
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (k, s) in self.stop_strings.iter().enumerate() {
            if let Some(start) = self.pending.find(s.as_str()) {
                let cand = (start + s.len(), start, k);
                if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        if let Some((_, start, k)) = best {
            let mut emit = std::mem::take(&mut self.pending);
            emit.truncate(start);
            self.stopped = Some(StopReason::String(self.stop_strings[k].clone()));
            return StopResult {
                emit,
                stopped: self.stopped.clone(),
            };
        }

        let keep = self.partial_match_len();
        let split = self.pending.len() - keep;
        let emit = self.pending[..split].to_owned();
        self.pending.drain(..split);
        StopResult {
            emit,
            stopped: None,
        }
    }

    /// Ends the stream (generation stopped for another reason, e.g. the
    /// length limit) and returns the withheld text, which can no longer
    /// become a stop string. Returns an empty string after a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of some stop string (always on a char boundary).
    fn partial_match_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stop_strings {
            let longest = (s.len() - 1).min(self.pending.len());
            for k in (best + 1..=longest).rev() {
                if s.is_char_boundary(k) && self.pending.ends_with(&s[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas` and returns (all emitted text, stop reason).
    fn run(m: &mut StopMatcher, deltas: &[&str]) -> (String, Option<StopReason>) {
        let mut out = String::new();
        for d in deltas {
            let r = m.push(d);
            out.push_str(&r.emit);
            if r.stopped.is_some() {
                return (out, r.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    fn stop(s: &str) -> Option<StopReason> {
        Some(StopReason::String(s.to_owned()))
    }

    #[test]
    fn no_stop_strings_emits_everything_immediately() {
        let mut m = StopMatcher::new([], Vec::<String>::new());
        assert_eq!(m.push("abc").emit, "abc");
        assert_eq!(m.pending(), "");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_string_within_one_delta() {
        let mut m = StopMatcher::new([], ["STOP"]);
        let r = m.push("hello STOP world");
        assert_eq!(r.emit, "hello ");
        assert_eq!(r.stopped, stop("STOP"));
    }

    #[test]
    fn stop_string_across_deltas() {
        let mut m = StopMatcher::new([], ["STOP"]);
        assert_eq!(m.push("hello S").emit, "hello ");
        assert_eq!(m.pending(), "S");
        assert_eq!(m.push("T").emit, "");
        assert_eq!(m.push("O").emit, "");
        let r = m.push("P, more");
        assert_eq!(r.emit, "");
        assert_eq!(r.stopped, stop("STOP"));
        // Afterwards: nothing more, reason repeated, nothing to flush.
        let r = m.push("ignored");
        assert_eq!(r.emit, "");
        assert_eq!(r.stopped, stop("STOP"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn false_prefix_is_released() {
        let mut m = StopMatcher::new([], ["STOP"]);
        assert_eq!(m.push("ST").emit, "");
        let r = m.push("ART");
        assert_eq!(r.emit, "START");
        assert!(r.stopped.is_none());
    }

    #[test]
    fn overlapping_prefix_aab() {
        // "a" is withheld, then "aa": the first "a" cannot start "ab" any
        // more, the second can.
        let mut m = StopMatcher::new([], ["ab"]);
        assert_eq!(m.push("a").emit, "");
        assert_eq!(m.push("a").emit, "a");
        assert_eq!(m.pending(), "a");
        let r = m.push("b");
        assert_eq!(r.emit, "");
        assert_eq!(r.stopped, stop("ab"));

        assert_eq!(
            run(&mut StopMatcher::new([], ["ab"]), &["aab"]),
            ("a".into(), stop("ab"))
        );
    }

    #[test]
    fn self_overlapping_stop_string() {
        // "aab" inside "aaab": the withheld tail must be "aa", not "a".
        for deltas in [&["a", "a", "a", "b"][..], &["aa", "ab"], &["aaa", "b"]] {
            let got = run(&mut StopMatcher::new([], ["aab"]), deltas);
            assert_eq!(got, ("a".into(), stop("aab")), "{deltas:?}");
        }
    }

    #[test]
    fn result_is_independent_of_chunking() {
        let text = "xx abcd yy";
        let stops = ["abcd", "bc", "zz"];
        let whole = run(&mut StopMatcher::new([], stops), &[text]);
        assert_eq!(whole, ("xx a".into(), stop("bc")));
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&mut StopMatcher::new([], stops), &refs), whole);
    }

    #[test]
    fn same_end_prefers_longest() {
        let got = run(&mut StopMatcher::new([], ["c", "abc"]), &["xabcx"]);
        assert_eq!(got, ("x".into(), stop("abc")));
    }

    #[test]
    fn multibyte_text_and_stop_strings() {
        // Stop string of multi-byte chars, split between deltas on char
        // boundaries; text around it is multi-byte too.
        let mut m = StopMatcher::new([], ["終わり"]);
        assert_eq!(m.push("héllo 終").emit, "héllo ");
        assert_eq!(m.pending(), "終");
        let r = m.push("わ");
        assert_eq!(r.emit, "");
        let r = m.push("り😀");
        assert_eq!(r.emit, "");
        assert_eq!(r.stopped, stop("終わり"));

        // A shared leading byte (é = C3 A9, è = C3 A8) must not be taken
        // for a partial match.
        let mut m = StopMatcher::new([], ["é!"]);
        assert_eq!(m.push("è").emit, "è");
        assert_eq!(m.push("é").emit, "");
        assert_eq!(m.push("?").emit, "é?");

        let mut m = StopMatcher::new([], ["🙂x"]);
        assert_eq!(run(&mut m, &["a🙂", "🙂", "y"]), ("a🙂🙂y".into(), None));
    }

    #[test]
    fn finish_flushes_withheld_tail() {
        let mut m = StopMatcher::new([], ["</end>"]);
        assert_eq!(m.push("done </e").emit, "done ");
        assert_eq!(m.finish(), "</e");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_token_releases_pending_and_drops_its_text() {
        let mut m = StopMatcher::new([200_002], ["###"]);
        assert!(m.is_stop_token(200_002));
        assert!(!m.is_stop_token(7));
        assert_eq!(m.push_token(7, "text #").emit, "text ");
        let r = m.push_token(200_002, "<|return|>");
        assert_eq!(r.emit, "#");
        assert_eq!(r.stopped, Some(StopReason::Token(200_002)));
        assert_eq!(m.push_token(7, "x").emit, "");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn empty_and_duplicate_stop_strings_are_ignored() {
        let m = StopMatcher::new([], ["", "a", "a"]);
        assert_eq!(m.stop_strings(), ["a".to_string()]);
    }
}
