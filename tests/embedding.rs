//! The fused embedding lookup (`model::ops::embedding`) against candle's composition of the
//! same sums, and the word table's gradient handed over as rows (`model::ops::tape`): the
//! same gradient as candle's `index_select` backward, and the same AdamW update as the dense
//! gradient gives, bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use finetuned::model::ops::embedding::{embed, Positions, Types};
use finetuned::model::ops::kernels::set_fused_cpu_kernels;
use finetuned::model::ops::tape::{backward, Grad};
use finetuned::train::optim::AdamW;

fn table(rows: usize, w: usize, seed: f32) -> Var {
    let v: Vec<f32> = (0..rows * w).map(|i| (i as f32 * 0.37 + seed).sin() * 0.5).collect();
    Var::from_tensor(&Tensor::from_vec(v, (rows, w), &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Word, type and position tables, ids with repeats (id 3 three times), and an upstream gradient.
struct Case {
    word: Var,
    pos: Var,
    types: Var,
    ids: Tensor,
    type_ids: Tensor,
    upstream: Tensor,
}

fn case() -> Case {
    let dev = Device::Cpu;
    let (b, s, w) = (2, 5, 8);
    let up: Vec<f32> = (0..b * s * w).map(|i| (i as f32 * 0.11).cos()).collect();
    Case {
        word: table(40, w, 0.0),
        pos: table(12, w, 1.0),
        types: table(2, w, 2.0),
        ids: Tensor::new(&[[1u32, 3, 7, 3, 0], [3, 39, 2, 7, 0]], &dev).unwrap(),
        type_ids: Tensor::new(&[[0u32, 0, 0, 1, 1], [0, 0, 1, 1, 1]], &dev).unwrap(),
        upstream: Tensor::from_vec(up, (b, s, w), &dev).unwrap(),
    }
}

fn run(c: &Case, fused: bool) -> (Tensor, [Tensor; 3]) {
    let before = set_fused_cpu_kernels(fused);
    let out = embed(
        c.word.as_tensor(),
        &c.ids,
        Some(Positions { table: c.pos.as_tensor(), offset: 2 }),
        Some(Types { table: c.types.as_tensor(), ids: &c.type_ids }),
    )
    .unwrap();
    let grads = backward(&(&out * &c.upstream).unwrap().sum_all().unwrap()).unwrap();
    set_fused_cpu_kernels(before);
    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().expect("a gradient for every table");
    (out, [g(&c.word), g(&c.pos), g(&c.types)])
}

#[test]
fn fused_lookup_gives_candles_values_and_gradients() {
    let c = case();
    let (fused, fused_grads) = run(&c, true);
    let (composed, composed_grads) = run(&c, false);
    assert_eq!(fused.dims(), &[2, 5, 8]);
    assert!(max_diff(&fused, &composed) < 1e-6, "values differ by {}", max_diff(&fused, &composed));
    for (name, (f, g)) in ["word", "position", "type"].iter().zip(fused_grads.iter().zip(&composed_grads)) {
        assert_eq!(f.dims(), g.dims(), "{name}");
        assert!(max_diff(f, g) < 1e-5, "{name} gradient differs by {}", max_diff(f, g));
    }
    // Rows no token used have a zero gradient; id 3's is the sum over its three tokens.
    let word = fused_grads[0].to_vec2::<f32>().unwrap();
    assert!(word[5].iter().all(|&x| x == 0.0));
    assert!(word[3].iter().any(|&x| x != 0.0));
}

#[test]
fn the_word_table_gradient_arrives_as_rows_and_updates_as_the_dense_one_would() {
    let c = case();
    let out = embed(c.word.as_tensor(), &c.ids, None, None).unwrap();
    let grads = backward(&(&out * &c.upstream).unwrap().sum_all().unwrap()).unwrap();
    let Some(Grad::Rows(rows)) = grads.grad(c.word.as_tensor()) else { panic!("the word table's gradient is not handed over as rows") };
    assert_eq!(rows.rows(), &[0, 1, 2, 3, 7, 39]);
    let dense = grads.get(c.word.as_tensor()).unwrap().unwrap();

    // The same update from the row gradient and from its dense copy, over three steps.
    let sparse_var = table(40, 8, 0.0);
    let dense_var = table(40, 8, 0.0);
    let (mut a, mut b) = (AdamW::new(vec![true], 0.01), AdamW::new(vec![true], 0.01));
    for _ in 0..3 {
        let out = embed(sparse_var.as_tensor(), &c.ids, None, None).unwrap();
        let g = backward(&(&out * &c.upstream).unwrap().sum_all().unwrap()).unwrap();
        let na = a.step(std::slice::from_ref(&sparse_var), &g, 1e-2, 1.0).unwrap();
        let composed = {
            let before = set_fused_cpu_kernels(false);
            let out = embed(dense_var.as_tensor(), &c.ids, None, None).unwrap();
            let g = backward(&(&out * &c.upstream).unwrap().sum_all().unwrap()).unwrap();
            set_fused_cpu_kernels(before);
            g
        };
        assert!(matches!(composed.grad(dense_var.as_tensor()), Some(Grad::Dense(_))));
        let nb = b.step(std::slice::from_ref(&dense_var), &composed, 1e-2, 1.0).unwrap();
        assert!((na - nb).abs() < 1e-9 * nb.max(1.0), "gradient norms {na} and {nb}");
    }
    let (pa, pb) = (sparse_var.as_tensor().to_vec2::<f32>().unwrap(), dense_var.as_tensor().to_vec2::<f32>().unwrap());
    assert_eq!(pa, pb, "the row update and the dense update differ");
    // Unused rows moved too (weight decay), as the dense update moves them.
    assert_ne!(pa[5], table(40, 8, 0.0).as_tensor().to_vec2::<f32>().unwrap()[5]);
    assert_eq!(dense.to_dtype(DType::F32).unwrap().dims(), &[40, 8]);
}

#[test]
fn an_id_outside_the_table_is_refused() {
    let c = case();
    let ids = Tensor::new(&[[1u32, 40]], &Device::Cpu).unwrap();
    let err = embed(c.word.as_tensor(), &ids, None, None).unwrap_err().to_string();
    assert!(err.contains("token id 40") && err.contains("40 rows"), "{err}");
}

/// An op whose backward pass runs another model's whole backward pass, as a rayon thread
/// waiting inside one job's op can run another job's step when jobs share the training pool.
struct RunsAnotherPass {
    word: Var,
    ids: Tensor,
    upstream: Tensor,
    seen: std::sync::Arc<std::sync::Mutex<Option<Vec<u32>>>>,
}

impl candle_core::CustomOp1 for RunsAnotherPass {
    fn name(&self) -> &'static str {
        "runs-another-pass"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else { candle_core::bail!("f32 only") };
        Ok((candle_core::CpuStorage::F32(v[l.start_offset()..l.start_offset() + l.shape().elem_count()].to_vec()), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = embed(self.word.as_tensor(), &self.ids, None, None)?;
        let inner = backward(&(&out * &self.upstream)?.sum_all()?)?;
        let Some(Grad::Rows(rows)) = inner.grad(self.word.as_tensor()) else { candle_core::bail!("the inner pass lost its rows") };
        *self.seen.lock().unwrap() = Some(rows.rows().to_vec());
        Ok(Some(grad.clone()))
    }
}

#[test]
fn a_backward_pass_run_inside_another_collects_only_its_own_rows() {
    let c = case();
    let other_word = table(40, 8, 3.0);
    let other_ids = Tensor::new(&[[11u32, 12, 13, 12, 11], [20, 21, 22, 23, 24]], &Device::Cpu).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let nest = RunsAnotherPass { word: other_word.clone(), ids: other_ids, upstream: c.upstream.clone(), seen: seen.clone() };
    let v = Var::from_tensor(&Tensor::ones((2, 5, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
    // `nested · embed`: candle runs the embedding's backward (its rows deposited) before the
    // op whose backward runs the other pass.
    let outer = embed(c.word.as_tensor(), &c.ids, None, None).unwrap();
    let loss = (v.as_tensor().apply_op1(nest).unwrap() * &outer).unwrap().sum_all().unwrap();
    let grads = backward(&loss).unwrap();
    let Some(Grad::Rows(rows)) = grads.grad(c.word.as_tensor()) else { panic!("the outer pass lost its rows") };
    assert_eq!(rows.rows(), &[0, 1, 2, 3, 7, 39]);
    assert!(grads.grad(other_word.as_tensor()).is_none(), "the inner pass's rows leaked into the outer one");
    assert_eq!(seen.lock().unwrap().as_deref(), Some(&[11u32, 12, 13, 20, 21, 22, 23, 24][..]), "the inner pass's own rows");
}
