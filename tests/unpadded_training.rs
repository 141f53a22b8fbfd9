//! Training without padding (`model::ops::unpad`): the attention over texts packed one after
//! another gives each real token the context and the gradients that the padded batch gives it,
//! for BERT's attention and ModernBERT's (rotary positions from 0 in each text, a local window).
//! The whole models' gradients on padded batches against PyTorch's are in `training_parity.rs`
//! and `modernbert.rs`.

use candle_core::{Device, Tensor, Var};
use finetuned::model::ops::attention::{attention, attention_unpadded};
use finetuned::model::ops::rotary::RopeTable;
use finetuned::model::ops::rotary_attention::{rotary_attention, rotary_attention_unpadded};
use finetuned::model::ops::unpad::Unpadding;

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(finetuned::model::encoder::params::normal(&mut rng, n, 1.5), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Texts of 17, 40, 1 and 23 tokens in a batch padded to 40.
const LENS: [usize; 4] = [17, 40, 1, 23];
const SEQ: usize = 40;

fn mask() -> Vec<f32> {
    LENS.iter().flat_map(|&n| (0..SEQ).map(move |j| if j < n { 1.0 } else { 0.0 })).collect()
}

/// The padded op's output and input gradient at the real tokens, against the packed op's, for
/// one upstream gradient (zero at the padding, which no loss reads).
fn same_at_tokens(width: usize, out_width: usize, padded: impl Fn(&Tensor) -> Tensor, packed: impl Fn(&Tensor) -> Tensor) {
    let u = Unpadding::of(&mask(), LENS.len(), SEQ).unwrap();
    assert_eq!(u.lens(), LENS.to_vec());
    let x = Var::from_tensor(&random(&[LENS.len(), SEQ, width], 3)).unwrap();
    let up = u.pad(&u.unpad(&random(&[LENS.len(), SEQ, out_width], 4)).unwrap()).unwrap();
    let y_pad = padded(x.as_tensor());
    let g_pad = (&y_pad * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let g_pad = u.unpad(g_pad.get(x.as_tensor()).unwrap()).unwrap();
    let xp = Var::from_tensor(&u.unpad(x.as_tensor()).unwrap()).unwrap();
    let y_packed = packed(xp.as_tensor());
    assert_eq!(y_packed.dims(), &[u.tokens(), out_width]);
    let g_packed = (&y_packed * u.unpad(&up).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let d = max_diff(&u.unpad(&y_pad).unwrap(), &y_packed);
    assert!(d < 1e-5, "outputs differ by {d}");
    let d = max_diff(&g_pad, g_packed.get(xp.as_tensor()).unwrap());
    assert!(d < 1e-5, "input gradients differ by {d}");
}

#[test]
fn packed_attention_gives_each_token_its_padded_context_and_gradient() {
    let (h, nh) = (32, 4);
    let qkv = |x: &Tensor| {
        let last = x.rank() - 1;
        [0, 1, 2].map(|i| x.narrow(last, i * h, h).unwrap().contiguous().unwrap())
    };
    same_at_tokens(
        3 * h,
        h,
        |x| {
            let [q, k, v] = qkv(x);
            attention(&q, &k, &v, &mask(), nh, 0.0, 0).unwrap()
        },
        |x| {
            let [q, k, v] = qkv(x);
            attention_unpadded(&q, &k, &v, &LENS, nh, 0.0, 0).unwrap()
        },
    );
}

#[test]
fn packed_rotary_attention_restarts_positions_in_each_text_and_keeps_the_window() {
    let (h, nh, window) = (32, 4, Some(5));
    let table = RopeTable::new(64, h / nh, 10_000.0);
    same_at_tokens(
        3 * h,
        h,
        |x| rotary_attention(x, &table, &mask(), nh, 0.0, 0, window).unwrap(),
        |x| rotary_attention_unpadded(x, &table, &LENS, nh, 0.0, 0, window).unwrap(),
    );
}

#[test]
fn packed_attention_dropout_is_seeded() {
    let (h, nh) = (32, 4);
    let u = Unpadding::of(&mask(), LENS.len(), SEQ).unwrap();
    let x = u.unpad(&random(&[LENS.len(), SEQ, 3 * h], 5)).unwrap();
    let [q, k, v] = [0, 1, 2].map(|i| x.narrow(1, i * h, h).unwrap().contiguous().unwrap());
    let run = |p, seed| attention_unpadded(&q, &k, &v, &LENS, nh, p, seed).unwrap();
    let (a, b, c, off) = (run(0.3, 7), run(0.3, 7), run(0.3, 8), run(0.0, 0));
    assert_eq!(max_diff(&a, &b), 0.0, "the same seed draws the same flags");
    assert!(max_diff(&a, &c) > 1e-3, "another seed draws other flags");
    assert!(max_diff(&a, &off) > 1e-3, "dropout changes the context");
}
