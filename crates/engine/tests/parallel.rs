//! The tensor/expert-parallel CPU backend (`cpu-tp2`: two rank threads) against the unsharded
//! `CpuBackend`: same logits (1e-5 relative) through prefill and decode past the sliding window,
//! same greedy tokens, same error contract.

use std::path::Path;
use std::sync::Arc;

use gptoss_engine::backend::{Backend, BackendError, LogitsWanted, SeqStep, StepBatch};
use gptoss_engine::cpu::CpuBackend;
use gptoss_engine::parallel::ShardedCpuBackend;
use gptoss_formats::Checkpoint;
use gptoss_formats::synth::{Preset, SynthLayout, synth};
use gptoss_formats::writer::WriteOptions;
use gptoss_model::reference::testing::{fixtures_dir, max_rel};

fn micro(layout: SynthLayout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth(
        Preset::Micro,
        layout,
        3,
        dir.path(),
        WriteOptions::default(),
    )
    .unwrap();
    dir
}

fn backends(dir: &Path, world: usize) -> (CpuBackend, ShardedCpuBackend) {
    let ckpt = Arc::new(Checkpoint::open(dir).unwrap());
    (
        CpuBackend::new(Arc::clone(&ckpt)).unwrap(),
        ShardedCpuBackend::new(ckpt, world).unwrap(),
    )
}

fn step(seq: u64, tokens: &[u32], start_pos: usize, want: LogitsWanted) -> SeqStep {
    SeqStep {
        seq,
        tokens: tokens.to_vec(),
        start_pos,
        want_logits: want,
    }
}

fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919) >> 9) % vocab as u32)
        .collect()
}

/// Two sequences: a prefill of `prefill` tokens (all rows, seq 1 in two chunks), then `decode`
/// single-token steps; every step's logits compared. Returns the worst relative error.
fn compare(dir: &Path, prefill: usize, decode: usize) -> f64 {
    let (mut one, mut tp) = backends(dir, 2);
    assert_eq!(tp.name(), "cpu-tp2");
    let vocab = one.config().vocab_size;
    let seqs = [
        tokens(1, prefill + decode, vocab),
        tokens(2, prefill + decode, vocab),
    ];
    let mut worst = 0f64;
    let mut run = |batch: StepBatch, what: &str| {
        let want = one.forward(&batch).unwrap();
        let got = tp.forward(&batch).unwrap();
        assert_eq!(got.num_steps(), want.num_steps());
        for i in 0..want.num_steps() {
            let e = max_rel(got.step(i), want.step(i));
            assert!(
                e < 1e-5,
                "{}: {what} step {i}: max rel {e:e}",
                dir.display()
            );
            worst = worst.max(e);
        }
    };
    let half = prefill / 2;
    run(
        StepBatch {
            steps: vec![
                step(0, &seqs[0][..prefill], 0, LogitsWanted::All),
                step(1, &seqs[1][..half], 0, LogitsWanted::All),
            ],
        },
        "prefill",
    );
    run(
        StepBatch {
            steps: vec![step(1, &seqs[1][half..prefill], half, LogitsWanted::Last)],
        },
        "prefill chunk 2",
    );
    for p in prefill..prefill + decode {
        run(
            StepBatch {
                steps: (0..2)
                    .map(|s| step(s, &seqs[s as usize][p..p + 1], p, LogitsWanted::Last))
                    .collect(),
            },
            &format!("decode position {p}"),
        );
    }
    assert_eq!(tp.cached_len(0), Some(prefill + decode));
    worst
}

#[test]
fn two_ranks_match_the_cpu_backend_past_the_sliding_window() {
    // Fixtures: window 4, 3 layers, 8 experts, 2 kv heads.
    for name in [
        "tiny-unsloth-nf4",
        "tiny-mxfp4",
        "tiny-bf16",
        "tiny-fused-nf4",
    ] {
        let e = compare(&fixtures_dir().join(name), 7, 6);
        eprintln!("{name}: cpu-tp2 vs cpu-reference: max rel {e:.2e}");
    }
    // Micro: the real window of 128, crossed during decode.
    for layout in [SynthLayout::UnslothNf4, SynthLayout::Mxfp4] {
        let dir = micro(layout);
        let e = compare(dir.path(), 125, 6);
        eprintln!("micro {layout:?}: cpu-tp2 vs cpu-reference: max rel {e:.2e}");
    }
}

