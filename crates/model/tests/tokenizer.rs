//! Tokenizer tests: the embedded o200k_harmony vocabulary against the spec's ids, and a
//! Hugging Face `tokenizer.json` built from the same ranks against the embedded tokenizer.
//!
//! We cannot download OpenAI's `tokenizer.json`, so [`o200k_tokenizer_json`] rebuilds an
//! equivalent one the way `transformers`' `TikTokenConverter` does
//! (`convert_slow_tokenizer.py`: `extract_vocab_merges_from_model`, `tokenizer`, `converted`):
//! byte-level vocabulary from the tiktoken ranks, merges from every split of a token into two
//! tokens, ordered by the rank of the merged token, `ignore_merges: true`, a `Split` pre-tokenizer
//! on the o200k regex followed by `ByteLevel(use_regex=false)`, a `ByteLevel` decoder and the
//! special tokens as added tokens. It is written in the legacy (`"version": "1.0"`) layout that
//! the `tokenizers` Python library writes, so loading it also exercises the conversion to the
//! canonical layout.

use std::collections::HashMap;
mod common;

use std::sync::OnceLock;
use std::time::Instant;

use common::{SPEC_COMPLETION, SPEC_COMPLETION_TOKENS, SPEC_PROMPT, SPEC_PROMPT_TOKENS};
use gptoss_model::tokenizer::{
    self, CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, START, STARTOFTEXT, Tokenizer,
    TokenizerError, TokenizerSource, VOCAB_SIZE,
};

/// Texts on which both sources must agree, chosen to hit every branch of the o200k regex.
fn stress_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "",
        " ",
        "hello world",
        "Hello, World! HELLO world. hElLo WoRlD",
        // Contractions, case-insensitive suffixes.
        "I'm sure you'll see they've said it's John's, we'd've known. I'M YOU'LL THEY'VE IT'S",
        "don't DON'T Don't can't won't shouldn't y'all o'clock rock'n'roll",
        // Digits: runs of 1..3, long numbers, decimals, mixed.
        "1 12 123 1234 12345 123456789012345678901234567890 3.14159 1,000,000 0x1F 1e-9 v2.0.1",
        "Phone: +1 (555) 010-9999; IBAN DE89 3704 0044 0532 0130 00",
        // Whitespace runs, tabs, newlines, CRLF, trailing whitespace.
        "a  b   c    d\t\te\n\nf\r\ng \n \n  \t\n",
        "    indented\n        more\n\t\ttabs\n   ",
        "\n\n\n",
        "   ",
        "trailing spaces   ",
        // Unicode: CJK, emoji (incl. ZWJ sequences and flags), combining marks, RTL, Cyrillic.
        "日本語のテキストと中文文本，还有한국어 텍스트。",
        "emoji: 💖🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ©®™",
        "combining: e\u{301} a\u{308} n\u{303} Z\u{335}\u{321}a\u{334}l\u{336}g\u{337}o",
        "RTL: שלום עולם مرحبا بالعالم ‏(mixed) עברית123",
        "Привет, мир! Ελληνικά. Ünïcödé façade naïve coöperate",
        "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ and\u{00A0}nbsp and\u{2009}thin and\u{200B}zwsp",
        // Code.
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
        "def f(a, b=2, *args, **kw):\n\treturn {'a': a, \"b\": b}  # comment\n",
        "<div class=\"x\">&amp; &lt;tag&gt;</div> // path/to/file.rs:42:7 C:\\Windows\\System32",
        "SELECT * FROM t WHERE a >= 10 AND b <> 'x'; -- sql\n/* block */",
        "{\"location\": \"San Francisco, CA\", \"unit\": \"celsius\", \"n\": [1, 2, 3]}",
        // Punctuation runs followed by newlines and slashes (` ?[^\s\p{L}\p{N}]+[\r\n/]*`).
        "!!! ??? ... --- *** ///\n//\n\\\\ ~~~ ^^^ ``` ''' \"\"\"",
        "a/b/c https://example.com/path?q=1&r=2#frag",
        // Text that looks like special tokens.
        "<|start|> <|end|> <|message|> <|reserved_200013|> <|endoftext|> <|not_a_token|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push(SPEC_PROMPT.to_string());
    texts.push(SPEC_COMPLETION.to_string());
    // Long inputs: a long whitespace run and a long single "word" of letters and of digits.
    texts.push(format!("x{}y", " ".repeat(5000)));
    texts.push("supercalifragilistic".repeat(200));
    texts.push("9".repeat(3001));
    texts
}

