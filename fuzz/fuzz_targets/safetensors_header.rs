//! Arbitrary bytes as a whole safetensors file: `parse_safetensors_header` must return `Ok` or
//! `Err`, never panic, and every range it returns must lie inside the file and hold exactly
//! `numel * dtype size` bytes (what `Checkpoint::get` later slices the mapping with).

#![no_main]

use std::path::Path;

use gptoss_formats::checkpoint::parse_safetensors_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse_safetensors_header(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    for e in &entries {
        assert!(
            e.range.start <= e.range.end,
            "{}: inverted range {:?}",
            e.name,
            e.range
        );
        assert!(
            e.range.end <= data.len(),
            "{}: range {:?} beyond {} bytes",
            e.name,
            e.range,
            data.len()
        );
        assert!(
            e.range.start >= 8,
            "{}: range {:?} overlaps the length field",
            e.name,
            e.range
        );
        let numel = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| n.checked_mul(e.dtype.size()));
        assert_eq!(
            want,
            Some(e.range.len()),
            "{}: {:?} {:?} but {} data bytes",
            e.name,
            e.dtype,
            e.shape,
            e.range.len()
        );
        std::hint::black_box(&data[e.range.clone()]);
    }
});
