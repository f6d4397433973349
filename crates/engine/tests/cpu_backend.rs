//! The CPU backend over a tiny random checkpoint: batching, caching and the error contract.

use gptoss_engine::backend::{
    Backend, BackendError, LogitsWanted, SeqStep, StepBatch, greedy_token,
};
use gptoss_engine::cpu::CpuBackend;
use gptoss_formats::{Checkpoint, ModelWeights};
use gptoss_model::reference::ReferenceModel;
use gptoss_model::reference::testing::{TinyLayout, max_rel, write_tiny_checkpoint};

fn backend(layout: TinyLayout) -> (tempfile::TempDir, CpuBackend) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), layout, 21).unwrap();
    let b = CpuBackend::open(dir.path()).unwrap();
    (dir, b)
}

fn step(seq: u64, tokens: &[u32], start_pos: usize, want: LogitsWanted) -> SeqStep {
    SeqStep {
        seq,
        tokens: tokens.to_vec(),
        start_pos,
        want_logits: want,
    }
}

/// Logits of `tokens` from position 0 in one reference forward, on its own.
fn alone(dir: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
    let pos: Vec<usize> = (0..tokens.len()).collect();
    model.forward(tokens, &pos, &mut model.new_cache()).unwrap()
}

const SEQS: [&[u32]; 4] = [
    &[3, 9, 27, 81, 50, 1, 2, 3, 4, 5, 6, 7, 8],
    &[10],
    &[96, 95, 94, 93, 92, 91],
    &[4, 4, 4, 4, 4, 4, 4, 4, 4, 4],
];

#[test]
fn batched_sequences_of_different_lengths_equal_each_alone() {
    for layout in [TinyLayout::Split, TinyLayout::Fused] {
        let (dir, mut b) = backend(layout);
        let v = b.config().vocab_size;
        let expected: Vec<Vec<f32>> = SEQS.iter().map(|s| alone(dir.path(), s)).collect();
        // Step 1: prefill of different lengths (seq 2 fed in two chunks), all rows wanted.
        let cut = [5usize, 1, 2, 4];
        let batch = StepBatch {
            steps: (0..4)
                .map(|i| step(i as u64, &SEQS[i][..cut[i]], 0, LogitsWanted::All))
                .collect(),
        };
        let out = b.forward(&batch).unwrap();
        assert_eq!(out.num_steps(), 4);
        for i in 0..4 {
            assert_eq!(out.rows(i).len(), cut[i]);
            let err = max_rel(out.step(i), &expected[i][..cut[i] * v]);
            assert!(err < 1e-5, "{layout:?} seq {i} prefill: max rel {err:e}");
        }
        // Then one token at a time (seq 1 is done and released), only the last row wanted.
        b.release(1);
        let mut pos = cut;
        loop {
            let steps: Vec<SeqStep> = [0usize, 2, 3]
                .iter()
                .filter(|&&i| pos[i] < SEQS[i].len())
                .map(|&i| {
                    // A two-token chunk now and then mixes prefill-like steps into decoding.
                    let n = if pos[i].is_multiple_of(4) {
                        2.min(SEQS[i].len() - pos[i])
                    } else {
                        1
                    };
                    step(
                        i as u64,
                        &SEQS[i][pos[i]..pos[i] + n],
                        pos[i],
                        LogitsWanted::Last,
                    )
                })
                .collect();
            if steps.is_empty() {
                break;
            }
            let out = b
                .forward(&StepBatch {
                    steps: steps.clone(),
                })
                .unwrap();
            for (k, s) in steps.iter().enumerate() {
                let i = s.seq as usize;
                let last = s.start_pos + s.tokens.len() - 1;
                assert_eq!(out.step(k).len(), v);
                let err = max_rel(out.last(k), &expected[i][last * v..(last + 1) * v]);
                assert!(
                    err < 1e-5,
                    "{layout:?} seq {i} position {last}: max rel {err:e}"
                );
                pos[i] += s.tokens.len();
            }
        }
        for i in [0u64, 2, 3] {
            assert_eq!(b.cached_len(i), Some(SEQS[i as usize].len()));
        }
        assert_eq!(b.cached_len(1), None);
    }
}