#[test]
fn embedded_matches_spec_ids() {
    let tok = Tokenizer::embedded().unwrap();
    assert_eq!(tok.source(), &TokenizerSource::Embedded);
    assert_eq!(tok.vocab_size(), VOCAB_SIZE);
    assert_eq!(tok.encode(SPEC_PROMPT, true).unwrap(), SPEC_PROMPT_TOKENS);
    assert_eq!(
        tok.encode(SPEC_COMPLETION, true).unwrap(),
        SPEC_COMPLETION_TOKENS
    );
    assert_eq!(tok.decode(&SPEC_PROMPT_TOKENS), SPEC_PROMPT);
    assert_eq!(tok.decode(&SPEC_COMPLETION_TOKENS), SPEC_COMPLETION);
    // Useful single tokens from spec §1.
    for (text, id) in [
        ("system", 17360),
        ("developer", 77944),
        ("user", 1428),
        ("assistant", 173781),
        ("analysis", 35644),
        ("final", 17196),
    ] {
        assert_eq!(tok.encode_ordinary(text).unwrap(), vec![id], "{text}");
    }
    assert_eq!(tok.encode("hello world", false).unwrap(), vec![24912, 2375]);
}

#[test]
fn special_tokens() {
    let tok = Tokenizer::embedded().unwrap();
    for (name, id) in [
        ("<|startoftext|>", STARTOFTEXT),
        ("<|endoftext|>", ENDOFTEXT),
        ("<|return|>", RETURN),
        ("<|constrain|>", CONSTRAIN),
        ("<|channel|>", CHANNEL),
        ("<|start|>", START),
        ("<|end|>", END),
        ("<|message|>", MESSAGE),
        ("<|call|>", CALL),
        ("<|reserved_200013|>", 200_013),
        ("<|reserved_201087|>", 201_087),
    ] {
        assert_eq!(tok.token_to_id(name), Some(id), "{name}");
        assert!(tok.is_special(id));
        assert_eq!(tokenizer::special_token_name(id).as_deref(), Some(name));
        assert_eq!(tok.token_bytes(id), Some(name.as_bytes()));
        assert_eq!(tok.encode(name, true).unwrap(), vec![id]);
        // Without allow_special the name is plain text, never the special id.
        let plain = tok.encode(name, false).unwrap();
        assert!(
            plain.len() > 1 && plain.iter().all(|&t| !tok.is_special(t)),
            "{name}"
        );
        assert_eq!(tok.decode(&plain), name);
    }
    assert_eq!(
        tok.token_to_id("<|refusal|>"),
        None,
        "not in the vocabulary (spec §1)"
    );
    assert!(!tok.is_special(24912));
    assert!(!tok.is_special(u32::MAX));
}

#[test]
fn decode_is_lossy_and_decode_bytes_is_strict() {
    let tok = Tokenizer::embedded().unwrap();
    let ids = tok.encode_ordinary("a💖b").unwrap();
    assert_eq!(tok.decode(&ids), "a💖b");
    assert_eq!(tok.decode(&[24912, u32::MAX, 2375]), "hello\u{FFFD} world");
    assert!(matches!(
        tok.decode_bytes(&[24912, 300_000]),
        Err(TokenizerError::UnknownId(300_000))
    ));
    assert_eq!(tok.decode_bytes(&[24912, 2375]).unwrap(), b"hello world");
}

