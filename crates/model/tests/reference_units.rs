//! Unit tests of the reference forward's pieces, with hand-computed expectations, plus
//! whole-model checks on tiny random checkpoints against a naive, literal transcription of
//! spec model.md §2 written independently here.

use gptoss_formats::checkpoint::DType;
use gptoss_formats::weights::{MatrixData, Orientation};
use gptoss_formats::{Checkpoint, Matrix, ModelWeights};
use gptoss_model::reference::attention::{attend, visible_keys};
use gptoss_model::reference::kv_cache::LayerKv;
use gptoss_model::reference::linear::matmul;
use gptoss_model::reference::moe::{route, swiglu};
use gptoss_model::reference::testing::{TinyLayout, max_rel, write_tiny_checkpoint};
use gptoss_model::reference::{KvCache, ReferenceError, ReferenceModel, Rope, SeqInput};

/// spec model.md §4, `inv[0..31]` (f64).
const SPEC_INV: [f64; 32] = [
    1.000000000e+00,
    6.890443059e-01,
    4.747820555e-01,
    3.271458719e-01,
    2.254180002e-01,
    1.553229895e-01,
    1.070244215e-01,
    7.374456821e-02,
    5.081327482e-02,
    3.170569618e-02,
    1.933500113e-02,
    1.159204926e-02,
    6.794959490e-03,
    3.860359317e-03,
    2.093792379e-03,
    1.052602101e-03,
    4.564839192e-04,
    1.293187012e-04,
    3.830881237e-05,
    2.639646903e-05,
    1.818833668e-05,
    1.253256982e-05,
    8.635495875e-06,
    5.950239261e-06,
    4.099978482e-06,
    2.825066827e-06,
    1.946596211e-06,
    1.341291035e-06,
    9.242089502e-07,
    6.368209146e-07,
    4.387978251e-07,
    3.023511428e-07,
];

fn gpt_oss_rope() -> Rope {
    Rope::yarn(64, 150000.0, 32.0, 4096.0, 32.0, 1.0)
}

#[test]
fn rope_yarn_table_matches_the_spec_numbers() {
    let rope = gpt_oss_rope();
    assert!(
        (rope.low - 8.092779115512402).abs() < 1e-12,
        "low = {}",
        rope.low
    );
    assert!(
        (rope.high - 17.39802450158856).abs() < 1e-12,
        "high = {}",
        rope.high
    );
    assert!((rope.concentration as f64 - 1.3465735902799727).abs() < 1e-7);
    assert_eq!(rope.inv_freq.len(), 32);
    for (i, (&got, &want)) in rope.inv_freq.iter().zip(&SPEC_INV).enumerate() {
        let rel = ((got as f64 - want) / want).abs();
        assert!(
            rel < 1e-6,
            "inv[{i}] = {got:e}, spec {want:e} (rel {rel:e})"
        );
    }
}

#[test]
fn rope_config_uses_untruncated_yarn_even_when_truncate_is_missing() {
    let json = gptoss_model::reference::testing::tiny_config_json()
        .replace("\"head_dim\": 16", "\"head_dim\": 64")
        .replace(", \"truncate\": false", "");
    let cfg = gptoss_formats::GptOssConfig::from_json_str(&json).unwrap();
    assert_eq!(Rope::from_config(&cfg), gpt_oss_rope());
}

#[test]
fn rope_rotates_halves_with_concentration_on_cos_and_sin() {
    let rope = gpt_oss_rope();
    let c = rope.concentration;
    for pos in [1usize, 7, 5003] {
        // x = e_i for a low and a high frequency: (x1, x2) = (1, 0) → (c·cos, c·sin) on (i, i+32).
        for i in [0usize, 3, 20] {
            let mut x = vec![0f32; 64];
            x[i] = 1.0;
            let (cos, sin) = rope.cos_sin(pos);
            rope.apply(&mut x, &cos, &sin);
            let angle = (pos as f32 * rope.inv_freq[i]) as f64;
            assert!(
                (x[i] as f64 - c as f64 * angle.cos()).abs() < 1e-6,
                "pos {pos} dim {i}"
            );
            assert!(
                (x[i + 32] as f64 - c as f64 * angle.sin()).abs() < 1e-6,
                "pos {pos} dim {i}"
            );
            let others: f32 = x
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i && *j != i + 32)
                .map(|(_, v)| v.abs())
                .sum();
            assert_eq!(others, 0.0, "rotate-half touches only dims i and i + 32");
        }
    }
    // Relative rotation: q·k depends on positions only through their difference, times c².
    let mut q: Vec<f32> = (0..64).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    let mut k: Vec<f32> = (0..64).map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0).collect();
    let plain: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
    let (c0, s0) = rope.cos_sin(0);
    rope.apply(&mut q, &c0, &s0);
    rope.apply(&mut k, &c0, &s0);
    let rotated: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
    assert!((rotated - plain * c * c).abs() < 1e-4 * plain.abs().max(1.0));
}

