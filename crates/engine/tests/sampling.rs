//! Behavioural tests of `gptoss_engine::sampling` through its public API.

use gptoss_engine::sampling::{
    LogprobsMode, MAX_LOGPROBS, SampledToken, Sampler, SamplingError, SamplingParams,
};

/// A sampler with a fixed seed.
fn seeded(params: SamplingParams, seed: u64) -> Sampler {
    Sampler::new(SamplingParams {
        seed: Some(seed),
        ..params
    })
    .unwrap()
}

/// Deterministic pseudo-random logits in roughly `[-8, 8)` (SplitMix64).
fn pseudo_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
        })
        .collect()
}

/// Empirical frequencies of `draws` samples over `logits`.
fn frequencies(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut s = seeded(params, 1234);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[s.sample(logits).unwrap().id as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "token {i}: got {g:.4}, want {w:.4} (all {got:?})"
        );
    }
}

/// `ln` of a probability vector, as logits.
fn logits_of(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&x| x.ln() as f32).collect()
}

const P3: [f64; 3] = [0.5, 0.3, 0.2];
const DRAWS: usize = 20_000;
/// > 4.5 standard deviations of a frequency estimated from 20k draws.
const TOL: f64 = 0.016;

// ---------------------------------------------------------------- determinism

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let logits = pseudo_logits(1000, 7)
        .iter()
        .map(|x| x * 0.1)
        .collect::<Vec<_>>();
    let params = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    let run = |seed| {
        let mut s = seeded(params.clone(), seed);
        (0..64)
            .map(|_| s.sample(&logits).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));

    // Unseeded samplers draw from entropy: two of them disagree.
    let unseeded = || {
        let mut s = Sampler::new(params.clone()).unwrap();
        (0..64)
            .map(|_| s.sample(&logits).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_ne!(unseeded(), unseeded());
}

#[test]
fn seeded_sequence_is_reproducible_with_all_filters() {
    let logits = pseudo_logits(201_088, 3);
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(100),
        top_p: 0.9,
        min_p: 0.01,
        presence_penalty: 0.5,
        frequency_penalty: 0.3,
        ..Default::default()
    };
    let run = || {
        let mut s = seeded(params.clone(), 5);
        (0..20)
            .map(|_| s.sample(&logits).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

// --------------------------------------------------------------------- greedy

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]).unwrap().id, 1);
    assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]).unwrap().id, 1);
    let logits = pseudo_logits(201_088, 11);
    let want = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
    assert_eq!(s.sample(&logits).unwrap().id as usize, want.unwrap());
}

