//! The fused CPU kernels agree with candle's composed ops, values and gradients; among them the
//! ops ModernBERT needs (rotary embedding, GeGLU, sliding-window attention), and the device ops a
//! GPU runs for them.

use candle_core::{Device, Tensor, Var, D};
use finetuned::model::ops::rotary::{rotary, rotary_composed, RopeTable};
use finetuned::model::ops::{attention, device_ops, geglu, kernels};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(finetuned::model::encoder::params::normal(&mut rng, n, 1.5), shape, &Device::Cpu).unwrap()
}

/// LayerNorm over the last dimension from candle ops (eps 1e-12), differentiable.
fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    c.broadcast_div(&(var + 1e-12).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
}

#[test]
fn fused_layer_norm_matches_composed_ops_and_their_gradients() {
    let x = Var::from_tensor(&random(&[3, 5, 384], 1)).unwrap();
    let w = Var::from_tensor(&random(&[384], 2).affine(0.1, 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&random(&[384], 3)).unwrap();
    let upstream = random(&[3, 5, 384], 4);
    let fused = kernels::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    let composed = composed_layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor());
    assert!(max_diff(&fused, &composed) < 1e-4);
    let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (composed * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&x, &w, &b] {
        let (a, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
        let scale = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        assert!(max_diff(a, c) / scale < 1e-4, "gradient differs by {}", max_diff(a, c));
    }
}

#[test]
fn fused_gelu_matches_candle_and_its_gradient() {
    let x = Var::from_tensor(&random(&[4, 1000], 5)).unwrap();
    let upstream = random(&[4, 1000], 6);
    let fused = kernels::gelu_erf(x.as_tensor()).unwrap();
    let reference = x.as_tensor().gelu_erf().unwrap();
    assert!(max_diff(&fused, &reference) < 1e-5);
    let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap()) < 1e-4);
}

/// Attention composed from candle ops: `[b, s, h]` projections, `[b, s]` 0/1 mask.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, nh: usize) -> Tensor {
    composed_windowed(q, k, v, mask, nh, None)
}