#[test]
fn sliding_window_holds_exactly_window_keys_including_self() {
    assert_eq!(visible_keys(10, Some(4)), 7..11);
    assert_eq!(visible_keys(3, Some(4)), 0..4);
    assert_eq!(visible_keys(2, Some(4)), 0..3);
    assert_eq!(visible_keys(200, Some(128)).len(), 128);
    assert_eq!(visible_keys(10, None), 0..11);
}

/// softmax over [scores..., sink] with the sink column dropped, in f64.
fn expected_attention(scores: &[f64], sink: f64, values: &[[f64; 2]]) -> [f64; 2] {
    let m = scores.iter().copied().fold(sink, f64::max);
    let denom: f64 = scores.iter().map(|s| (s - m).exp()).sum::<f64>() + (sink - m).exp();
    let mut out = [0.0; 2];
    for (s, v) in scores.iter().zip(values) {
        let p = (s - m).exp() / denom;
        out[0] += p * v[0];
        out[1] += p * v[1];
    }
    out
}

#[test]
fn attention_sink_is_a_raw_logit_in_max_and_denominator_only() {
    let q = [1.0f32, 2.0];
    let keys: Vec<[f32; 2]> = vec![
        [0.5, 0.25],
        [-1.0, 1.0],
        [2.0, -0.5],
        [0.0, 1.5],
        [1.0, 1.0],
        [-0.5, 0.0],
    ];
    let vals: Vec<[f32; 2]> = vec![
        [1.0, 0.0],
        [0.0, 1.0],
        [2.0, 2.0],
        [-1.0, 3.0],
        [0.5, -2.0],
        [4.0, 1.0],
    ];
    let scale = 0.5f32;
    for (t, window, sink) in [
        (5usize, Some(4usize), 0.7f32),
        (5, None, -1.3),
        (2, Some(4), 3.0),
        (5, Some(4), 40.0),
    ] {
        let range = visible_keys(t, window);
        let mut out = [0f32; 2];
        attend(
            &q,
            range.clone(),
            |j| &keys[j][..],
            |j| &vals[j][..],
            sink,
            scale,
            &mut out,
        );
        let scores: Vec<f64> = range
            .clone()
            .map(|j| ((q[0] * keys[j][0] + q[1] * keys[j][1]) * scale) as f64)
            .collect();
        let values: Vec<[f64; 2]> = range
            .map(|j| [vals[j][0] as f64, vals[j][1] as f64])
            .collect();
        let want = expected_attention(&scores, sink as f64, &values);
        for d in 0..2 {
            assert!(
                (out[d] as f64 - want[d]).abs() < 1e-6,
                "t {t} window {window:?} sink {sink}: {out:?} vs {want:?}"
            );
        }
    }
    // Hand-computed: one key with score 0 and a sink of 0 → the value is halved.
    let mut out = [0f32; 2];
    attend(
        &[0.0, 0.0],
        0..1,
        |_| &[1.0f32, 1.0][..],
        |_| &[3.0f32, -4.0][..],
        0.0,
        0.125,
        &mut out,
    );
    assert_eq!(out, [1.5, -2.0]);
    // Window of 4 at t = 5: keys 2..=5, so key 1's huge value must not leak in.
    let mut vals2 = vals.clone();
    vals2[1] = [1e6, 1e6];
    let mut a = [0f32; 2];
    let mut b = [0f32; 2];
    attend(
        &q,
        visible_keys(5, Some(4)),
        |j| &keys[j][..],
        |j| &vals[j][..],
        0.1,
        scale,
        &mut a,
    );
    attend(
        &q,
        visible_keys(5, Some(4)),
        |j| &keys[j][..],
        |j| &vals2[j][..],
        0.1,
        scale,
        &mut b,
    );
    assert_eq!(a, b);
}