#[test]
fn top_k_one_is_greedy() {
    let logits = pseudo_logits(50_000, 21);
    let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
    let want = greedy.sample(&logits).unwrap().id;
    let params = SamplingParams {
        temperature: 1.5,
        top_k: Some(1),
        ..Default::default()
    };
    for seed in 0..20 {
        assert_eq!(
            seeded(params.clone(), seed).sample(&logits).unwrap().id,
            want
        );
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let logits = pseudo_logits(50_000, 22);
    let want = Sampler::new(SamplingParams::greedy())
        .unwrap()
        .sample(&logits)
        .unwrap()
        .id;
    let params = SamplingParams {
        temperature: 2.0,
        top_p: 1e-6,
        ..Default::default()
    };
    for seed in 0..20 {
        assert_eq!(
            seeded(params.clone(), seed).sample(&logits).unwrap().id,
            want
        );
    }
}

// -------------------------------------------------------------- distributions

#[test]
fn temperature_one_reproduces_the_distribution() {
    let f = frequencies(SamplingParams::default(), &logits_of(&P3), DRAWS);
    assert_close(&f, &P3, TOL);
}

#[test]
fn temperature_sharpens_and_flattens() {
    // softmax(log p / T) ∝ p^(1/T)
    let pow = |e: f64| {
        let w: Vec<f64> = P3.iter().map(|p| p.powf(e)).collect();
        let z: f64 = w.iter().sum();
        w.iter().map(|x| x / z).collect::<Vec<_>>()
    };
    for t in [0.5f32, 2.0] {
        let params = SamplingParams {
            temperature: t,
            ..Default::default()
        };
        let f = frequencies(params, &logits_of(&P3), DRAWS);
        assert_close(&f, &pow(1.0 / t as f64), TOL);
    }
}

#[test]
fn top_k_truncates_and_renormalises() {
    let params = SamplingParams {
        top_k: Some(2),
        ..Default::default()
    };
    let f = frequencies(params, &logits_of(&P3), DRAWS);
    assert_close(&f, &[0.625, 0.375, 0.0], TOL);
    assert_eq!(f[2], 0.0);
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Mass before token 1 is 0.5 < 0.6: kept; before token 2 it is 0.8: cut.
    let params = SamplingParams {
        top_p: 0.6,
        ..Default::default()
    };
    let f = frequencies(params, &logits_of(&P3), DRAWS);
    assert_close(&f, &[0.625, 0.375, 0.0], TOL);
    assert_eq!(f[2], 0.0);
}

#[test]
fn min_p_filters_relative_to_the_top_token() {
    // Threshold 0.5 * 0.5 = 0.25: token 1 (0.3) stays, token 2 (0.2) goes.
    let params = SamplingParams {
        min_p: 0.5,
        ..Default::default()
    };
    let f = frequencies(params, &logits_of(&P3), DRAWS);
    assert_close(&f, &[0.625, 0.375, 0.0], TOL);
    assert_eq!(f[2], 0.0);

    // min_p = 1 keeps only the most likely token.
    let params = SamplingParams {
        min_p: 1.0,
        ..Default::default()
    };
    assert_eq!(
        frequencies(params, &logits_of(&P3), 200),
        vec![1.0, 0.0, 0.0]
    );
}

#[test]
fn top_p_then_min_p() {
    // top_p 0.95 keeps all three (mass before token 2 is 0.8), then min_p
    // 0.5 (threshold 0.25) drops token 2.
    let params = SamplingParams {
        top_p: 0.95,
        min_p: 0.5,
        ..Default::default()
    };
    let f = frequencies(params, &logits_of(&P3), DRAWS);
    assert_close(&f, &[0.625, 0.375, 0.0], TOL);
    assert_eq!(f[2], 0.0);
}

#[test]
fn min_p_applies_to_the_tempered_distribution() {
    // At T = 0.5 the probabilities are ∝ p²: 0.658, 0.237, 0.105. min_p 0.3
    // (threshold 0.197) keeps tokens 0 and 1, which at T = 1 would keep all.
    let params = SamplingParams {
        temperature: 0.5,
        min_p: 0.3,
        ..Default::default()
    };
    let f = frequencies(params, &logits_of(&P3), DRAWS);
    assert_close(&f, &[0.25 / 0.34, 0.09 / 0.34, 0.0], TOL);
}

#[test]
fn filters_on_a_full_size_vocabulary_only_yield_allowed_tokens() {
    let logits = pseudo_logits(201_088, 99);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let top50: Vec<u32> = order[..50].to_vec();

    let params = SamplingParams {
        top_k: Some(50),
        ..Default::default()
    };
    let mut s = seeded(params, 1);
    for _ in 0..200 {
        assert!(top50.contains(&s.sample(&logits).unwrap().id));
    }

    // Flat logits: the 0.3-nucleus is the lowest 30% of ids (ties by id),
    // tens of thousands of tokens (exercises the growing partial sort).
    let flat = vec![0.25f32; 201_088];
    let params = SamplingParams {
        top_p: 0.3,
        ..Default::default()
    };
    let mut s = seeded(params, 2);
    let limit = (0.3 * 201_088.0f64).ceil() as u32;
    let mut max_seen = 0;
    for _ in 0..500 {
        let id = s.sample(&flat).unwrap().id;
        assert!(id < limit, "{id} is outside the nucleus");
        max_seen = max_seen.max(id);
    }
    assert!(
        max_seen > limit / 2,
        "nucleus looks too small: max id {max_seen}"
    );
}

// ------------------------------------------------------------------ penalties

#[test]
fn frequency_penalty_scales_with_count() {
    let logits = [1.0f32, 0.7, 0.0];
    let params = SamplingParams {
        temperature: 0.0,
        frequency_penalty: 0.2,
        ..Default::default()
    };
    let mut s = Sampler::new(params).unwrap();
    // 1.0 (count 0) > 0.7; 0.8 (count 1) > 0.7; then 0.6 (count 2) < 0.7.
    assert_eq!(s.sample(&logits).unwrap().id, 0);
    assert_eq!(s.sample(&logits).unwrap().id, 0);
    assert_eq!(s.count(0), 2);
    assert_eq!(s.sample(&logits).unwrap().id, 1);
    assert_eq!(s.num_generated(), 3);
}

#[test]
fn presence_penalty_does_not_scale_with_count() {
    let logits = [1.0f32, 0.7];
    let params = SamplingParams {
        temperature: 0.0,
        presence_penalty: 0.2,
        ..Default::default()
    };
    let mut s = Sampler::new(params.clone()).unwrap();
    for _ in 0..10 {
        assert_eq!(s.sample(&logits).unwrap().id, 0); // 0.8 > 0.7 however often
    }
    let mut s = Sampler::new(SamplingParams {
        presence_penalty: 0.5,
        ..params
    })
    .unwrap();
    assert_eq!(s.sample(&logits).unwrap().id, 0);
    assert_eq!(s.sample(&logits).unwrap().id, 1); // 0.5 < 0.7
}

#[test]
fn negative_penalty_encourages_repetition() {
    let logits = [1.0f32, 0.9];
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.0,
        frequency_penalty: -2.0,
        ..Default::default()
    })
    .unwrap();
    s.accept(1);
    assert_eq!(s.sample(&logits).unwrap().id, 1);
}

