//! The fused CPU kernels agree with candle's composed ops, values and gradients.

use candle_core::{Device, Tensor, Var, D};
use finetuned::model::kernels;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(finetuned::model::params::normal(&mut rng, n, 1.5), shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_layer_norm_matches_composed_ops_and_their_gradients() {
    let x = Var::from_tensor(&random(&[3, 5, 384], 1)).unwrap();
    let w = Var::from_tensor(&random(&[384], 2).affine(0.1, 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&random(&[384], 3)).unwrap();
    let upstream = random(&[3, 5, 384], 4);
    let fused = kernels::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    let composed = {
        let x = x.as_tensor();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        c.broadcast_div(&(var + 1e-12).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w.as_tensor()).unwrap().broadcast_add(b.as_tensor()).unwrap()
    };
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
