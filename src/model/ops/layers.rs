//! Building blocks whose every op has a backward pass in training mode, and fast fused
//! kernels in inference mode (candle's fused LayerNorm and softmax have no backward).

use super::packed::{Packed, PackedLinear};
use candle_core::{DType, Result, Tensor, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Training or inference: training applies dropout with a seeded generator and uses only
/// differentiable ops.
pub enum Mode<'a> {
    Eval,
    Train(&'a mut ChaCha8Rng),
}

impl Mode<'_> {
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// A fresh seed for a kernel that draws its own dropout mask (0 in inference).
    pub fn seed(&mut self) -> u64 {
        match self {
            Mode::Train(rng) => rng.random::<u64>(),
            Mode::Eval => 0,
        }
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1/(1-p)`. The mask comes from our own seeded generator so runs are repeatable
    /// (candle cannot seed its CPU generator): one seed is taken here per call, and the kernel
    /// draws the mask from it on the device (see `model::ops::rng`); nothing per element is done
    /// on the host.
    pub fn dropout(&mut self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Mode::Train(rng) = self else { return Ok(xs.clone()) };
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let seed = rng.random::<u64>();
        super::kernels::dropout(xs, p, seed)
    }
}

/// A dense layer with PyTorch's `[out, in]` weight layout (or `[in, out]` once prepared
/// for inference).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    /// `weight` is stored transposed, `[in, out]`.
    in_out: bool,
    /// The weight packed for our AVX-512 kernel, for inference (`weight` is then dropped).
    packed: Option<Arc<Packed>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self { weight, bias, in_out: false, packed: None }
    }

    /// Stores the weight as `[in, out]` for inference on CPU f32: gemm then reads it
    /// without repacking, which for a short text is 2-10× faster. Not differentiable.
    pub fn prepare_for_inference(&mut self) -> Result<()> {
        if !self.in_out && self.weight.device().is_cpu() && self.weight.dtype() == DType::F32 {
            self.weight = self.weight.t()?.contiguous()?;
            self.in_out = true;
        }
        Ok(())
    }

    /// Replaces the weight, once prepared for inference, by a copy packed for our AVX-512
    /// kernel (see `model::ops::packed`), in bf16 when `bf16`; the f32 weight is released. A
    /// no-op unless prepared and the CPU has the kernel's instructions.
    pub fn pack(&mut self, bf16: bool) -> Result<()> {
        let supported = if bf16 { super::packed::bf16_supported() } else { super::packed::f32_supported() };
        if !self.in_out || self.packed.is_some() || !supported {
            return Ok(());
        }
        let (k, n) = self.weight.dims2()?;
        let w = self.weight.flatten_all()?.to_vec1::<f32>()?;
        let b = self.bias.to_vec1::<f32>()?;
        self.packed = Some(Arc::new(Packed::new(&w, k, n, &b, bf16)));
        self.release_weight()
    }

    /// Whether the weight is packed for our kernel (see [`Linear::pack`]).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Drops the f32 weight of a layer that inference no longer reads (one whose outputs a
    /// fused layer computes).
    pub fn release_weight(&mut self) -> Result<()> {
        self.weight = Tensor::zeros(0, DType::F32, self.weight.device())?;
        Ok(())
    }

    /// Bytes of weights held (f32 or bf16) and bias.
    pub fn bytes(&self) -> usize {
        match &self.packed {
            Some(p) => p.bytes(),
            None => tensor_bytes(&self.weight) + tensor_bytes(&self.bias),
        }
    }

    /// One layer computing the outputs of all of `parts` side by side (same input), for
    /// inference; `None` unless every part is prepared for inference.
    pub fn concat_outputs(parts: &[&Linear]) -> Result<Option<Linear>> {
        if parts.is_empty() || !parts.iter().all(|p| p.in_out) {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        Ok(Some(Self { weight: Tensor::cat(&weights, 1)?, bias: Tensor::cat(&biases, 0)?, in_out: true, packed: None }))
    }

    /// The layer followed by the activation `act`. Prepared for inference, exact GELU is
    /// applied inside the layer's own pass over its output.
    pub fn forward_activated(&self, xs: &Tensor, act: Act) -> Result<Tensor> {
        if let (Some(w), Act::Gelu) = (&self.packed, act) {
            let op = PackedLinear { weight: w.clone(), gelu: true };
            return self.on_rows(xs, |x2| x2.contiguous()?.apply_op1_no_bwd(&op));
        }
        if act == Act::Gelu && !self.in_out && self.packed.is_none() && !cpu_fused(xs) {
            // Device-generic: the matmul, then bias and GELU in one kernel with its backward.
            return self.on_rows(xs, |x2| x2.matmul(&self.weight.t()?)?.apply_op2(&self.bias, super::device_ops::BiasGelu));
        }
        if !(self.in_out && act == Act::Gelu) {
            return activation(&self.forward(xs)?, act);
        }
        self.on_rows(xs, |x2| super::linear::linear_in_out_gelu(x2, &self.weight, &self.bias))
    }

    /// Applies `f` to `xs` seen as rows of its last dimension, and gives the result the shape of
    /// `xs` with the last dimension replaced by the layer's output width.
    fn on_rows(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let last = *dims.last().expect("rank ≥ 1");
        let y = f(&xs.reshape((xs.elem_count() / last, last))?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.bias.dim(0)?;
        y.reshape(out_dims)
    }

    /// The layer plus a LoRA term, `x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ`, as one fused op with
    /// this layer frozen (see `model::ops::lora_linear`); `None` where that op does not apply: another
    /// device or dtype, a layer prepared for inference, or a weight that is itself trained.
    pub fn forward_lora(&self, xs: &Tensor, a: &Tensor, b: &Tensor, scale: f64, dropout: Option<(f64, u64)>) -> Result<Option<Tensor>> {
        if !self.frozen_on_cpu(xs) {
            return Ok(None);
        }
        super::lora_linear::lora_linear(xs, &self.weight, &self.bias, a, b, scale, dropout).map(Some)
    }

    /// Whether this is a frozen layer in PyTorch's layout that the fused CPU ops take for `xs`
    /// (f32 on the CPU, neither weight nor bias trained, not prepared for inference).
    pub fn frozen_on_cpu(&self, xs: &Tensor) -> bool {
        !self.in_out && self.packed.is_none() && cpu_fused(xs) && !self.weight.track_op() && !self.bias.track_op()
    }

    /// Applies the layer to the last dimension of `xs` (any rank).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.packed.is_none() && !self.in_out && cpu_fused(xs) {
            // The fused op reads any rank as rows: no reshape nodes in the training graph.
            return super::linear::linear(xs, &self.weight, &self.bias);
        }
        self.on_rows(xs, |x2| {
            if let Some(w) = &self.packed {
                x2.contiguous()?.apply_op1_no_bwd(&PackedLinear { weight: w.clone(), gelu: false })
            } else if self.in_out {
                super::linear::linear_in_out(x2, &self.weight, &self.bias)
            } else {
                x2.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
            }
        })
    }
}

/// Whether `x` takes the fused CPU kernels (f32 on the CPU, unless switched off).
fn cpu_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && super::kernels::use_fused_cpu_kernels()
}

/// LayerNorm over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, xs: &Tensor, mode: &Mode) -> Result<Tensor> {
        if mode.is_train() {
            super::kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
        } else {
            let xs = xs.contiguous()?;
            candle_nn::ops::layer_norm(&xs, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(xs: &Tensor, mode: &Mode) -> Result<Tensor> {
    if mode.is_train() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// A feed-forward activation, as a config's `hidden_act` names it (read once, at load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Act {
    /// The activation `hidden_act` names, if we run it.
    pub fn parse(hidden_act: &str) -> Option<Self> {
        match hidden_act {
            "gelu" => Some(Act::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Act::GeluTanh),
            "relu" => Some(Act::Relu),
            _ => None,
        }
    }
}

/// `act` applied to `xs`.
pub fn activation(xs: &Tensor, act: Act) -> Result<Tensor> {
    match act {
        Act::Relu => xs.relu(),
        Act::GeluTanh => xs.gelu(),
        Act::Gelu => super::kernels::gelu_erf(xs),
    }
}

/// Additive attention bias from a `[batch, seq]` 0/1 mask: 0 where attended, a large
/// negative number on padding. Shape `[batch, 1, 1, seq]`.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    ((m - 1.0)? * 1e4)?.reshape((b, 1, 1, s))
}

/// Bytes a tensor holds, in its own dtype (a bf16 model counts half an f32 one).
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_counts_the_bytes_of_its_own_dtype() {
        let w = Tensor::zeros((8, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let b = Tensor::zeros(8, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let f32 = Linear::new(w.clone(), b.clone());
        let bf16 = Linear::new(w.to_dtype(candle_core::DType::BF16).unwrap(), b.to_dtype(candle_core::DType::BF16).unwrap());
        assert_eq!((f32.bytes(), bf16.bytes()), (40 * 4, 40 * 2));
    }
}