#[test]
fn additive_penalties_ignore_the_prompt_but_repetition_penalty_does_not() {
    let logits = [1.0f32, 0.9, -1.0, -1.5];
    let params = SamplingParams {
        temperature: 0.0,
        presence_penalty: 2.0,
        frequency_penalty: 2.0,
        ..Default::default()
    };
    let mut s = Sampler::new(params).unwrap().with_prompt_tokens(&[0, 0, 0]);
    assert_eq!(s.sample(&logits).unwrap().id, 0);

    let rp = SamplingParams {
        temperature: 0.0,
        repetition_penalty: Some(2.0),
        ..Default::default()
    };
    // Positive logits are divided: 1.0 / 2 = 0.5 < 0.9.
    let mut s = Sampler::new(rp.clone()).unwrap().with_prompt_tokens(&[0]);
    assert_eq!(s.sample(&logits).unwrap().id, 1);
    // Negative logits are multiplied: -1.0 * 2 = -2.0 < -1.5.
    let neg = [-1.0f32, -1.5];
    let mut s = Sampler::new(rp.clone()).unwrap().with_prompt_tokens(&[0]);
    assert_eq!(s.sample(&neg).unwrap().id, 1);
    // Generated tokens count too.
    let mut s = Sampler::new(rp).unwrap();
    assert_eq!(s.sample(&logits).unwrap().id, 0);
    assert_eq!(s.sample(&logits).unwrap().id, 1);
}

#[test]
fn penalties_never_touch_the_callers_logits() {
    let logits = vec![1.0f32, 0.5];
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.0,
        frequency_penalty: 2.0,
        ..Default::default()
    })
    .unwrap();
    s.sample(&logits).unwrap();
    s.sample(&logits).unwrap();
    assert_eq!(logits, vec![1.0, 0.5]);
}

// ------------------------------------------------------------------- logprobs

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = x.iter().map(|v| (v - m).exp()).sum();
    x.iter().map(|v| v - m - z.ln()).collect()
}

#[test]
fn logprobs_are_raw_model_logprobs_by_default() {
    let logits = [2.0f32, 1.0, 0.5, -1.0, 0.5];
    let lsm = log_softmax(&logits);
    let params = SamplingParams {
        temperature: 0.3,
        presence_penalty: 1.0,
        top_k: Some(2),
        logprobs: Some(3),
        ..Default::default()
    };
    let mut s = seeded(params, 8);
    for _ in 0..5 {
        let SampledToken {
            id,
            logprob,
            top_logprobs,
        } = s.sample(&logits).unwrap();
        assert!((logprob - lsm[id as usize]).abs() < 1e-5);
        let ids: Vec<u32> = top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![0, 1, 2]); // tie 2 vs 4 -> lower id
        for (i, lp) in top_logprobs {
            assert!((lp - lsm[i as usize]).abs() < 1e-5);
        }
    }
}

#[test]
fn penalized_logprobs_mode_reflects_penalties() {
    let logits = [2.0f32, 1.0];
    let params = SamplingParams {
        temperature: 0.0,
        frequency_penalty: 1.5,
        logprobs: Some(2),
        ..Default::default()
    };
    let mut s = Sampler::new(params)
        .unwrap()
        .with_logprobs_mode(LogprobsMode::Penalized);
    let first = s.sample(&logits).unwrap();
    assert_eq!(first.id, 0);
    let second = s.sample(&logits).unwrap(); // token 0 now at 0.5
    assert_eq!(second.id, 1);
    let lsm = log_softmax(&[0.5, 1.0]);
    assert!((second.logprob - lsm[1]).abs() < 1e-5);
    assert_eq!(second.top_logprobs[0].0, 1);
    assert!((second.top_logprobs[1].1 - lsm[0]).abs() < 1e-5);
}

