//! Training without padding (CPU f32).
//!
//! A batch of texts of different lengths is padded to its longest, and every dense layer then
//! multiplies the padding rows too: a share of each step equal to the batch's padding. Here the
//! encoder's activations after the embeddings are the batch's real tokens only, text after text
//! (`[tokens, width]`), and the attention runs on that layout too, each text over its own keys
//! (`attention::attention_unpadded`). The embeddings are unpadded on the way in and the last
//! hidden states padded on the way out (zeros at the padding), by row gathers with their own
//! backward pass (the other gather). What the real tokens compute is unchanged, so the loss
//! and the gradients are the padded pass's.

use super::buffers::{f32s, uninit};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// A row that a gather fills with zeros instead of copying.
const NONE: u32 = u32::MAX;

/// Where each real token of a padded `[batch, seq]` batch sits, and back.
#[derive(Clone)]
pub struct Unpadding {
    /// Padded row (`text·seq + position`) of each real token, in order.
    tokens: Arc<Vec<u32>>,
    /// Packed row of each padded row, or [`NONE`] for padding.
    padded: Arc<Vec<u32>>,
    batch: usize,
    seq: usize,
}

impl Unpadding {
    /// The map of a `[batch, seq]` key mask (1 for a token, 0 for padding at the end of a
    /// text); `None` when nothing is padded (there is nothing to save) or a text has padding
    /// before a token or no token at all.
    pub fn of(mask: &[f32], batch: usize, seq: usize) -> Option<Self> {
        if mask.len() != batch * seq || seq == 0 || mask.iter().all(|&m| m != 0.0) {
            return None;
        }
        let right_padded = mask.chunks(seq).all(|row| row[0] != 0.0 && row.windows(2).all(|w| w[0] != 0.0 || w[1] == 0.0));
        if !right_padded {
            return None;
        }
        let tokens: Vec<u32> = (0..mask.len() as u32).filter(|&r| mask[r as usize] != 0.0).collect();
        let mut padded = vec![NONE; mask.len()];
        for (t, &r) in tokens.iter().enumerate() {
            padded[r as usize] = t as u32;
        }
        Some(Self { tokens: Arc::new(tokens), padded: Arc::new(padded), batch, seq })
    }

    /// Real tokens in the batch: the rows of the unpadded activations.
    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Each text's tokens, in order.
    pub fn lens(&self) -> Vec<usize> {
        (0..self.batch).map(|b| (0..self.seq).take_while(|&i| self.padded[b * self.seq + i] != NONE).count()).collect()
    }

    /// Each token's position in its text, in order.
    pub fn positions(&self) -> Vec<usize> {
        self.tokens.iter().map(|&r| r as usize % self.seq).collect()
    }

    /// `[batch, seq, width]` (or `[batch·seq, width]`) to the real tokens' rows `[tokens, width]`.
    pub fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dims().last().copied().unwrap_or(0);
        x.reshape((self.batch * self.seq, w))?.apply_op1_arc(Arc::new(Box::new(Gather::new(self.tokens.clone(), self.batch * self.seq))))
    }

    /// The real tokens' rows `[tokens, width]` to `[batch, seq, width]`, zeros in the padding.
    pub fn pad(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dims().last().copied().unwrap_or(0);
        let y = x.apply_op1_arc(Arc::new(Box::new(Gather::new(self.padded.clone(), self.tokens.len()))))?;
        y.reshape((self.batch, self.seq, w))
    }

    /// The rows of `[tokens, width]` that are each text's first token, `[batch, width]`.
    pub fn firsts(&self, x: &Tensor) -> Result<Tensor> {
        let firsts: Vec<u32> = (0..self.batch).map(|b| self.padded[b * self.seq]).collect();
        if firsts.contains(&NONE) {
            candle_core::bail!("unpadded batch: a text without a first token");
        }
        x.apply_op1_arc(Arc::new(Box::new(Gather::new(Arc::new(firsts), self.tokens.len()))))
    }
}

/// Output row `r` is input row `from[r]` (zeros where that is [`NONE`]); `from` names each input
/// row at most once, so the backward pass is the gather the other way.
struct Gather {
    from: Arc<Vec<u32>>,
    /// Rows of the input.
    in_rows: usize,
}

impl Gather {
    fn new(from: Arc<Vec<u32>>, in_rows: usize) -> Self {
        Self { from, in_rows }
    }

    /// The gather that takes this one's output rows back to its input rows.
    fn inverse(&self) -> Self {
        let mut back = vec![NONE; self.in_rows];
        for (r, &f) in self.from.iter().enumerate() {
            if f != NONE {
                back[f as usize] = r as u32;
            }
        }
        Self { from: Arc::new(back), in_rows: self.from.len() }
    }
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "row-gather"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(st, l)?;
        let (rows, w) = l.shape().dims2()?;
        if rows != self.in_rows || self.from.iter().any(|&f| f != NONE && f as usize >= rows) {
            candle_core::bail!("row gather: {rows} input rows, {} expected", self.in_rows);
        }
        // SAFETY: every output row is written below, copied or zero-filled.
        let mut y = unsafe { uninit(self.from.len() * w) };
        if w > 0 {
            y.par_chunks_mut(w * 16).zip(self.from.par_chunks(16)).for_each(|(out, from)| {
                for (o, &f) in out.chunks_mut(w).zip(from) {
                    match f {
                        NONE => o.fill(0.0),
                        f => o.copy_from_slice(&x[f as usize * w..][..w]),
                    }
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((self.from.len(), w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(self.inverse())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn unpad_keeps_the_tokens_pad_restores_them_and_gradients_flow_back_to_the_same_places() {
        let dev = Device::Cpu;
        // Two texts of 3 and 1 tokens in a batch padded to 3.
        let mask = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let u = Unpadding::of(&mask, 2, 3).unwrap();
        assert_eq!((u.tokens(), u.lens(), u.positions()), (4, vec![3, 1], vec![0, 1, 2, 0]));
        let x = Var::from_vec((0..12).map(|v| v as f32).collect::<Vec<_>>(), (2, 3, 2), &dev).unwrap();
        let packed = u.unpad(x.as_tensor()).unwrap();
        assert_eq!(packed.to_vec2::<f32>().unwrap(), vec![vec![0., 1.], vec![2., 3.], vec![4., 5.], vec![6., 7.]]);
        let back = u.pad(&packed).unwrap();
        assert_eq!(back.dims(), &[2, 3, 2]);
        let want: Vec<f32> = vec![0., 1., 2., 3., 4., 5., 6., 7., 0., 0., 0., 0.];
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(u.firsts(&packed).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0., 1.], vec![6., 7.]]);
        // d/dx of Σ c·pad(unpad(x)): c at the tokens, 0 at the padding.
        let c = Tensor::arange(1f32, 13.0, &dev).unwrap().reshape((2, 3, 2)).unwrap();
        let grads = (back * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![1., 2., 3., 4., 5., 6., 7., 8., 0., 0., 0., 0.]);
    }

    #[test]
    fn a_batch_without_padding_or_with_padding_before_a_token_is_left_as_it_is() {
        assert!(Unpadding::of(&[1.0; 6], 2, 3).is_none());
        assert!(Unpadding::of(&[1.0, 0.0, 1.0, 1.0, 1.0, 1.0], 2, 3).is_none());
        assert!(Unpadding::of(&[0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2, 3).is_none());
    }
}
