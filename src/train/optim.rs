//! AdamW with decoupled weight decay, global-norm gradient clipping and the linear
//! warmup/decay schedule, matching PyTorch's `AdamW` and transformers' scheduler.
//!
//! On CPU the update runs in place over each parameter's storage in one fused pass, with
//! no temporaries (candle-nn's `AdamW` allocates ~15 tensors per parameter per step). On other
//! devices (and on the CPU's device-generic path) two in-place kernels per parameter do the
//! same (`model::ops::device_optim::AdamWMoments`, `AdamWApply`), and the gradient norm costs one
//! device-to-host read per step, not one per parameter.

use crate::model::ops::device_optim::{AdamWApply, AdamWMoments};
use crate::model::ops::tape::{Grad, Gradients, RowGrad};
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// Learning rate at 0-based `step`: linear warmup from 0, then linear decay to 0.
pub fn linear_schedule(base_lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        base_lr * step as f64 / warmup.max(1) as f64
    } else {
        base_lr * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
    }
}

/// First and second moments of one parameter: plain vectors on CPU (updated in place),
/// elsewhere one f32 `[2·n]` tensor on the parameter's device, m then v.
enum Moments {
    Cpu(Vec<f32>, Vec<f32>),
    Device(Tensor),
}

/// Whether `t` takes the fused CPU update (f32 on the CPU, unless switched off).
fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && crate::model::ops::kernels::use_fused_cpu_kernels()
}

/// Optimiser state for a fixed list of parameters.
pub struct AdamW {
    moments: Vec<Option<Moments>>,
    decay: Vec<bool>,
    step: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) if l.is_contiguous() => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

/// Sum of squares of every gradient present.
fn grad_sq_norm(vars: &[Var], grads: &Gradients) -> Result<f64> {
    let mut total = 0f64;
    let mut on_device = Vec::new();
    for v in vars {
        match grads.grad(v.as_tensor()) {
            None => {}
            Some(Grad::Rows(rows)) => total += rows.sq_norm(),
            Some(Grad::Dense(g)) if fused_cpu(g) && g.is_contiguous() => {
                let (s, l) = g.storage_and_layout();
                // Fixed chunks summed in order: the same result whatever the thread count.
                let partial: Vec<f64> =
                    cpu_f32(&s, l)?.par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect();
                total += partial.iter().sum::<f64>();
            }
            Some(Grad::Dense(g)) => on_device.push(g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?),
        }
    }
    if !on_device.is_empty() {
        // One read for all of them: each `to_scalar` would wait for the device.
        total += Tensor::stack(&on_device, 0)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total)
}

/// The constants of one AdamW update.
#[derive(Clone, Copy)]
struct Consts {
    lr: f32,
    decay: f32,
    scale: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
}

/// One AdamW update of a span of parameters `p` with moments `m`, `v` and gradient `g`.
fn adam_span(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Consts) {
    let step_size = k.lr / k.bc1;
    let shrink = 1.0 - k.lr * k.decay;
    for i in 0..p.len() {
        let g = g[i] * k.scale;
        m[i] = k.b1 * m[i] + (1.0 - k.b1) * g;
        v[i] = k.b2 * v[i] + (1.0 - k.b2) * g * g;
        let denom = (v[i] / k.bc2).sqrt() + k.eps;
        p[i] = p[i] * shrink - step_size * m[i] / denom;
    }
}

/// A gradient as the fused update reads it.
enum GradView<'a> {
    Dense(&'a [f32]),
    Rows(&'a RowGrad),
}

/// Table rows per parallel work item of a row gradient's update.
const ROW_BLOCK: usize = 32;

struct FusedStep<'a> {
    grad: GradView<'a>,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    k: Consts,
}

impl candle_core::InplaceOp1 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(p) = storage else { candle_core::bail!("fused AdamW needs f32") };
        let p = &mut p[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()];
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        let k = self.k;
        match self.grad {
            GradView::Dense(g) => {
                let chunks = p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK));
                chunks.for_each(|(((p, m), v), g)| adam_span(p, m, v, g, k));
            }
            GradView::Rows(rows) => {
                // A row the batch did not use has a zero gradient: its moments decay and the
                // parameters move as the dense update moves them (the same arithmetic, on zeros).
                let w = rows.width().max(1);
                let zeros = vec![0f32; w];
                let block = w * ROW_BLOCK;
                let chunks = p.par_chunks_mut(block).zip(m.par_chunks_mut(block)).zip(v.par_chunks_mut(block)).enumerate();
                chunks.for_each(|(c, ((p, m), v))| {
                    let first = c * ROW_BLOCK;
                    let mut next = rows.rows().partition_point(|&r| (r as usize) < first);
                    for (j, ((p, m), v)) in p.chunks_mut(w).zip(m.chunks_mut(w)).zip(v.chunks_mut(w)).enumerate() {
                        let g = if rows.rows().get(next).is_some_and(|&r| r as usize == first + j) {
                            next += 1;
                            &rows.values()[(next - 1) * w..next * w]
                        } else {
                            &zeros[..]
                        };
                        adam_span(p, m, v, g, k);
                    }
                });
            }
        }
        Ok(())
    }
}