fn greedy(b: &mut dyn Backend, prompt: &[u32], steps: usize) -> Vec<u32> {
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv { (i, v) } else { (bi, bv) }
            })
            .0 as u32
    };
    let out = b
        .forward(&StepBatch {
            steps: vec![step(9, prompt, 0, LogitsWanted::Last)],
        })
        .unwrap();
    let mut generated = vec![argmax(out.last(0))];
    let mut pos = prompt.len();
    while generated.len() < steps {
        let t = *generated.last().unwrap();
        let out = b
            .forward(&StepBatch {
                steps: vec![step(9, &[t], pos, LogitsWanted::Last)],
            })
            .unwrap();
        generated.push(argmax(out.last(0)));
        pos += 1;
    }
    b.release(9);
    generated
}

#[test]
fn greedy_tokens_are_identical_for_32_steps() {
    let micro_dir = micro(SynthLayout::UnslothNf4);
    for dir in [
        fixtures_dir().join("tiny-unsloth-nf4"),
        fixtures_dir().join("tiny-fused-nf4"),
        micro_dir.path().to_path_buf(),
    ] {
        let (mut one, mut tp) = backends(&dir, 2);
        let vocab = one.config().vocab_size;
        let prompt = tokens(5, 6, vocab);
        let want = greedy(&mut one, &prompt, 32);
        let got = greedy(&mut tp, &prompt, 32);
        assert_eq!(got, want, "{}", dir.display());
        assert_eq!(tp.num_sequences(), 0);
    }
}

#[test]
fn last_greedy_steps_give_the_cpu_backends_greedy_tokens() {
    let (mut one, mut tp) = backends(&fixtures_dir().join("tiny-unsloth-nf4"), 2);
    let vocab = one.config().vocab_size;
    let seqs: Vec<Vec<u32>> = (0..3).map(|s| tokens(11 + s, 9, vocab)).collect();
    use LogitsWanted::{All, Last, LastGreedy};
    let batches = [
        StepBatch {
            steps: vec![
                step(0, &seqs[0][..6], 0, LastGreedy),
                step(1, &seqs[1][..5], 0, Last),
                step(2, &seqs[2][..4], 0, All),
            ],
        },
        StepBatch {
            steps: vec![
                step(0, &seqs[0][6..7], 6, LastGreedy),
                step(1, &seqs[1][5..6], 5, LastGreedy),
                step(2, &seqs[2][4..5], 4, Last),
            ],
        },
    ];
    for batch in batches {
        let want = one.forward(&batch).unwrap();
        let got = tp.forward(&batch).unwrap();
        for (i, s) in batch.steps.iter().enumerate() {
            if s.want_logits == LastGreedy {
                assert!(got.step(i).is_empty(), "seq {}", s.seq);
                assert!(got.greedy(i).is_some(), "seq {}", s.seq);
            } else {
                assert!(max_rel(got.step(i), want.step(i)) < 1e-5, "seq {}", s.seq);
            }
            assert_eq!(got.greedy(i), want.greedy(i), "seq {}", s.seq);
        }
    }
    assert_eq!(tp.cached_len(0), Some(7));
}

#[test]
fn invalid_world_sizes_are_refused() {
    let dir = fixtures_dir().join("tiny-bf16");
    for world in [0usize, 3, 4] {
        let e = ShardedCpuBackend::open(&dir, world).unwrap_err();
        let BackendError::Failed(msg) = &e else {
            panic!("{e:?}")
        };
        if world == 0 {
            assert!(msg.contains("at least one rank"), "{msg}");
        } else {
            assert!(
                msg.contains(&format!("over {world} ranks"))
                    && msg.contains("num_key_value_heads = 2")
                    && msg.contains("[1, 2]"),
                "{msg}"
            );
        }
    }
    let one = ShardedCpuBackend::open(&dir, 1).unwrap();
    assert_eq!(one.name(), "cpu-tp1");
}

