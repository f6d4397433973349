//! GPU test of the tensor-core flash attention kernel (`kernels/flash_attn.cu`, launched by
//! `gptoss_cuda::flash::FlashAttn`) against the f32 CPU reference
//! (`gptoss_model::reference::attention::attend`) on random data. Without a usable GPU it prints
//! a notice and passes. Run on a GPU machine with
//! `cargo test --release -p gptoss-cuda --test gpu_flash -- --nocapture --test-threads=1`.
//!
//! Cases: the 20b shape (64 query heads, 8 KV heads) and the fixture shape (4 / 2), plus group
//! sizes 1 and 4; prefill chunks of 1, 7, 64, 200, 1000 and 4096 tokens with and without a cache
//! prefix; sliding layers (window 128) over a ring of 136 slots and over a linear cache; full
//! layers; multi-segment launches (batched decode, mixed chunk sizes); all three KV element
//! types. Every output element is compared: max |gpu - ref| / max |ref| must stay within 2e-2
//! (bf16 cache: bf16 K, V and P in the MMAs, Q as two bf16 parts) or 5e-3 (f16 / f32 cache: f16
//! MMAs); the bf16 output rounding alone is up to 2e-3. Unwritten cache slots hold NaN and the
//! output starts as NaN bytes, so a stray read or a missed write shows.

use std::time::Instant;

use gptoss_cuda::driver::{Gpu, Timer};
use gptoss_cuda::flash::FlashAttn;
use gptoss_cuda::kernels::SegDev;
use gptoss_model::reference::attention::{attend, visible_keys};

fn gpu_or_skip(test: &str) -> bool {
    if gptoss_cuda::gpu_available() {
        true
    } else {
        println!("NOTICE: no usable CUDA GPU; skipping {test}");
        false
    }
}

/// splitmix64 with a fresh (printed) seed; normal deviates by Box-Muller.
struct Rng(u64);

impl Rng {
    fn fresh() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("random seed {seed}");
        Rng(seed)
    }
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// The KV cache element type (`kvmode` of the kernels).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kv {
    Bf16,
    F32,
    F16,
}

impl Kv {
    fn mode(self) -> i32 {
        match self {
            Kv::Bf16 => 0,
            Kv::F32 => 1,
            Kv::F16 => 2,
        }
    }
    fn size(self) -> usize {
        if self == Kv::F32 { 4 } else { 2 }
    }
    /// What the cache holds for `x`.
    fn round(self, x: f32) -> f32 {
        match self {
            Kv::Bf16 => half::bf16::from_f32(x).to_f32(),
            Kv::F16 => half::f16::from_f32(x).to_f32(),
            Kv::F32 => x,
        }
    }
    /// Little-endian bytes of `x` (already rounded) in this type.
    fn put(self, x: f32, dst: &mut [u8]) {
        match self {
            Kv::Bf16 => dst.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            Kv::F16 => dst.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            Kv::F32 => dst.copy_from_slice(&x.to_le_bytes()),
        }
    }
    fn tolerance(self) -> f32 {
        if self == Kv::Bf16 { 2e-2 } else { 5e-3 }
    }
}

struct Case {
    name: &'static str,
    nh: usize,
    nkv: usize,
    /// (nq, pos0) per segment.
    segs: Vec<(usize, usize)>,
    window: usize,
    ring: usize,
    kv: Kv,
    /// Print timing and TFLOP/s.
    timed: bool,
}

const HD: usize = 64;
const LAYER: usize = 5;