impl AdamW {
    /// PyTorch defaults (β 0.9/0.999, ε 1e-8); `decay[i]` says whether parameter i gets weight decay.
    pub fn new(decay: Vec<bool>, weight_decay: f64) -> Self {
        Self { moments: (0..decay.len()).map(|_| None).collect(), decay, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// Clips gradients to global L2 norm `max_norm` and applies one update at `lr`.
    /// Parameters without a gradient are left alone, as PyTorch does. Returns the norm before clipping.
    pub fn step(&mut self, vars: &[Var], grads: &Gradients, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = grad_sq_norm(vars, grads)?.sqrt();
        let scale = if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.apply(vars, grads, lr, scale)?;
        Ok(norm)
    }

    /// As `step`, for gradients of a loss that was multiplied by `loss_scale` (mixed
    /// precision): they are scaled back first. Gradients that overflowed (not finite) are
    /// skipped without touching the parameters or the moments: `None`.
    pub fn step_scaled(&mut self, vars: &[Var], grads: &Gradients, lr: f64, max_norm: f64, loss_scale: f64) -> Result<Option<f64>> {
        let norm = grad_sq_norm(vars, grads)?.sqrt() / loss_scale;
        if !norm.is_finite() {
            return Ok(None);
        }
        let clip = if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.apply(vars, grads, lr, clip / loss_scale)?;
        Ok(Some(norm))
    }

    /// One update with every gradient multiplied by `scale`.
    fn apply(&mut self, vars: &[Var], grads: &Gradients, lr: f64, scale: f64) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        for (i, var) in vars.iter().enumerate() {
            let Some(grad) = grads.grad(var.as_tensor()) else { continue };
            let decay = if self.decay[i] { self.weight_decay } else { 0.0 };
            if self.moments[i].is_none() {
                let n = var.elem_count();
                self.moments[i] = Some(if fused_cpu(var.as_tensor()) {
                    Moments::Cpu(vec![0.0; n], vec![0.0; n])
                } else {
                    Moments::Device(Tensor::zeros(2 * n, candle_core::DType::F32, var.device())?)
                });
            }
            let moments = self.moments[i].as_mut().expect("set above");
            let k = Consts {
                lr: lr as f32,
                decay: decay as f32,
                scale: scale as f32,
                b1: self.beta1 as f32,
                b2: self.beta2 as f32,
                eps: self.eps as f32,
                bc1: bc1 as f32,
                bc2: bc2 as f32,
            };
            match (moments, grad) {
                (Moments::Cpu(m, v), Grad::Rows(rows)) => {
                    let op =
                        FusedStep { grad: GradView::Rows(rows), m: RefCell::new(m.as_mut_slice()), v: RefCell::new(v.as_mut_slice()), k };
                    var.as_tensor().inplace_op1(&op)?;
                }
                (Moments::Cpu(m, v), Grad::Dense(g)) => {
                    let g = g.contiguous()?;
                    let (gs, gl) = g.storage_and_layout();
                    let op = FusedStep {
                        grad: GradView::Dense(cpu_f32(&gs, gl)?),
                        m: RefCell::new(m.as_mut_slice()),
                        v: RefCell::new(v.as_mut_slice()),
                        k,
                    };
                    var.as_tensor().inplace_op1(&op)?;
                }
                (Moments::Device(mv), grad) => {
                    let g = match grad {
                        Grad::Dense(g) => g.contiguous()?,
                        Grad::Rows(rows) => rows.to_dense(var.as_tensor())?,
                    };
                    mv.inplace_op2(&g, &AdamWMoments { grad_scale: k.scale, beta1: k.b1, beta2: k.b2 })?;
                    let (bc1, bc2, eps) = (k.bc1, k.bc2, k.eps);
                    var.as_tensor().inplace_op2(mv, &AdamWApply { lr: k.lr, decay: k.decay, bc1, bc2, eps })?;
                }
            }
        }
        Ok(())
    }
}

/// The optimiser's state as named tensors (`m.<i>`, `v.<i>` by parameter index), for checkpoints.
pub struct OptimState {
    pub step: i32,
    pub moments: Vec<Option<(Tensor, Tensor)>>,
}

impl AdamW {
    /// A copy of the step count and moments.
    pub fn export(&self) -> Result<OptimState> {
        let moments = self
            .moments
            .iter()
            .map(|m| match m {
                None => Ok(None),
                Some(Moments::Cpu(m, v)) => {
                    let cpu = candle_core::Device::Cpu;
                    Ok(Some((Tensor::from_slice(m, m.len(), &cpu)?, Tensor::from_slice(v, v.len(), &cpu)?)))
                }
                Some(Moments::Device(mv)) => {
                    let n = mv.elem_count() / 2;
                    Ok(Some((mv.narrow(0, 0, n)?.copy()?, mv.narrow(0, n, n)?.copy()?)))
                }
            })
            .collect::<Result<_>>()?;
        Ok(OptimState { step: self.step, moments })
    }

    /// Restores a state taken by [`AdamW::export`] for the same parameters.
    pub fn restore(&mut self, vars: &[Var], state: OptimState) -> Result<()> {
        if state.moments.len() != self.moments.len() {
            candle_core::bail!("optimiser state has {} parameters, the model {}", state.moments.len(), self.moments.len());
        }
        for (i, (slot, saved)) in self.moments.iter_mut().zip(state.moments).enumerate() {
            *slot = match saved {
                None => None,
                Some((m, v)) => {
                    let var = &vars[i];
                    if m.elem_count() != var.elem_count() || v.elem_count() != var.elem_count() {
                        candle_core::bail!("optimiser state of parameter {i} does not match its size");
                    }
                    if fused_cpu(var.as_tensor()) {
                        Some(Moments::Cpu(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?))
                    } else {
                        let mv = Tensor::cat(&[m.flatten_all()?, v.flatten_all()?], 0)?.to_dtype(candle_core::DType::F32)?;
                        Some(Moments::Device(mv.to_device(var.device())?))
                    }
                }
            };
        }
        self.step = state.step;
        Ok(())
    }
}