#[test]
fn stream_decoder_handles_split_characters() {
    let tok = Tokenizer::embedded().unwrap();
    let text = "emoji 💖🚀👍🏽 and 日本語 and e\u{301} — done";
    let ids = tok.encode_ordinary(text).unwrap();
    // Some token of this text must end inside a character, or the test would prove nothing.
    assert!(
        ids.iter()
            .any(|&id| std::str::from_utf8(tok.token_bytes(id).unwrap()).is_err()),
        "expected a token that splits a multi-byte character"
    );
    let mut decoder = tok.stream_decoder();
    let mut out = String::new();
    for &id in &ids {
        let piece = decoder.push(id);
        assert!(
            !piece.contains('\u{FFFD}'),
            "partial character leaked: {piece:?}"
        );
        out.push_str(&piece);
    }
    assert!(!decoder.has_pending());
    assert_eq!(decoder.flush(), "");
    assert_eq!(out, text);

    // The single emoji of harmony's `test_streamable_parser_waits_for_multi_token_utf8_sequence`.
    let heart = tok.encode_ordinary("💖").unwrap();
    assert!(heart.len() >= 2);
    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.push(heart[0]), "");
    assert!(decoder.has_pending());
    let rest: String = heart[1..].iter().map(|&id| decoder.push(id)).collect();
    assert_eq!(rest, "💖");

    // A stream that ends inside a character flushes to U+FFFD.
    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.push(heart[0]), "");
    assert_eq!(decoder.flush(), "\u{FFFD}");
}

#[test]
fn embedded_round_trips() {
    let tok = Tokenizer::embedded().unwrap();
    for text in stress_texts() {
        let ids = tok.encode_ordinary(&text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        let ids = tok.encode(&text, true).unwrap();
        assert_eq!(tok.decode(&ids), text);
    }
}

#[test]
fn for_model_dir_falls_back_to_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::for_model_dir(dir.path()).unwrap();
    assert_eq!(tok.source(), &TokenizerSource::Embedded);
}

#[test]
fn bad_tokenizer_json_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let err = Tokenizer::from_tokenizer_json(&missing).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }));
    assert!(err.to_string().contains("missing.json"), "{err}");

    let cases = [
        ("not_json.json", "{ this is not json"),
        ("no_model.json", r#"{"added_tokens": []}"#),
        (
            "wordlevel.json",
            r#"{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
        ),
        (
            "not_byte_level.json",
            r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#,
        ),
        (
            "bad_id.json",
            r#"{"model": {"type": "BPE", "byte_level": true, "vocab": {"a": -1}, "merges": []}}"#,
        ),
    ];
    for (name, body) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let err = Tokenizer::from_tokenizer_json(&path).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The HF tokenizer.json built from the tiktoken ranks.
// ---------------------------------------------------------------------------------------------

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100.. in order.
/// Written independently of the crate's own inverse table on purpose.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let keep = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if keep {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(0xFF + n).unwrap()
        };
    }
    table
}