/// One segment's data: the K/V rows of every position 0..pos0+nq (rounded to the cache type).
struct SegData {
    nq: usize,
    pos0: usize,
    q0: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Runs one case; returns (max relative error, passed).
fn run_case(gpu: &Gpu, fa: &FlashAttn, rng: &mut Rng, c: &Case) -> (f32, bool) {
    let t_case = Instant::now();
    let (nh, nkv, kv) = (c.nh, c.nkv, c.kv);
    let g = nh / nkv;
    let (qd, kvd) = (nh * HD, nkv * HD);
    let es = kv.size();
    let mut q0 = 0;
    let mut data = Vec::new();
    for &(nq, pos0) in &c.segs {
        let n = (pos0 + nq) * kvd;
        let k: Vec<f32> = rng
            .normals(n, 3.0)
            .into_iter()
            .map(|x| kv.round(x))
            .collect();
        let v: Vec<f32> = rng
            .normals(n, 3.0)
            .into_iter()
            .map(|x| kv.round(x))
            .collect();
        data.push(SegData { nq, pos0, q0, k, v });
        q0 += nq;
    }
    let t = q0;
    let q = rng.normals(t * qd, 3.0);
    let sinks = rng.normals(nh, 1.0);

    // Fresh K/V rows of the launch, and per segment its cache (NaN where never written).
    let mut kn = vec![0u8; t * kvd * es];
    let mut vn = vec![0u8; t * kvd * es];
    let mut caches = Vec::new();
    let mut segdev = Vec::new();
    for d in &data {
        for i in 0..d.nq {
            for e in 0..kvd {
                let (src, dst) = ((d.pos0 + i) * kvd + e, ((d.q0 + i) * kvd + e) * es);
                kv.put(d.k[src], &mut kn[dst..dst + es]);
                kv.put(d.v[src], &mut vn[dst..dst + es]);
            }
        }
        let slots = if c.ring > 0 { c.ring } else { d.pos0.max(1) };
        let mut kc = vec![0xFFu8; slots * kvd * es];
        let mut vc = vec![0xFFu8; slots * kvd * es];
        for j in 0..d.pos0 {
            let slot = if c.ring > 0 { j % c.ring } else { j };
            for e in 0..kvd {
                let dst = (slot * kvd + e) * es;
                kv.put(d.k[j * kvd + e], &mut kc[dst..dst + es]);
                kv.put(d.v[j * kvd + e], &mut vc[dst..dst + es]);
            }
        }
        let (kb, vb) = (gpu.alloc(kc.len()).unwrap(), gpu.alloc(vc.len()).unwrap());
        gpu.upload(kb.ptr, &kc).unwrap();
        gpu.upload(vb.ptr, &vc).unwrap();
        let mut sd = SegDev {
            q0: d.q0 as i32,
            nq: d.nq as i32,
            pos0: d.pos0 as i32,
            ..SegDev::default()
        };
        sd.kc[LAYER] = kb.ptr;
        sd.vc[LAYER] = vb.ptr;
        segdev.push(sd);
        caches.push((kb, vb));
    }
    let segs_d = gpu
        .alloc(segdev.len() * std::mem::size_of::<SegDev>())
        .unwrap();
    gpu.upload(segs_d.ptr, &segdev).unwrap();
    let q_d = gpu.alloc(q.len() * 4).unwrap();
    gpu.upload(q_d.ptr, &q).unwrap();
    let kn_d = gpu.alloc(kn.len()).unwrap();
    gpu.upload(kn_d.ptr, &kn).unwrap();
    let vn_d = gpu.alloc(vn.len()).unwrap();
    gpu.upload(vn_d.ptr, &vn).unwrap();
    let sinks_d = gpu.alloc(nh * 4).unwrap();
    gpu.upload(sinks_d.ptr, &sinks).unwrap();
    let out_d = gpu.alloc_zeroed(t * qd * 2).unwrap();
    gpu.upload(out_d.ptr, &vec![0xFFu8; t * qd * 2]).unwrap();
    let lo_d = gpu.alloc_zeroed(t * qd * 2).unwrap();
    gpu.upload(lo_d.ptr, &vec![0xFFu8; t * qd * 2]).unwrap();

    let max_nq = c.segs.iter().map(|s| s.0).max().unwrap();
    let launch = || {
        fa.launch(
            &gpu.stream,
            segs_d.ptr,
            segdev.len(),
            max_nq,
            LAYER,
            q_d.ptr,
            kn_d.ptr,
            vn_d.ptr,
            sinks_d.ptr,
            c.window,
            c.ring,
            out_d.ptr,
            lo_d.ptr,
            nh,
            nkv,
            kv.mode(),
        )
        .unwrap()
    };
    launch();
    gpu.sync().unwrap();
    let mut out_bits = vec![0u16; t * qd];
    gpu.download(&mut out_bits, out_d.ptr).unwrap();
    let mut lo_bits = vec![0u16; t * qd];
    gpu.download(&mut lo_bits, lo_d.ptr).unwrap();
    // The output as the o_proj GEMM sees it: hi + lo; lo must be a rounding remainder of hi
    // (at most half a bf16 ulp of hi: lo is itself rounded, so it may reach exactly half).
    let mut bad_split = 0usize;
    let got: Vec<f32> = out_bits
        .iter()
        .zip(&lo_bits)
        .map(|(&h, &l)| {
            let (hb, lb) = (half::bf16::from_bits(h), half::bf16::from_bits(l));
            let ulp = (half::bf16::from_bits(h.wrapping_add(1)).to_f32() - hb.to_f32()).abs();
            if hb.is_finite() && lb.to_f32().abs() > 0.5 * ulp {
                bad_split += 1;
            }
            hb.to_f32() + lb.to_f32()
        })
        .collect();

    let window = (c.window > 0).then_some(c.window);
    let mut timing = String::new();
    if c.timed {
        let flops: f64 = data
            .iter()
            .map(|d| {
                (0..d.nq)
                    .map(|i| visible_keys(d.pos0 + i, window).len() as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            * 4.0
            * (nh * HD) as f64;
        launch();
        let timer = Timer::new().unwrap();
        let reps = 10;
        timer.start(&gpu.stream).unwrap();
        for _ in 0..reps {
            launch();
        }
        let ms = timer.stop_ms(&gpu.stream).unwrap() / reps as f32;
        timing = format!(
            "  {ms:.3} ms/launch, {:.1} TFLOP/s ({:.2} GFLOP)",
            flops / (ms as f64 * 1e-3) / 1e12,
            flops / 1e9
        );
    }

    // The f32 reference, rows spread over the CPU's threads.
    let mut want = vec![0f32; t * qd];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4);
    for d in &data {
        let rows = &mut want[d.q0 * qd..(d.q0 + d.nq) * qd];
        let per = (d.nq * nh).div_ceil(threads).max(1);
        std::thread::scope(|sc| {
            for (ci, chunk) in rows.chunks_mut(per * HD).enumerate() {
                let (d, q, sinks) = (d, &q, &sinks);
                sc.spawn(move || {
                    for (n, o) in chunk.chunks_mut(HD).enumerate() {
                        let n = ci * per + n;
                        let (i, h) = (n / nh, n % nh);
                        let head = (h / g) * HD;
                        let key = |j: usize| &d.k[j * kvd + head..j * kvd + head + HD];
                        let value = |j: usize| &d.v[j * kvd + head..j * kvd + head + HD];
                        let qi = &q[(d.q0 + i) * qd + h * HD..][..HD];
                        attend(
                            qi,
                            visible_keys(d.pos0 + i, window),
                            key,
                            value,
                            sinks[h],
                            0.125,
                            o,
                        );
                    }
                });
            }
        });
    }

    let (mut max_diff, mut max_ref, mut nan) = (0f32, 0f32, 0usize);
    let mut worst = 0;
    for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
        if !a.is_finite() {
            nan += 1;
            continue;
        }
        let dd = (a - b).abs();
        if dd > max_diff {
            max_diff = dd;
            worst = i;
        }
        max_ref = max_ref.max(b.abs());
    }
    let rel = max_diff / max_ref.max(1e-30);
    let ok = nan == 0 && bad_split == 0 && rel <= kv.tolerance();
    println!(
        "{} {:<50} {:<4} T={t:<5} rel err {rel:.2e} (tol {:.0e}; max|ref| {max_ref:.3}; worst row {} head {} dim {}){}{timing}  [{:.1} s]",
        if ok { "ok  " } else { "FAIL" },
        c.name,
        format!("{kv:?}"),
        kv.tolerance(),
        worst / qd,
        worst % qd / HD,
        worst % HD,
        if nan > 0 || bad_split > 0 {
            format!(" {nan} NON-FINITE outputs, {bad_split} lo parts that are not hi's remainder")
        } else {
            String::new()
        },
        t_case.elapsed().as_secs_f64()
    );
    (rel, ok)
}

fn cases() -> Vec<Case> {
    let case = |name, nh, nkv, segs: &[(usize, usize)], window, ring, kv, timed| Case {
        name,
        nh,
        nkv,
        segs: segs.to_vec(),
        window,
        ring,
        kv,
        timed,
    };
    let decode = [(1, 0), (1, 5), (1, 137), (1, 300), (1, 1000)];
    let mixed = [(7, 300), (1, 37), (64, 0), (1000, 137), (1, 5000)];
    vec![
        // Fixture shape (4 query heads, 2 KV heads).
        case(
            "fixture 1 token, prefix 37, full",
            4,
            2,
            &[(1, 37)],
            0,
            0,
            Kv::Bf16,
            false,
        ),
        case(
            "fixture 7 tokens, prefix 37, full",
            4,
            2,
            &[(7, 37)],
            0,
            0,
            Kv::F16,
            false,
        ),
        case(
            "fixture 64 tokens, sliding ring 136",
            4,
            2,
            &[(64, 0)],
            128,
            136,
            Kv::F32,
            false,
        ),
        case(
            "fixture 200 tokens, sliding linear cache",
            4,
            2,
            &[(200, 0)],
            128,
            0,
            Kv::Bf16,
            false,
        ),
        case(
            "fixture 1000 tokens, prefix 37, full",
            4,
            2,
            &[(1000, 37)],
            0,
            0,
            Kv::F16,
            false,
        ),
        case(
            "fixture 1000 tokens, prefix 300, sliding ring",
            4,
            2,
            &[(1000, 300)],
            128,
            136,
            Kv::F32,
            false,
        ),
        case(
            "fixture 4096 tokens, full",
            4,
            2,
            &[(4096, 0)],
            0,
            0,
            Kv::Bf16,
            false,
        ),
        // Other group sizes.
        case(
            "group 1: 8/8 heads, 300 tokens, prefix 37, full",
            8,
            8,
            &[(300, 37)],
            0,
            0,
            Kv::F16,
            false,
        ),
        case(
            "group 4: 16/4 heads, 300 tokens, prefix 300, sliding",
            16,
            4,
            &[(300, 300)],
            128,
            136,
            Kv::Bf16,
            false,
        ),
        // 20b shape (64 query heads, 8 KV heads).
        case(
            "20b 1 token, prefix 300, full",
            64,
            8,
            &[(1, 300)],
            0,
            0,
            Kv::Bf16,
            false,
        ),
        case(
            "20b 7 tokens, prefix 37, sliding ring",
            64,
            8,
            &[(7, 37)],
            128,
            136,
            Kv::F16,
            false,
        ),
        case(
            "20b 64 tokens, prefix 300, sliding ring",
            64,
            8,
            &[(64, 300)],
            128,
            136,
            Kv::Bf16,
            false,
        ),
        case(
            "20b 1000 tokens, prefix 37, full",
            64,
            8,
            &[(1000, 37)],
            0,
            0,
            Kv::F32,
            false,
        ),
        case(
            "20b 4096 tokens, full",
            64,
            8,
            &[(4096, 0)],
            0,
            0,
            Kv::Bf16,
            true,
        ),
        case(
            "20b 4096 tokens, prefix 300, full",
            64,
            8,
            &[(4096, 300)],
            0,
            0,
            Kv::F16,
            true,
        ),
        case(
            "20b 4096 tokens, prefix 300, sliding ring",
            64,
            8,
            &[(4096, 300)],
            128,
            136,
            Kv::Bf16,
            true,
        ),
        case(
            "20b 4096 tokens, prefix 37, sliding ring",
            64,
            8,
            &[(4096, 37)],
            128,
            136,
            Kv::F32,
            true,
        ),
        // Multi-segment launches.
        case(
            "20b batched decode x5, full",
            64,
            8,
            &decode,
            0,
            0,
            Kv::Bf16,
            true,
        ),
        case(
            "20b batched decode x5, full",
            64,
            8,
            &decode,
            0,
            0,
            Kv::F16,
            false,
        ),
        case(
            "20b batched decode x5, full",
            64,
            8,
            &decode,
            0,
            0,
            Kv::F32,
            false,
        ),
        case(
            "20b batched decode x5, sliding ring",
            64,
            8,
            &decode,
            128,
            136,
            Kv::Bf16,
            false,
        ),
        case(
            "20b mixed segments, sliding ring",
            64,
            8,
            &mixed,
            128,
            136,
            Kv::F16,
            false,
        ),
        case(
            "20b mixed segments, full",
            64,
            8,
            &mixed,
            0,
            0,
            Kv::F32,
            false,
        ),
        case(
            "fixture mixed segments, full",
            4,
            2,
            &mixed,
            0,
            0,
            Kv::Bf16,
            false,
        ),
    ]
}

#[test]
fn flash_attention_matches_reference() {
    if !gpu_or_skip("flash_attention_matches_reference") {
        return;
    }
    let t0 = Instant::now();
    let gpu = Gpu::open(0).unwrap();
    println!("device: {:?}", gpu.info);
    let fa = FlashAttn::load(&gpu).unwrap();
    let mut rng = Rng::fresh();
    let mut failed = Vec::new();
    for c in cases() {
        let (rel, ok) = run_case(&gpu, &fa, &mut rng, &c);
        if !ok {
            failed.push(format!("{} ({:?}): {rel:.2e}", c.name, c.kv));
        }
    }
    println!("all cases in {:.1} s", t0.elapsed().as_secs_f64());
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}