#[test]
fn no_logprobs_unless_requested_and_capped_by_vocab() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert!(s.sample(&[0.0, 1.0]).unwrap().top_logprobs.is_empty());
    let mut s = Sampler::new(SamplingParams {
        logprobs: Some(MAX_LOGPROBS),
        ..SamplingParams::greedy()
    })
    .unwrap();
    assert_eq!(s.sample(&[0.0, 1.0, 2.0]).unwrap().top_logprobs.len(), 3);
}

// ------------------------------------------------------------ non-finite input

#[test]
fn nan_is_never_sampled_and_inf_dominates() {
    let nan = f32::NAN;
    for temperature in [0.0f32, 1.0, 2.0] {
        let params = SamplingParams {
            temperature,
            logprobs: Some(3),
            ..Default::default()
        };
        let mut s = seeded(params, 4);
        for _ in 0..100 {
            let t = s.sample(&[nan, 1.0, nan, f32::NEG_INFINITY]).unwrap();
            assert_eq!(t.id, 1);
            assert!(t.logprob.abs() < 1e-6);
            assert!(t.top_logprobs.iter().all(|(_, lp)| !lp.is_nan()));
        }
        let t = s.sample(&[0.0, f32::INFINITY, 5.0, nan]).unwrap();
        assert_eq!(t.id, 1);
        assert!(!t.logprob.is_nan());
    }
}

#[test]
fn hopeless_logits_are_errors_not_panics() {
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    assert_eq!(s.sample(&[]), Err(SamplingError::EmptyLogits));
    assert_eq!(
        s.sample(&[f32::NAN, f32::NEG_INFINITY]),
        Err(SamplingError::NoFiniteLogits { vocab: 2 })
    );
    let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(
        g.sample(&[f32::NAN; 4]),
        Err(SamplingError::NoFiniteLogits { vocab: 4 })
    );
    // The sampler is still usable afterwards and nothing was recorded.
    assert_eq!(s.num_generated(), 0);
    assert_eq!(g.sample(&[0.0, 1.0]).unwrap().id, 1);
}

// ----------------------------------------------------------------- validation

fn message(p: SamplingParams) -> (String, &'static str) {
    match p.validate() {
        Err(SamplingError::InvalidParameter { param, message, .. }) => {
            assert_eq!(
                Sampler::new(p).unwrap_err().to_string(),
                message,
                "Sampler::new must validate too"
            );
            (message, param)
        }
        other => panic!("expected an invalid-parameter error, got {other:?}"),
    }
}

#[test]
fn validation_messages_name_field_and_range() {
    let d = SamplingParams::default;
    assert_eq!(
        message(SamplingParams { temperature: 2.5, ..d() }),
        (
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead."
                .to_string(),
            "temperature"
        )
    );
    assert_eq!(
        message(SamplingParams {
            temperature: -0.1,
            ..d()
        })
        .0,
        "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got -0.1 instead."
    );
    assert_eq!(
        message(SamplingParams { top_p: 0.0, ..d() }).0,
        "Invalid 'top_p': decimal below minimum value. Expected a value > 0, but got 0 instead."
    );
    assert_eq!(
        message(SamplingParams { top_p: 1.01, ..d() }).0,
        "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.01 instead."
    );
    assert_eq!(
        message(SamplingParams { min_p: 1.5, ..d() }).0,
        "Invalid 'min_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."
    );
    assert_eq!(
        message(SamplingParams {
            presence_penalty: -3.0,
            ..d()
        })
        .0,
        "Invalid 'presence_penalty': decimal below minimum value. Expected a value >= -2, but got -3 instead."
    );
    assert_eq!(
        message(SamplingParams {
            frequency_penalty: 2.1,
            ..d()
        })
        .0,
        "Invalid 'frequency_penalty': decimal above maximum value. Expected a value <= 2, but got 2.1 instead."
    );
    assert_eq!(
        message(SamplingParams {
            repetition_penalty: Some(0.0),
            ..d()
        })
        .0,
        "Invalid 'repetition_penalty': decimal below minimum value. Expected a value > 0, but got 0 instead."
    );
    assert_eq!(
        message(SamplingParams {
            logprobs: Some(21),
            ..d()
        })
        .0,
        "Invalid 'logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead."
    );
    assert_eq!(
        message(SamplingParams {
            temperature: f32::NAN,
            ..d()
        }),
        (
            "Invalid 'temperature': expected a number, but got NaN instead.".to_string(),
            "temperature"
        )
    );
    assert_eq!(
        message(SamplingParams {
            top_p: f32::INFINITY,
            ..d()
        })
        .1,
        "top_p"
    );
}