#[test]
fn same_contract_as_the_cpu_backend() {
    let dir = fixtures_dir().join("tiny-unsloth-nf4");
    let (mut one, mut tp) = backends(&dir, 2);
    let tp_small = ShardedCpuBackend::open(&dir, 2)
        .unwrap()
        .with_max_batch_tokens(4);
    let first = StepBatch {
        steps: vec![step(7, &[1, 2, 3], 0, LogitsWanted::Last)],
    };
    let want = one.forward(&first).unwrap();
    assert!(max_rel(tp.forward(&first).unwrap().last(0), want.last(0)) < 1e-5);
    assert_eq!(tp.cached_len(7), Some(3));
    // Position checks, for a live and a new sequence.
    let e = tp
        .forward(&StepBatch {
            steps: vec![step(7, &[4], 2, LogitsWanted::Last)],
        })
        .unwrap_err();
    assert_eq!(
        e,
        BackendError::PositionMismatch {
            seq: 7,
            start_pos: 2,
            cached: 3
        }
    );
    let e = tp
        .forward(&StepBatch {
            steps: vec![step(8, &[4], 1, LogitsWanted::Last)],
        })
        .unwrap_err();
    assert!(matches!(e, BackendError::PositionMismatch { seq: 8, .. }));
    // Duplicate, empty, too large.
    let dup = StepBatch {
        steps: vec![
            step(7, &[4], 3, LogitsWanted::Last),
            step(7, &[5], 4, LogitsWanted::Last),
        ],
    };
    assert_eq!(tp.forward(&dup).unwrap_err(), BackendError::DuplicateSeq(7));
    let empty = StepBatch {
        steps: vec![step(9, &[], 0, LogitsWanted::Last)],
    };
    assert_eq!(tp.forward(&empty).unwrap_err(), BackendError::EmptyStep(9));
    let mut tp_small = tp_small;
    assert_eq!(
        tp_small
            .forward(&StepBatch {
                steps: vec![step(1, &[1, 2, 3, 4, 5], 0, LogitsWanted::Last)],
            })
            .unwrap_err(),
        BackendError::BatchTooLarge { tokens: 5, max: 4 }
    );
    // A bad token in one step refuses the whole batch on every rank: nothing changes.
    let bad = StepBatch {
        steps: vec![
            step(7, &[4], 3, LogitsWanted::Last),
            step(10, &[1, 5000], 0, LogitsWanted::Last),
        ],
    };
    let e = tp.forward(&bad).unwrap_err();
    assert!(matches!(e, BackendError::InvalidInput(_)), "{e:?}");
    assert_eq!(one.forward(&bad).unwrap_err(), e);
    assert_eq!(tp.cached_len(7), Some(3));
    assert_eq!(tp.cached_len(10), None);
    // The group is still in step: the next batch matches the CPU backend.
    let next = StepBatch {
        steps: vec![
            step(7, &[4], 3, LogitsWanted::All),
            step(10, &[1, 2], 0, LogitsWanted::All),
        ],
    };
    let (w, g) = (one.forward(&next).unwrap(), tp.forward(&next).unwrap());
    for i in 0..2 {
        assert!(max_rel(g.step(i), w.step(i)) < 1e-5);
    }
    // Release, then the sequence starts again at 0 (and gives the same logits as at first).
    tp.release(7);
    assert_eq!(tp.cached_len(7), None);
    let e = tp
        .forward(&StepBatch {
            steps: vec![step(7, &[4], 3, LogitsWanted::Last)],
        })
        .unwrap_err();
    assert!(matches!(
        e,
        BackendError::PositionMismatch { cached: 0, .. }
    ));
    let again = tp.forward(&first).unwrap();
    assert!(max_rel(again.last(0), want.last(0)) < 1e-5);
    // An empty batch.
    assert_eq!(tp.forward(&StepBatch::default()).unwrap().num_steps(), 0);
    assert_eq!(tp.max_batch_tokens(), one.max_batch_tokens());
}