#[test]
fn router_softmax_is_over_the_selected_logits_only() {
    let logits = [0.1f32, 2.0, -1.0, 1.5, 3.0, 0.0, 1.9, -3.0];
    let sel = route(&logits, 4);
    let idx: Vec<usize> = sel.iter().map(|s| s.0).collect();
    assert_eq!(idx, vec![4, 1, 6, 3]);
    let top = [3.0f64, 2.0, 1.9, 1.5];
    let z: f64 = top.iter().map(|x| x.exp()).sum();
    for ((_, w), x) in sel.iter().zip(top) {
        assert!((*w as f64 - x.exp() / z).abs() < 1e-7);
    }
    let total: f32 = sel.iter().map(|s| s.1).sum();
    assert!((total - 1.0).abs() < 1e-6);
}

#[test]
fn swiglu_clamps_gate_above_and_up_both_sides() {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let f = |g: f64, u: f64| {
        let g = g.min(7.0);
        let u = u.clamp(-7.0, 7.0);
        (u + 1.0) * g * sig(1.702 * g)
    };
    // (gate, up) pairs: in range, gate above, gate far below (unclamped), up above, up below.
    let pairs = [
        (0.5f32, -0.25f32),
        (9.0, 1.0),
        (-9.0, 0.5),
        (1.0, 12.0),
        (2.0, -10.0),
        (7.5, -7.5),
    ];
    let gu: Vec<f32> = pairs.iter().flat_map(|&(g, u)| [g, u]).collect();
    let mut out = vec![0f32; pairs.len()];
    swiglu(&gu, 1.702, 7.0, &mut out);
    for (o, &(g, u)) in out.iter().zip(&pairs) {
        let want = f(g as f64, u as f64);
        assert!(
            (*o as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
            "gate {g} up {u}: {o} vs {want}"
        );
    }
    // By hand: gate 1, up 12 → 7: (7 + 1) · 1 · σ(1.702) = 8 · 0.8457958…
    assert!((out[3] - 8.0 * 0.845_795_8).abs() < 1e-5, "{}", out[3]);
    // gate 9 → 7, up 1: 2 · 7 · σ(11.914) = 13.99990…
    assert!(
        (out[1] - 2.0 * 7.0 / (1.0 + (-11.914f32).exp())).abs() < 1e-5,
        "{}",
        out[1]
    );
}

#[test]
fn kv_ring_keeps_exactly_the_window() {
    let mut lc = LayerKv::new(2, Some(4));
    for j in 0..10 {
        lc.push(&[j as f32, 0.0], &[0.0, j as f32]);
        assert_eq!(lc.first_kept(), (j + 1usize).saturating_sub(4));
    }
    for j in 6..10 {
        assert_eq!(lc.key(j), &[j as f32, 0.0]);
        assert_eq!(lc.value(j), &[0.0, j as f32]);
    }
    assert_eq!(lc.memory_bytes(), 2 * 4 * 2 * 4, "bounded by the window");
    assert!(std::panic::catch_unwind(|| lc.key(5).to_vec()).is_err());
    let mut full = LayerKv::new(2, None);
    for j in 0..10 {
        full.push(&[j as f32, 1.0], &[1.0, j as f32]);
    }
    assert_eq!(full.key(0), &[0.0, 1.0]);
}

fn dense(rows: usize, cols: usize, orientation: Orientation, bytes: &[u8]) -> Matrix<'_> {
    Matrix {
        name: "test".into(),
        rows,
        cols,
        orientation,
        data: MatrixData::Dense {
            dtype: DType::F32,
            bytes,
        },
    }
}