#[test]
fn boundary_values_are_accepted() {
    let ok = [
        SamplingParams::default(),
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: Some(2.0),
            top_k: Some(0),
            logprobs: Some(MAX_LOGPROBS),
            seed: Some(0),
        },
        SamplingParams {
            top_p: 1e-9,
            presence_penalty: 2.0,
            frequency_penalty: -2.0,
            logprobs: Some(0),
            ..Default::default()
        },
    ];
    for p in ok {
        assert_eq!(p.validate(), Ok(()), "{p:?}");
    }
}

#[test]
fn deserialisation_defaults_and_top_k_conventions() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.2, "top_k": -1}"#).unwrap();
    assert_eq!(
        p,
        SamplingParams {
            temperature: 0.2,
            ..Default::default()
        }
    );
    let p: SamplingParams = serde_json::from_str(r#"{"top_k": 40, "seed": 7}"#).unwrap();
    assert_eq!((p.top_k, p.seed, p.temperature), (Some(40), Some(7), 1.0));
    let p: SamplingParams = serde_json::from_str(r#"{"top_k": 0}"#).unwrap();
    assert_eq!(p.top_k, None);
    let err = serde_json::from_str::<SamplingParams>(r#"{"top_k": -5}"#).unwrap_err();
    assert!(err.to_string().contains("Invalid 'top_k'"), "{err}");
}

#[test]
fn top_k_path_and_full_vocabulary_path_agree() {
    // With top_k = n - 1 the sampler filters a candidate list; with the
    // least likely token masked instead it works on the whole vocabulary.
    // Same survivors after top-p and min-p, so the same draws.
    let logits = pseudo_logits(1500, 31)
        .iter()
        .map(|x| x * 0.4)
        .collect::<Vec<_>>();
    let worst = (0..logits.len())
        .min_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let mut masked = logits.clone();
    masked[worst] = f32::NEG_INFINITY;
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 0.8,
        min_p: 0.02,
        ..Default::default()
    };
    let mut a = seeded(
        SamplingParams {
            top_k: Some(logits.len() - 1),
            ..params.clone()
        },
        12,
    );
    let mut b = seeded(params, 12);
    for _ in 0..200 {
        assert_eq!(a.sample(&logits).unwrap().id, b.sample(&masked).unwrap().id);
    }
}

#[test]
fn draw_depends_only_on_the_surviving_set_not_on_how_it_was_filtered() {
    // top_k = n - 1 (which partially reorders the candidates) and masking
    // the least likely token with -inf leave the same survivors, so the same
    // seed must draw the same tokens.
    let logits = pseudo_logits(5000, 17)
        .iter()
        .map(|x| x * 0.05)
        .collect::<Vec<_>>();
    let worst = (0..logits.len())
        .min_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let mut masked = logits.clone();
    masked[worst] = f32::NEG_INFINITY;
    let mut a = seeded(
        SamplingParams {
            top_k: Some(logits.len() - 1),
            ..Default::default()
        },
        6,
    );
    let mut b = seeded(SamplingParams::default(), 6);
    for _ in 0..50 {
        assert_eq!(a.sample(&logits).unwrap().id, b.sample(&masked).unwrap().id);
    }
}

/// Rough per-step cost on a GPT-OSS-sized vocabulary. Run with
/// `cargo test --release -p gptoss-engine --test sampling -- --ignored --nocapture`.
#[test]
#[ignore = "timing report, not a check"]
fn timing_full_vocabulary() {
    let logits = pseudo_logits(201_088, 5);
    let cases: [(&str, SamplingParams); 6] = [
        ("greedy", SamplingParams::greedy()),
        ("temperature 1", SamplingParams::default()),
        (
            "top_k 50",
            SamplingParams {
                top_k: Some(50),
                ..Default::default()
            },
        ),
        (
            "top_p 0.9",
            SamplingParams {
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "min_p 0.05",
            SamplingParams {
                min_p: 0.05,
                ..Default::default()
            },
        ),
        (
            "top_k 50 + top_p + 20 logprobs + penalties",
            SamplingParams {
                top_k: Some(50),
                top_p: 0.9,
                logprobs: Some(20),
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                ..Default::default()
            },
        ),
    ];
    for (name, params) in cases {
        // Per-step times; the median and minimum are robust to a busy machine.
        let mut s = seeded(params, 1);
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let t = std::time::Instant::now();
                s.sample(&logits).unwrap();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{name:>45}: median {:8.1} µs, min {:8.1} µs",
            times[times.len() / 2],
            times[0]
        );
    }
}
