//! DeBERTa's fused disentangled attention (CPU f32) against the same maths composed from candle
//! ops (what a GPU runs), values and gradients, with both position terms, each alone, log
//! buckets and padding; and its dropout against finite differences.

use candle_core::{Device, Tensor, Var, D};
use finetuned::model::encoder::deberta::config::relative_positions;
use finetuned::model::ops::disentangled::{disentangled_attention, RelTables, Terms};
use std::sync::Arc;

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(finetuned::model::encoder::params::normal(&mut rng, n, 1.0), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// The lookups of `s` tokens with `buckets` log buckets over `max` positions, as the encoder
/// makes them: clamped into `2·span` rows, then counted from the lowest row reached.
fn tables(s: usize, buckets: i64, max: i64) -> RelTables {
    let span = buckets;
    let pos = relative_positions(s, buckets, max);
    let clamp = |v: i64| v.clamp(0, 2 * span - 1) as u32;
    let mut c2p: Vec<u32> = pos.iter().map(|&p| clamp(p + span)).collect();
    let mut p2c: Vec<u32> = pos.iter().map(|&p| clamp(span - p)).collect();
    let lo = *c2p.iter().chain(&p2c).min().unwrap();
    let hi = *c2p.iter().chain(&p2c).max().unwrap();
    c2p.iter_mut().chain(p2c.iter_mut()).for_each(|i| *i -= lo);
    RelTables { seq: s, rows: (hi - lo + 1) as usize, c2p: Arc::new(c2p), p2c: Arc::new(p2c) }
}

/// The same attention from candle ops: products per head, gathers, the transposed
/// position-to-content term, the padding bias, softmax and the weighted sum.
fn composed(qkv: &Tensor, pos: &Tensor, t: &RelTables, terms: Terms, mask: &Tensor, nh: usize, scale: f64) -> Tensor {
    let (b, s, w) = qkv.dims3().unwrap();
    let (h, hd, r) = (w / 3, w / 3 / nh, t.rows);
    let heads = |x: Tensor| x.reshape((b, s, nh, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let (q, k, v) = (heads(qkv.narrow(2, 0, h).unwrap()), heads(qkv.narrow(2, h, h).unwrap()), heads(qkv.narrow(2, 2 * h, h).unwrap()));
    let pos_heads =
        |col: usize| pos.narrow(1, col, h).unwrap().reshape((r, nh, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    let index =
        |v: &[u32]| Tensor::from_slice(v, (1, 1, s, s), &Device::Cpu).unwrap().broadcast_as((b, nh, s, s)).unwrap().contiguous().unwrap();
    let mut scores = q.matmul(&k.t().unwrap()).unwrap();
    if terms.c2p {
        let c = q.broadcast_matmul(&pos_heads(0).t().unwrap()).unwrap();
        scores = (scores + c.contiguous().unwrap().gather(&index(&t.c2p), D::Minus1).unwrap()).unwrap();
    }
    if terms.p2c {
        let col = if terms.c2p { h } else { 0 };
        let p = k.broadcast_matmul(&pos_heads(col).t().unwrap()).unwrap();
        let g = p.contiguous().unwrap().gather(&index(&t.p2c), D::Minus1).unwrap().transpose(2, 3).unwrap();
        scores = (scores + g).unwrap();
    }
    let bias = ((mask - 1.0).unwrap() * 1e4).unwrap().reshape((b, 1, 1, s)).unwrap();
    let probs = candle_nn::ops::softmax(&(scores * scale).unwrap().broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
    probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, s, h)).unwrap()
}

#[test]
fn fused_disentangled_attention_matches_composed_ops_and_their_gradients() {
    // 40 tokens over 8 log buckets (so far positions share rows), padding in the later texts.
    let (b, s, h, nh) = (3, 40, 32, 4);
    let t = tables(s, 8, 64);
    assert!(t.rows < 2 * s - 1, "the buckets fold distant positions: {} rows", t.rows);
    let mask_rows: Vec<f32> = (0..b).flat_map(|i| (0..s).map(move |j| if j < s - 7 * i { 1.0 } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask_rows.clone(), (b, s), &Device::Cpu).unwrap();
    for terms in [Terms { c2p: true, p2c: true }, Terms { c2p: true, p2c: false }, Terms { c2p: false, p2c: true }] {
        let n_terms = usize::from(terms.c2p) + usize::from(terms.p2c);
        let scale = 1.0 / ((h / nh * (1 + n_terms)) as f64).sqrt();
        let qkv = Var::from_tensor(&random(&[b, s, 3 * h], 1)).unwrap();
        let pos = Var::from_tensor(&random(&[t.rows, n_terms * h], 2)).unwrap();
        let upstream = random(&[b, s, h], 3);
        let fused = disentangled_attention(qkv.as_tensor(), pos.as_tensor(), &t, terms, &mask_rows, nh, scale, 0.0, 0).unwrap();
        let reference = composed(qkv.as_tensor(), pos.as_tensor(), &t, terms, &mask, nh, scale);
        assert!(max_diff(&fused, &reference) < 1e-5, "{terms:?}: outputs differ by {}", max_diff(&fused, &reference));
        let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("qkv", &qkv), ("pos", &pos)] {
            let (a, c) = (gf.get(var.as_tensor()).unwrap(), gc.get(var.as_tensor()).unwrap());
            let norm = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 1e-3, "{terms:?}: d{name} is not trivially zero");
            assert!(max_diff(a, c) / norm < 1e-5, "{terms:?}: d{name} differs by {} (largest {norm})", max_diff(a, c));
        }
    }
}

#[test]
fn disentangled_dropout_is_seeded_and_its_gradient_matches_finite_differences() {
    let (b, s, h, nh) = (2, 9, 16, 2);
    let t = tables(s, 4, 16);
    let terms = Terms { c2p: true, p2c: true };
    let mask = vec![1.0; b * s];
    let (qkv, pos) = (random(&[b, s, 3 * h], 4), random(&[t.rows, 2 * h], 5));
    let scale = 1.0 / ((h / nh * 3) as f64).sqrt();
    let run = |qkv: &Tensor, pos: &Tensor, seed| disentangled_attention(qkv, pos, &t, terms, &mask, nh, scale, 0.3, seed).unwrap();
    assert_eq!(max_diff(&run(&qkv, &pos, 5), &run(&qkv, &pos, 5)), 0.0, "same seed, same mask");
    assert!(max_diff(&run(&qkv, &pos, 5), &run(&qkv, &pos, 6)) > 1e-3, "another seed draws another mask");
    let upstream = random(&[b, s, h], 6);
    let loss = |qkv: &Tensor, pos: &Tensor| (run(qkv, pos, 5) * &upstream).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let vars = [&qkv, &pos].map(|x| Var::from_tensor(x).unwrap());
    let grads = (run(vars[0].as_tensor(), vars[1].as_tensor(), 5) * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    for which in 0..2 {
        let g = grads.get(vars[which].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [3usize, 40, 101, 170] {
            let nudge = |delta: f32| {
                let mut flat = [&qkv, &pos].map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                flat[which][idx] += delta;
                let qkv = Tensor::from_vec(flat[0].clone(), qkv.shape(), &Device::Cpu).unwrap();
                let pos = Tensor::from_vec(flat[1].clone(), pos.shape(), &Device::Cpu).unwrap();
                loss(&qkv, &pos)
            };
            let numeric = (nudge(1e-2) - nudge(-1e-2)) / 2e-2;
            assert!((numeric - g[idx] as f64).abs() < 2e-2 * numeric.abs().max(1.0), "input {which}[{idx}]: {numeric} vs {}", g[idx]);
        }
    }
}

#[test]
fn device_gathers_match_candles_gather_and_its_gradient() {
    use finetuned::model::ops::device_positional::RelGather;
    let (b, nh, s) = (2, 3, 11);
    let t = tables(s, 4, 16);
    let c = Var::from_tensor(&random(&[b, nh, s, t.rows], 7)).unwrap();
    let upstream = random(&[b, nh, s, s], 8);
    for (idx, transpose) in [(&t.c2p, false), (&t.p2c, true)] {
        let index = Tensor::from_slice(idx.as_slice(), s * s, &Device::Cpu).unwrap();
        let device = c.as_tensor().apply_op1(RelGather { index, transpose }).unwrap();
        let full = Tensor::from_slice(idx.as_slice(), (1, 1, s, s), &Device::Cpu).unwrap();
        let full = full.broadcast_as((b, nh, s, s)).unwrap().contiguous().unwrap();
        let mut reference = c.as_tensor().gather(&full, D::Minus1).unwrap();
        if transpose {
            reference = reference.transpose(2, 3).unwrap();
        }
        assert_eq!(max_diff(&device, &reference), 0.0, "transpose {transpose}: the gathered scores differ");
        let gd = (device * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, r) = (gd.get(c.as_tensor()).unwrap(), gr.get(c.as_tensor()).unwrap());
        assert!(max_diff(a, r) < 1e-5, "transpose {transpose}: gradients differ by {}", max_diff(a, r));
    }
}