/// Builds the HF `tokenizer.json` text for o200k_harmony from the ranks embedded in
/// `tiktoken-rs`, as `transformers`' `TikTokenConverter` does.
fn o200k_tokenizer_json() -> String {
    let bpe = tiktoken_rs::o200k_harmony().unwrap();
    // Ranks 0..199998 are the ordinary tokens of o200k_base.tiktoken.
    let n_ordinary = STARTOFTEXT;
    let ranks: Vec<Vec<u8>> = (0..n_ordinary)
        .map(|r| bpe.decode_bytes(&[r]).unwrap())
        .collect();
    let rank_of: HashMap<&[u8], u32> = ranks
        .iter()
        .enumerate()
        .map(|(r, b)| (b.as_slice(), r as u32))
        .collect();
    assert_eq!(rank_of.len(), ranks.len(), "ranks must be distinct");

    let table = bytes_to_unicode();
    let to_str = |b: &[u8]| -> String { b.iter().map(|&x| table[x as usize]).collect() };
    let json_str = |s: &str| serde_json::to_string(s).unwrap();

    let mut out = String::with_capacity(40 << 20);
    out.push_str(r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":["#);
    for id in STARTOFTEXT..VOCAB_SIZE as u32 {
        if id > STARTOFTEXT {
            out.push(',');
        }
        let name = tokenizer::special_token_name(id).unwrap();
        out.push_str(&format!(
            r#"{{"id":{id},"content":{},"single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#,
            json_str(&name)
        ));
    }
    out.push_str(r#"],"normalizer":null,"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"#);
    out.push_str(&json_str(tokenizer::O200K_PATTERN));
    out.push_str(r#"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}]},"#);
    out.push_str(r#""post_processor":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":false,"use_regex":true},"#);
    out.push_str(r#""decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"#);
    out.push_str(r#""model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":true,"vocab":{"#);
    for (r, b) in ranks.iter().enumerate() {
        if r > 0 {
            out.push(',');
        }
        out.push_str(&json_str(&to_str(b)));
        out.push(':');
        out.push_str(&r.to_string());
    }
    out.push_str(r#"},"merges":["#);
    // TikTokenConverter: for each token in rank order, every split into two tokens; those of one
    // token sorted by (rank of left, rank of right); the whole list stably sorted by the rank of
    // the merged token, which iterating in rank order already gives.
    let mut first = true;
    let mut n_merges = 0usize;
    for token in &ranks {
        if token.len() < 2 {
            continue;
        }
        let mut local: Vec<(u32, u32, usize)> = (1..token.len())
            .filter_map(|i| {
                let l = rank_of.get(&token[..i])?;
                let r = rank_of.get(&token[i..])?;
                Some((*l, *r, i))
            })
            .collect();
        local.sort();
        for (_, _, i) in local {
            if !first {
                out.push(',');
            }
            first = false;
            out.push('[');
            out.push_str(&json_str(&to_str(&token[..i])));
            out.push(',');
            out.push_str(&json_str(&to_str(&token[i..])));
            out.push(']');
            n_merges += 1;
        }
    }
    out.push_str("]}}");
    assert!(
        n_merges > 199_000,
        "every multi-byte token needs at least one merge"
    );
    out
}

/// The HF tokenizer, built once per test binary into a temporary directory (building the
/// 200k-token file takes well under a second; loading it through `tokenizers` about a second).
fn hf_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let t = Instant::now();
        let json = o200k_tokenizer_json();
        std::fs::write(&path, &json).unwrap();
        eprintln!(
            "built tokenizer.json ({} bytes) in {:.1?}",
            json.len(),
            t.elapsed()
        );
        let t = Instant::now();
        // Through `for_model_dir`, as the engine loads it.
        let tok = Tokenizer::for_model_dir(dir.path()).unwrap();
        assert_eq!(tok.source(), &TokenizerSource::TokenizerJson(path));
        eprintln!("loaded it in {:.1?}", t.elapsed());
        tok
    })
}

#[test]
fn tokenizer_json_matches_embedded() {
    let hf = hf_tokenizer();
    let emb = Tokenizer::embedded().unwrap();
    assert!(matches!(hf.source(), TokenizerSource::TokenizerJson(_)));
    assert_eq!(hf.vocab_size(), VOCAB_SIZE);

    // Spec §8.3: the §7 ids, prompt and completion.
    assert_eq!(hf.encode(SPEC_PROMPT, true).unwrap(), SPEC_PROMPT_TOKENS);
    assert_eq!(
        hf.encode(SPEC_COMPLETION, true).unwrap(),
        SPEC_COMPLETION_TOKENS
    );

    for text in stress_texts() {
        for allow_special in [false, true] {
            let a = emb.encode(&text, allow_special).unwrap();
            let b = hf.encode(&text, allow_special).unwrap();
            assert_eq!(
                a,
                b,
                "ids differ (allow_special={allow_special}) for {:?}",
                text.chars().take(80).collect::<String>()
            );
            assert_eq!(hf.decode(&b), text);
        }
    }
}

#[test]
fn tokenizer_json_has_the_same_vocabulary() {
    let hf = hf_tokenizer();
    let emb = Tokenizer::embedded().unwrap();
    for id in 0..VOCAB_SIZE as u32 {
        assert_eq!(hf.token_bytes(id), emb.token_bytes(id), "id {id}");
        assert_eq!(hf.is_special(id), emb.is_special(id), "id {id}");
    }
    assert_eq!(hf.token_to_id("<|call|>"), Some(CALL));
    assert_eq!(hf.token_bytes(VOCAB_SIZE as u32), None);
}

/// Every single token's bytes, when they are valid UTF-8, must encode back to that token with
/// both sources (tiktoken's "whole piece in the vocabulary" shortcut vs HF's `ignore_merges`),
/// and concatenations of adjacent ranks must tokenize alike (exercises the merge order).
#[test]
fn tokenizer_json_matches_embedded_on_vocabulary_sweep() {
    let hf = hf_tokenizer();
    let emb = Tokenizer::embedded().unwrap();
    let mut checked = 0;
    let mut batch = String::new();
    for id in 0..STARTOFTEXT {
        let Ok(text) = std::str::from_utf8(emb.token_bytes(id).unwrap()) else {
            continue;
        };
        batch.push_str(text);
        if batch.len() > 4000 {
            assert_eq!(
                emb.encode_ordinary(&batch).unwrap(),
                hf.encode_ordinary(&batch).unwrap(),
                "batch ending at id {id}"
            );
            checked += 1;
            batch.clear();
        }
    }
    assert!(checked > 200, "{checked}");
}

/// Pseudo-random strings over an alphabet mixing scripts, digits, punctuation and whitespace,
/// to catch differences in merge order that hand-picked texts could miss.
#[test]
fn tokenizer_json_matches_embedded_on_random_text() {
    let hf = hf_tokenizer();
    let emb = Tokenizer::embedded().unwrap();
    let alphabet: Vec<char> =
        "aeiou tnsrl THE  \t\n\r\n0123456789.,;:!?'\"-_/\\()[]{}<>|=+*&^%$#@~`\
        éüßñçøåæœ日本語中文한국어ÄÖÜЖжЯяαβγشلامעבר💖🚀👍🏽\u{301}\u{308}\u{200B}\u{00A0}\u{3000}"
            .chars()
            .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..2000 {
        let len = (next() % 120) as usize;
        let text: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        assert_eq!(
            emb.encode_ordinary(&text).unwrap(),
            hf.encode_ordinary(&text).unwrap(),
            "{text:?}"
        );
    }
    // Real text: this crate's sources.
    for source in [
        include_str!("../src/tokenizer.rs"),
        include_str!("../src/lib.rs"),
        include_str!("tokenizer.rs"),
    ] {
        assert_eq!(
            emb.encode(source, true).unwrap(),
            hf.encode(source, true).unwrap()
        );
    }
}

/// Long runs (which make the o200k regex backtrack) encode, alike, with both sources.
#[test]
fn huge_inputs_do_not_panic() {
    let hf = hf_tokenizer();
    let emb = Tokenizer::embedded().unwrap();
    for text in [
        " ".repeat(200_000),
        "\n".repeat(100_000),
        format!("a{}b", " \t".repeat(50_000)),
        "é".repeat(100_000),
        "!".repeat(100_000),
    ] {
        let t = Instant::now();
        let a = emb.encode_ordinary(&text).unwrap();
        let b = hf.encode_ordinary(&text).unwrap();
        eprintln!("{} bytes: {:.1?}", text.len(), t.elapsed());
        assert_eq!(a, b);
        assert_eq!(emb.decode(&a), text);
    }
}