/// [`composed_attention`] with a sliding window's `[s, s]` bias added to the scores.
fn composed_windowed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, nh: usize, window: Option<usize>) -> Tensor {
    let (b, s, h) = q.dims3().unwrap();
    let hd = h / nh;
    let heads = |t: &Tensor| t.reshape((b, s, nh, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let mut bias = ((mask - 1.0).unwrap() * 1e4).unwrap().reshape((b, 1, 1, s)).unwrap();
    if let Some(w) = window {
        let band = attention::window_bias(s, w, candle_core::DType::F32, &Device::Cpu).unwrap().reshape((1, 1, s, s)).unwrap();
        bias = bias.broadcast_add(&band).unwrap();
    }
    let scores = (heads(q).matmul(&heads(k).t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
    probs.matmul(&heads(v)).unwrap().transpose(1, 2).unwrap().reshape((b, s, h)).unwrap()
}

#[test]
fn fused_attention_matches_composed_ops_and_their_gradients() {
    let (b, s, h, nh) = (3, 7, 48, 4);
    let [q, k, v] = [11, 12, 13].map(|seed| Var::from_tensor(&random(&[b, s, h], seed)).unwrap());
    // The second and third texts end in padding.
    let mask_rows: Vec<f32> = (0..b).flat_map(|i| (0..s).map(move |j| if j < s - 2 * i { 1.0 } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask_rows.clone(), (b, s), &Device::Cpu).unwrap();
    let upstream = random(&[b, s, h], 14);
    let fused = attention::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask_rows, nh, 0.0, 0).unwrap();
    let composed = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, nh);
    assert!(max_diff(&fused, &composed) < 1e-5, "outputs differ by {}", max_diff(&fused, &composed));
    let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (composed * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let (a, c) = (gf.get(var.as_tensor()).unwrap(), gc.get(var.as_tensor()).unwrap());
        assert!(max_diff(a, c) < 1e-4, "d{name} differs by {}", max_diff(a, c));
    }
}

#[test]
fn fused_attention_dropout_is_seeded_and_its_gradient_matches_finite_differences() {
    let (b, s, h, nh) = (2, 6, 16, 2);
    let mask = vec![1.0; b * s];
    let [q, k, v] = [21, 22, 23].map(|seed| random(&[b, s, h], seed));
    let run = |seed| attention::attention(&q, &k, &v, &mask, nh, 0.3, seed).unwrap();
    assert_eq!(max_diff(&run(5), &run(5)), 0.0, "same seed, same mask");
    assert!(max_diff(&run(5), &run(6)) > 1e-3, "another seed draws another mask");
    // The analytic gradient of sum(out · u) w.r.t. one entry of q, k and v agrees with a
    // central difference under the same dropout mask.
    let upstream = random(&[b, s, h], 24);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        let out = attention::attention(q, k, v, &mask, nh, 0.3, 5).unwrap();
        (out * &upstream).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let out = attention::attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), &mask, nh, 0.3, 5).unwrap();
    let grads = (out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    for which in 0..3 {
        let g = grads.get(vars[which].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [3usize, 40, 101, 170] {
            let nudge = |delta: f32| {
                let mut flat = [&q, &k, &v].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                flat[which][idx] += delta;
                let t = flat.map(|f| Tensor::from_vec(f, (b, s, h), &Device::Cpu).unwrap());
                loss(&t[0], &t[1], &t[2])
            };
            let numeric = (nudge(1e-2) - nudge(-1e-2)) / 2e-2;
            assert!((numeric - g[idx] as f64).abs() < 2e-2 * numeric.abs().max(1.0), "input {which}[{idx}]: {numeric} vs {}", g[idx]);
        }
    }
}

#[test]
fn fused_linear_matches_composed_ops_and_their_gradients() {
    // The second shape is a masked-LM decoder's: few rows, many outputs, so the input
    // gradient's long sum is split in parts. The third is a `[batch, seq, hidden]` activation,
    // taken as rows without a reshape.
    for (lead, inputs, outputs) in [(vec![37], 24, 19), (vec![9], 24, 10_000), (vec![3, 7], 24, 19)] {
        let rows: usize = lead.iter().product();
        let shape = |last: usize| [lead.as_slice(), &[last]].concat();
        let x = Var::from_tensor(&random(&shape(inputs), 31)).unwrap();
        let w = Var::from_tensor(&random(&[outputs, inputs], 32)).unwrap();
        let b = Var::from_tensor(&random(&[outputs], 33)).unwrap();
        let upstream = random(&shape(outputs), 34);
        let fused = finetuned::model::ops::linear::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        assert_eq!(fused.dims(), shape(outputs).as_slice());
        let composed = x.as_tensor().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-4, "outputs differ by {}", max_diff(&fused, &composed));
        let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let tolerance = 1e-4 * (outputs.max(rows) as f32).sqrt();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
            assert!(max_diff(a, c) < tolerance, "{rows}×{inputs}→{outputs}: d{name} differs by {}", max_diff(a, c));
        }
    }
}

/// A frozen layer (its weight and bias plain tensors, as LoRA's base) passes the same input
/// gradient back and keeps no gradient for its own weights; so does a frozen LayerNorm.
#[test]
fn frozen_linear_and_layer_norm_give_the_input_gradient_only() {
    let x = Var::from_tensor(&random(&[2, 5, 24], 41)).unwrap();
    let (w, b) = (random(&[19, 24], 42), random(&[19], 43));
    let (nw, nb) = (random(&[19], 44).affine(0.1, 1.0).unwrap(), random(&[19], 45));
    let upstream = random(&[2, 5, 19], 46);
    let fused = finetuned::model::ops::linear::linear(x.as_tensor(), &w, &b).unwrap();
    let fused = kernels::layer_norm(&fused, &nw, &nb, 1e-12).unwrap();
    let composed = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let composed = composed_layer_norm(&composed, &nw, &nb);
    assert!(max_diff(&fused, &composed) < 1e-4);
    let gf = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (composed * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, c) = (gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
    assert!(max_diff(a, c) < 1e-3, "dx differs by {}", max_diff(a, c));
    for t in [&w, &b, &nw, &nb] {
        assert!(gf.get(t).is_none(), "a frozen weight got a gradient");
    }
}

#[test]
fn inference_linear_with_transposed_weight_matches_composed_ops() {
    for rows in [1, 14, 70] {
        let x = random(&[rows, 48], 41);
        let (w, b) = (random(&[20, 48], 42), random(&[20], 43));
        let mut layer = finetuned::model::ops::layers::Linear::new(w.clone(), b.clone());
        layer.prepare_for_inference().unwrap();
        let composed = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        let got = layer.forward(&x).unwrap();
        assert!(max_diff(&got, &composed) < 1e-4, "{rows} rows differ by {}", max_diff(&got, &composed));
    }
}

#[test]
fn fused_dropout_drops_about_p_scales_the_rest_and_its_gradient_uses_the_same_mask() {
    let x = Var::from_tensor(&random(&[7, 13, 384], 5).abs().unwrap().affine(1.0, 0.1).unwrap()).unwrap();
    let (p, seed) = (0.1, 99);
    let y = kernels::dropout(x.as_tensor(), p, seed).unwrap();
    let (xv, yv) = (x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f64 / yv.len() as f64;
    assert!((dropped - p).abs() < 0.01, "dropped {dropped}");
    for (a, b) in xv.iter().zip(&yv) {
        assert!(*b == 0.0 || (b - a / 0.9).abs() < 1e-5, "{a} -> {b}");
    }
    // Same seed, same mask; another seed, another mask.
    assert_eq!(max_diff(&y, &kernels::dropout(x.as_tensor(), p, seed).unwrap()), 0.0);
    assert!(max_diff(&y, &kernels::dropout(x.as_tensor(), p, seed + 1).unwrap()) > 0.0);
    // d(sum(y · u))/dx = u · mask / (1 − p): zero exactly where y was dropped.
    let u = random(&[7, 13, 384], 6);
    let grads = (&y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let uv = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((g, u), y) in g.iter().zip(&uv).zip(&yv) {
        let want = if *y == 0.0 { 0.0 } else { u / 0.9 };
        assert!((g - want).abs() < 1e-5, "{g} vs {want}");
    }
}

/// The fused op's gradients of `sum(out · upstream)` against the composed op's, for each input,
/// relative to the composed gradient's largest element.
fn same_gradients(fused: Tensor, composed: Tensor, upstream: &Tensor, vars: &[(&str, &Var)], tol: f32) {
    assert!(max_diff(&fused, &composed) < tol, "outputs differ by {}", max_diff(&fused, &composed));
    let gf = (fused * upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (composed * upstream).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in vars {
        let (a, c) = (gf.get(var.as_tensor()).unwrap(), gc.get(var.as_tensor()).unwrap());
        let scale = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        assert!(max_diff(a, c) / scale < tol, "d{name} differs by {}", max_diff(a, c));
    }
}

#[test]
fn sliding_window_attention_sees_only_keys_within_the_window_and_matches_composed_ops() {
    // 40 tokens, a window of 5 each side (ModernBERT's local_attention 10), padding at the end.
    let (b, s, h, nh, w) = (2, 40, 32, 4, 5);
    let [q, k, v] = [31, 32, 33].map(|seed| Var::from_tensor(&random(&[b, s, h], seed)).unwrap());
    let mask_rows: Vec<f32> = (0..b).flat_map(|i| (0..s).map(move |j| if j < s - 7 * i { 1.0 } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask_rows.clone(), (b, s), &Device::Cpu).unwrap();
    let fused = attention::attention_windowed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask_rows, nh, 0.0, 0, Some(w)).unwrap();
    let composed = composed_windowed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, nh, Some(w));
    // A key outside query i's window moves nothing in row i; one at the window's edge does, on
    // either side.
    let moved = |i: usize, j: usize| {
        let mut vv = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vv[j * h] += 10.0;
        let v2 = Tensor::from_vec(vv, (b, s, h), &Device::Cpu).unwrap();
        let out = attention::attention_windowed(q.as_tensor(), k.as_tensor(), &v2, &mask_rows, nh, 0.0, 0, Some(w)).unwrap();
        max_diff(&out.get(0).unwrap().get(i).unwrap(), &fused.get(0).unwrap().get(i).unwrap())
    };
    for (i, beyond, edge) in [(0, w + 1, w), (20, 20 - w - 1, 20 - w), (20, 20 + w + 1, 20 + w)] {
        assert_eq!(moved(i, beyond), 0.0, "query {i} sees key {beyond}, beyond its window");
        assert!(moved(i, edge) > 1e-3, "query {i} does not see key {edge}, at its window's edge");
    }
    // A padded query whose window holds only padding reads nothing meaningful either way: rows
    // at padding are compared as zeros.
    let real = mask.reshape((b, s, 1)).unwrap();
    let upstream = random(&[b, s, h], 34);
    let (fused, composed) = (fused.broadcast_mul(&real).unwrap(), composed.broadcast_mul(&real).unwrap());
    same_gradients(fused, composed.clone(), &upstream, &[("q", &q), ("k", &k), ("v", &v)], 1e-4);
    // The device op a GPU runs: the window inside the masked softmax.
    let hd = h / nh;
    let heads = |t: &Tensor| t.reshape((b, s, nh, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let bias = ((&mask - 1.0).unwrap() * 1e4).unwrap();
    let op = device_ops::MaskedSoftmax { scale: 1.0 / (hd as f32).sqrt(), dropout: None, window: Some(w) };
    let probs =
        heads(q.as_tensor()).matmul(&heads(k.as_tensor()).t().unwrap()).unwrap().contiguous().unwrap().apply_op2(&bias, op).unwrap();
    let device = probs.matmul(&heads(v.as_tensor())).unwrap().transpose(1, 2).unwrap().reshape((b, s, h)).unwrap();
    same_gradients(device.broadcast_mul(&real).unwrap(), composed, &upstream, &[("q", &q), ("k", &k), ("v", &v)], 1e-4);
}

/// `f` with the fused CPU kernels off: the device-generic ops a GPU runs, on the CPU.
fn device_path<T>(f: impl FnOnce() -> T) -> T {
    let before = kernels::set_fused_cpu_kernels(false);
    let out = f();
    kernels::set_fused_cpu_kernels(before);
    out
}

#[test]
fn rotary_embedding_matches_composed_ops_and_its_gradient_is_the_inverse_rotation() {
    let (b, s, h, hd) = (2, 33, 48, 16);
    let table = RopeTable::new(64, hd, 10_000.0);
    let x = Var::from_tensor(&random(&[b, s, h], 41)).unwrap();
    let fused = rotary(x.as_tensor(), &table).unwrap();
    let composed = rotary_composed(x.as_tensor(), &table).unwrap();
    // A rotation keeps each head's length.
    let norms = |t: &Tensor| t.reshape((b, s, h / hd, hd)).unwrap().sqr().unwrap().sum(D::Minus1).unwrap();
    assert!(max_diff(&norms(&fused), &norms(x.as_tensor())) < 1e-3);
    // Position 0 is not rotated.
    assert!(max_diff(&fused.narrow(1, 0, 1).unwrap(), &x.as_tensor().narrow(1, 0, 1).unwrap()) < 1e-6);
    same_gradients(fused, composed.clone(), &random(&[b, s, h], 42), &[("x", &x)], 1e-5);
    assert!(rotary(&random(&[1, 65, h], 43), &table).is_err(), "more positions than the table holds");
    let device = device_path(|| rotary(x.as_tensor(), &table).unwrap());
    same_gradients(device, composed, &random(&[b, s, h], 42), &[("x", &x)], 1e-5);
}

#[test]
fn geglu_matches_composed_ops_and_their_gradients() {
    let x = Var::from_tensor(&random(&[3, 5, 2 * 96], 51)).unwrap();
    let fused = geglu::geglu(x.as_tensor()).unwrap();
    assert_eq!(fused.dims(), &[3, 5, 96]);
    let composed = geglu::geglu_composed(x.as_tensor()).unwrap();
    same_gradients(fused, composed.clone(), &random(&[3, 5, 96], 52), &[("x", &x)], 1e-4);
    let device = device_path(|| geglu::geglu(x.as_tensor()).unwrap());
    assert_eq!(device.dims(), &[3, 5, 96]);
    same_gradients(device, composed, &random(&[3, 5, 96], 52), &[("x", &x)], 1e-4);
}

#[test]
fn rotary_attention_over_fused_projections_matches_rotating_then_attending() {
    // ModernBERT's op: Wqkv's output whole, the rotary embedding inside. Against the rotary op and
    // the windowed attention op on the three slices, values and gradients, with dropout on (the
    // same flags from the same seed) and a window, padding at the end.
    let (b, s, h, nh, w, hd) = (2, 40, 32, 4, 5, 8);
    let table = RopeTable::new(64, hd, 10_000.0);
    let qkv = Var::from_tensor(&random(&[b, s, 3 * h], 61)).unwrap();
    let mask: Vec<f32> = (0..b).flat_map(|i| (0..s).map(move |j| if j < s - 9 * i { 1.0 } else { 0.0 })).collect();
    let x = qkv.as_tensor();
    let fused = finetuned::model::ops::rotary_attention::rotary_attention(x, &table, &mask, nh, 0.2, 7, Some(w)).unwrap();
    let q = rotary(&x.narrow(2, 0, h).unwrap(), &table).unwrap();
    let k = rotary(&x.narrow(2, h, h).unwrap(), &table).unwrap();
    let v = x.narrow(2, 2 * h, h).unwrap();
    let apart = attention::attention_windowed(&q, &k, &v, &mask, nh, 0.2, 7, Some(w)).unwrap();
    same_gradients(fused, apart, &random(&[b, s, h], 62), &[("qkv", &qkv)], 1e-5);
}