#[test]
fn matmul_in_out_and_out_in_agree_with_a_naive_product() {
    let (rows, cols, t) = (150, 37, 3);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let x: Vec<f32> = (0..t * cols)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
        .collect();
    let b: Vec<f32> = (0..rows).map(|r| r as f32 * 0.01).collect();
    let out_in: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut wt = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            wt[c * rows + r] = w[r * cols + c];
        }
    }
    let in_out: Vec<u8> = wt.iter().flat_map(|v| v.to_le_bytes()).collect();
    let y1 = matmul(
        &x,
        t,
        &dense(rows, cols, Orientation::OutIn, &out_in),
        Some(&b),
    );
    let y2 = matmul(
        &x,
        t,
        &dense(rows, cols, Orientation::InOut, &in_out),
        Some(&b),
    );
    for ti in 0..t {
        for r in 0..rows {
            let want: f64 = (0..cols)
                .map(|c| x[ti * cols + c] as f64 * w[r * cols + c] as f64)
                .sum::<f64>()
                + b[r] as f64;
            for y in [&y1, &y2] {
                assert!(
                    (y[ti * rows + r] as f64 - want).abs() < 1e-4,
                    "t {ti} r {r}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Whole model on tiny random checkpoints.

fn tiny(layout: TinyLayout, seed: u64) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), layout, seed).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

/// spec model.md §2 transcribed literally (all weights decoded up front, no cache, f64 math).
fn naive_logits(w: &ModelWeights<'_>, tokens: &[u32], positions: &[usize]) -> Vec<f32> {
    let c = w.config;
    let (h, hd, nh, nkv) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    let t = tokens.len();
    let f64v = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect::<Vec<f64>>();
    let lin = |x: &[Vec<f64>], l: &gptoss_formats::Linear<'_>| -> Vec<Vec<f64>> {
        let (wm, r, cc) = (f64v(l.weight.to_f32()), l.weight.rows, l.weight.cols);
        let b = l.bias.as_ref().map(|b| f64v(b.to_f32()));
        x.iter()
            .map(|xr| {
                (0..r)
                    .map(|o| {
                        (0..cc).map(|i| xr[i] * wm[o * cc + i]).sum::<f64>()
                            + b.as_ref().map_or(0.0, |b| b[o])
                    })
                    .collect()
            })
            .collect()
    };
    let norm = |x: &[Vec<f64>], wv: Vec<f32>| -> Vec<Vec<f64>> {
        let wv = f64v(wv);
        x.iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let s = 1.0 / (ms + c.rms_norm_eps).sqrt();
                r.iter().zip(&wv).map(|(v, g)| v * s * g).collect()
            })
            .collect()
    };
    // RoPE straight from the spec formulas.
    let (d, base, factor) = (hd as f64, c.rope_theta, c.rope_scaling.factor);
    let corr = |r: f64| d * (4096.0 / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let (low, high) = (corr(32.0), corr(1.0));
    let conc = 0.1 * factor.ln() + 1.0;
    let rope = |x: &mut [f64], pos: usize| {
        let half = hd / 2;
        for head in x.chunks_mut(hd) {
            for i in 0..half {
                let pf = base.powf(2.0 * i as f64 / d);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let inv = (1.0 / (factor * pf)) * ramp + (1.0 / pf) * (1.0 - ramp);
                // transformers forms the angle as an f32 product of the f32 table.
                let a = (pos as f32 * inv as f32) as f64;
                let (cs, sn) = (a.cos() * conc, a.sin() * conc);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cs - x2 * sn;
                head[i + half] = x2 * cs + x1 * sn;
            }
        }
    };
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tk| f64v(w.embed.to_f32()[tk as usize * h..][..h].to_vec()))
        .collect();
    for (l, lw) in w.layers.iter().enumerate() {
        let hn = norm(&x, lw.input_norm.to_f32());
        let mut q = lin(&hn, &lw.q);
        let mut k = lin(&hn, &lw.k);
        let v = lin(&hn, &lw.v);
        for ti in 0..t {
            rope(&mut q[ti], positions[ti]);
            rope(&mut k[ti], positions[ti]);
        }
        let sinks = f64v(lw.sinks.to_f32());
        let mut o = vec![vec![0f64; nh * hd]; t];
        for hq in 0..nh {
            let g = hq / (nh / nkv);
            for ti in 0..t {
                let js: Vec<usize> = (0..=ti)
                    .filter(|&j| !c.is_sliding(l) || ti - j < c.sliding_window)
                    .collect();
                let s: Vec<f64> = js
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|dd| q[ti][hq * hd + dd] * k[j][g * hd + dd])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(sinks[hq], f64::max);
                let den = s.iter().map(|v| (v - m).exp()).sum::<f64>() + (sinks[hq] - m).exp();
                for (sj, &j) in s.iter().zip(&js) {
                    for dd in 0..hd {
                        o[ti][hq * hd + dd] += (sj - m).exp() / den * v[j][g * hd + dd];
                    }
                }
            }
        }
        let a = lin(&o, &lw.o);
        for ti in 0..t {
            for i in 0..h {
                x[ti][i] += a[ti][i];
            }
        }
        let hn = norm(&x, lw.post_norm.to_f32());
        let r = lin(&hn, &lw.router);
        for ti in 0..t {
            let mut idx: Vec<usize> = (0..c.num_local_experts).collect();
            idx.sort_by(|&a, &b| r[ti][b].partial_cmp(&r[ti][a]).unwrap());
            let top = &idx[..c.num_experts_per_tok];
            let m = r[ti][top[0]];
            let z: f64 = top.iter().map(|&e| (r[ti][e] - m).exp()).sum();
            for &e in top {
                let we = (r[ti][e] - m).exp() / z;
                let gu = lin(std::slice::from_ref(&hn[ti]), &lw.experts[e].gate_up).remove(0);
                let act: Vec<f64> = gu
                    .chunks(2)
                    .map(|p| {
                        let g = p[0].min(c.swiglu_limit);
                        let u = p[1].clamp(-c.swiglu_limit, c.swiglu_limit);
                        (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
                    })
                    .collect();
                let dn = lin(&[act], &lw.experts[e].down).remove(0);
                for i in 0..h {
                    x[ti][i] += we * dn[i];
                }
            }
        }
    }
    let xn = norm(&x, w.norm.to_f32());
    let lm = f64v(w.lm_head.to_f32());
    xn.iter()
        .flat_map(|r| {
            (0..c.vocab_size)
                .map(|o| (0..h).map(|i| r[i] * lm[o * h + i]).sum::<f64>() as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

const TOKENS: [u32; 13] = [5, 17, 96, 0, 42, 42, 7, 63, 88, 1, 30, 55, 12];

#[test]
fn tiny_model_matches_the_naive_spec_transcription_for_both_layouts() {
    let positions: Vec<usize> = (0..TOKENS.len()).collect();
    let mut results = Vec::new();
    for layout in [TinyLayout::Split, TinyLayout::Fused] {
        let (_d, ckpt) = tiny(layout, 11);
        let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
        let got = model
            .forward(&TOKENS, &positions, &mut model.new_cache())
            .unwrap();
        let want = naive_logits(model.weights(), &TOKENS, &positions);
        let err = max_rel(&got, &want);
        assert!(err < 1e-5, "{layout:?}: max rel {err:e}");
        // Positions far from 0 (RoPE at large angles), the cache starting empty.
        let far: Vec<usize> = (0..TOKENS.len()).map(|i| 70_000 + 3 * i).collect();
        let got = model
            .forward(&TOKENS, &far, &mut model.new_cache())
            .unwrap();
        let want = naive_logits(model.weights(), &TOKENS, &far);
        let err = max_rel(&got, &want);
        assert!(err < 1e-4, "{layout:?} far positions: max rel {err:e}");
        results.push(got);
    }
    assert!(
        max_rel(&results[0], &results[1]) < 1e-5,
        "split and fused storage of one model agree"
    );
}

#[test]
fn incremental_and_chunked_decoding_equal_one_full_forward() {
    let (_d, ckpt) = tiny(TinyLayout::Fused, 3);
    let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
    let n = TOKENS.len();
    let positions: Vec<usize> = (0..n).collect();
    let full = model
        .forward(&TOKENS, &positions, &mut model.new_cache())
        .unwrap();
    let v = model.config().vocab_size;
    for chunks in [vec![1; n], vec![5, 4, 4], vec![3, 1, 6, 3]] {
        let mut cache = model.new_cache();
        let mut got = Vec::new();
        let mut s = 0;
        for c in chunks {
            got.extend(
                model
                    .forward(&TOKENS[s..s + c], &positions[s..s + c], &mut cache)
                    .unwrap(),
            );
            s += c;
        }
        assert_eq!(cache.len(), n);
        let err = max_rel(&got, &full);
        assert!(err < 1e-5, "max rel {err:e}");
        assert_eq!(got.len(), n * v);
    }
    // Sliding layers hold only the window.
    let mut cache = model.new_cache();
    let long: Vec<u32> = (0..40).map(|i| (i * 7 % 97) as u32).collect();
    model
        .forward(&long, &(0..40).collect::<Vec<_>>(), &mut cache)
        .unwrap();
    let kvd = model.config().kv_dim();
    assert_eq!(cache.layer(0).memory_bytes(), 2 * 4 * kvd * 4);
    assert_eq!(cache.layer(0).first_kept(), 36);
    assert_eq!(cache.layer(1).first_kept(), 0);
}

#[test]
fn batched_sequences_equal_separate_runs() {
    let (_d, ckpt) = tiny(TinyLayout::Split, 5);
    let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
    let seqs: [&[u32]; 3] = [&TOKENS[..2], &TOKENS[2..11], &TOKENS[4..5]];
    let mut caches: Vec<KvCache> = (0..3).map(|_| model.new_cache()).collect();
    let positions: Vec<Vec<usize>> = seqs.iter().map(|s| (0..s.len()).collect()).collect();
    let mut inputs: Vec<SeqInput<'_>> = seqs
        .iter()
        .zip(&positions)
        .zip(caches.iter_mut())
        .map(|((tokens, positions), cache)| SeqInput {
            tokens,
            positions,
            cache,
        })
        .collect();
    let hidden = model.forward_batch(&mut inputs).unwrap();
    let batched = model.logits_for(&hidden);
    let v = model.config().vocab_size;
    let mut row = 0;
    for (s, p) in seqs.iter().zip(&positions) {
        let alone = model.forward(s, p, &mut model.new_cache()).unwrap();
        let err = max_rel(&batched[row * v..(row + s.len()) * v], &alone);
        assert!(err < 1e-6, "max rel {err:e}");
        row += s.len();
    }
}

#[test]
fn bad_inputs_are_errors_and_leave_the_cache_untouched() {
    let (_d, ckpt) = tiny(TinyLayout::Split, 1);
    let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
    let mut cache = model.new_cache();
    model.forward(&[1, 2], &[0, 1], &mut cache).unwrap();
    let e = model.forward(&[3, 97], &[2, 3], &mut cache).unwrap_err();
    assert_eq!(
        e,
        ReferenceError::TokenOutOfRange {
            index: 1,
            token: 97,
            vocab_size: 97
        }
    );
    assert!(e.to_string().contains("vocabulary has 97"), "{e}");
    let e = model.forward(&[3], &[131072], &mut cache).unwrap_err();
    assert!(
        matches!(
            e,
            ReferenceError::PositionOutOfRange {
                position: 131072,
                max: 131072,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(
        model.forward(&[3, 4], &[2], &mut cache),
        Err(ReferenceError::Shape(_))
    ));
    assert!(matches!(
        model.expert_forward(0, 6, &[0.0; 32]),
        Err(ReferenceError::Index(_))
    ));
    assert!(matches!(
        model.layer_forward(3, &[0.0; 32], &[0], &mut cache),
        Err(ReferenceError::Index(_))
    ));
    assert_eq!(cache.len(), 2);
    // The cache still continues correctly.
    let full = model
        .forward(&[1, 2, 3], &[0, 1, 2], &mut model.new_cache())
        .unwrap();
    let last = model.forward(&[3], &[2], &mut cache).unwrap();
    assert!(max_rel(&last, &full[2 * 97..]) < 1e-5);
}

#[test]
fn reference_model_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ReferenceModel<'static>>();
    check::<KvCache>();
}
