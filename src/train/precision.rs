//! Mixed precision: the dtype a training step computes in. Parameters, gradients and the
//! optimizer's moments stay f32 (the master weights); each step casts the weights to the
//! compute dtype, and the cast's backward pass brings the gradients back to f32. f16's narrow
//! range needs the loss scaled up before the backward pass and the gradients scaled back down,
//! with the scale halved whenever they overflow (as PyTorch's `GradScaler` does).

use candle_core::{DType, Device, Result, Tensor};

/// What a training step computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// `auto` (bf16 on a GPU, f32 on the CPU), `f32`, `bf16` or `f16`.
    pub fn parse(s: &str, device: &Device) -> std::result::Result<Self, String> {
        match s {
            "auto" if device.is_cpu() => Ok(Self::F32),
            "auto" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!("unknown dtype {other:?}: use auto, f32, bf16 or f16")),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// A master weight as the step computes with it (the same tensor in f32).
    pub fn cast(self, t: Tensor) -> Result<Tensor> {
        if t.dtype() == self.dtype() {
            Ok(t)
        } else {
            t.to_dtype(self.dtype())
        }
    }
}

/// Dynamic loss scaling for f16 (a constant 1 otherwise).
#[derive(Debug, Clone)]
pub struct LossScaler {
    scale: f64,
    good_steps: usize,
    dynamic: bool,
}

/// Steps without overflow before the scale is doubled again.
const GROWTH_INTERVAL: usize = 2000;

impl LossScaler {
    pub fn new(p: Precision) -> Self {
        let dynamic = p == Precision::F16;
        Self { scale: if dynamic { 65536.0 } else { 1.0 }, good_steps: 0, dynamic }
    }

    /// The factor the loss is multiplied by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Records whether the step's gradients were finite: an overflow halves the scale (the
    /// step was skipped), a long run without one doubles it.
    pub fn update(&mut self, finite: bool) {
        if !self.dynamic {
            return;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_bf16_on_a_gpu_only_and_f16_scales_its_loss_dynamically() {
        assert_eq!(Precision::parse("auto", &Device::Cpu), Ok(Precision::F32));
        assert_eq!(Precision::parse("f16", &Device::Cpu), Ok(Precision::F16));
        assert!(Precision::parse("f64", &Device::Cpu).is_err());
        assert_eq!(LossScaler::new(Precision::Bf16).scale(), 1.0);
        let mut s = LossScaler::new(Precision::F16);
        s.update(false);
        assert_eq!(s.scale(), 32768.0);
        (0..GROWTH_INTERVAL).for_each(|_| s.update(true));
        assert_eq!(s.scale(), 65536.0);
    }
}
