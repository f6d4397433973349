//! Known findings (fuzz/README.md, "Findings") that a run can step over to look for new ones:
//! with `GPTOSS_FUZZ_SKIP_KNOWN=1` in the environment, inputs that would only reproduce a known
//! panic are skipped. Without it (the default) every target reports them.

#![allow(dead_code)]

use std::sync::OnceLock;

use gptoss_formats::codec::bnb4::QuantStateJson;

/// Whether `GPTOSS_FUZZ_SKIP_KNOWN` is set to something other than `0` or empty.
pub fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| {
        std::env::var("GPTOSS_FUZZ_SKIP_KNOWN").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Finding 1: `QuantStateJson::numel` (`shape.iter().product()`) overflows, which panics in
/// `Bnb4Tensor::new` with overflow checks on (and wraps without them).
pub fn shape_product_overflows(state: &QuantStateJson) -> bool {
    state
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .is_none()
}