#[test]
fn last_greedy_steps_return_the_greedy_token_of_the_last_row_and_no_row() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), TinyLayout::Split, 21).unwrap();
    let mut b = CpuBackend::open(dir.path()).unwrap();
    // The same steps, with every `LastGreedy` asked as `Last`.
    let mut reference = CpuBackend::open(dir.path()).unwrap();
    let v = b.config().vocab_size;
    let as_last = |batch: &StepBatch| StepBatch {
        steps: batch
            .steps
            .iter()
            .map(|s| SeqStep {
                want_logits: match s.want_logits {
                    LogitsWanted::LastGreedy => LogitsWanted::Last,
                    w => w,
                },
                ..s.clone()
            })
            .collect(),
    };
    use LogitsWanted::{All, Last, LastGreedy};
    let prefill = StepBatch {
        steps: vec![
            step(0, &SEQS[0][..5], 0, All),
            step(1, &SEQS[2][..4], 0, LastGreedy),
            step(2, &SEQS[3][..3], 0, Last),
            step(3, &SEQS[0][..7], 0, LastGreedy),
            step(4, &SEQS[1][..1], 0, LastGreedy),
        ],
    };
    let decode = StepBatch {
        steps: vec![
            step(0, &SEQS[0][5..6], 5, LastGreedy),
            step(1, &SEQS[2][4..6], 4, All),
            step(2, &SEQS[3][3..4], 3, LastGreedy),
            step(3, &SEQS[0][7..8], 7, Last),
            step(4, &[9], 1, LastGreedy),
        ],
    };
    let mut greedy_steps = 0;
    for batch in [prefill, decode] {
        let out = b.forward(&batch).unwrap();
        let want = reference.forward(&as_last(&batch)).unwrap();
        assert_eq!(out.num_steps(), batch.steps.len());
        for (i, s) in batch.steps.iter().enumerate() {
            let ctx = format!("seq {} at {}: {:?}", s.seq, s.start_pos, s.want_logits);
            if s.want_logits == LastGreedy {
                assert!(out.step(i).is_empty(), "{ctx}: a row came back");
                assert_eq!(out.rows(i).len(), 0, "{ctx}");
                let g = out.greedy(i);
                assert!(g.is_some(), "{ctx}: no greedy token");
                assert_eq!(g, greedy_token(want.last(i)), "{ctx}");
                greedy_steps += 1;
            } else {
                assert_eq!(out.greedy(i), None, "{ctx}");
                let rows = if s.want_logits == All {
                    s.tokens.len()
                } else {
                    1
                };
                assert_eq!(out.step(i).len(), rows * v, "{ctx}");
                let err = max_rel(out.step(i), want.step(i));
                assert!(err < 1e-5, "{ctx}: max rel {err:e}");
            }
        }
        // The caches advance the same whatever the step asked for.
        for s in &batch.steps {
            assert_eq!(b.cached_len(s.seq), reference.cached_len(s.seq));
        }
    }
    assert_eq!(greedy_steps, 6);
}

#[test]
fn steps_are_validated_and_a_failed_batch_changes_nothing() {
    let (_dir, mut b) = backend(TinyLayout::Split);
    let b0 = StepBatch {
        steps: vec![step(7, &[1, 2, 3], 0, LogitsWanted::Last)],
    };
    let first = b.forward(&b0).unwrap();
    assert_eq!(b.cached_len(7), Some(3));
    // Wrong start position, for a live and for a new sequence.
    let e = b
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
    let e = b
        .forward(&StepBatch {
            steps: vec![step(8, &[4], 1, LogitsWanted::Last)],
        })
        .unwrap_err();
    assert_eq!(
        e,
        BackendError::PositionMismatch {
            seq: 8,
            start_pos: 1,
            cached: 0
        }
    );
    // Duplicate, empty, too large.
    let dup = StepBatch {
        steps: vec![
            step(7, &[4], 3, LogitsWanted::Last),
            step(7, &[5], 4, LogitsWanted::Last),
        ],
    };
    assert_eq!(b.forward(&dup).unwrap_err(), BackendError::DuplicateSeq(7));
    let empty = StepBatch {
        steps: vec![step(9, &[], 0, LogitsWanted::Last)],
    };
    assert_eq!(b.forward(&empty).unwrap_err(), BackendError::EmptyStep(9));
    let (_d2, small) = backend(TinyLayout::Split);
    let mut small = small.with_max_batch_tokens(4);
    let big = StepBatch {
        steps: vec![step(1, &[1, 2, 3, 4, 5], 0, LogitsWanted::Last)],
    };
    assert_eq!(
        small.forward(&big).unwrap_err(),
        BackendError::BatchTooLarge { tokens: 5, max: 4 }
    );
    // A bad token in one step refuses the whole batch: seq 7 does not advance, seq 10 is not created.
    let bad = StepBatch {
        steps: vec![
            step(7, &[4], 3, LogitsWanted::Last),
            step(10, &[1, 97], 0, LogitsWanted::Last),
        ],
    };
    match b.forward(&bad).unwrap_err() {
        BackendError::InvalidInput(m) => assert!(m.contains("97"), "{m}"),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(b.cached_len(7), Some(3));
    assert_eq!(b.cached_len(10), None);
    assert_eq!(b.num_sequences(), 1);
    // Released sequences start over at 0 and give the same logits again.
    b.release(7);
    assert_eq!(b.cached_len(7), None);
    let again = b.forward(&b0).unwrap();
    assert_eq!(first, again);
}

#[test]
fn backend_is_object_safe_and_send() {
    let (_dir, b) = backend(TinyLayout::Fused);
    let mut boxed: Box<dyn Backend> = Box::new(b);
    assert_eq!(boxed.name(), "cpu-reference");
    assert_eq!(boxed.config().num_hidden_layers, 3);
    let out = boxed
        .forward(&StepBatch {
            steps: vec![step(0, &[5, 6], 0, LogitsWanted::All)],
        })
        .unwrap();
    assert_eq!(out.step(0).len(), 2 * boxed.config().vocab_size);
    assert_eq!(out.last(0), out.rows(0).last().unwrap());
    std::thread::spawn(move || boxed.release(0)).join().unwrap();
}
