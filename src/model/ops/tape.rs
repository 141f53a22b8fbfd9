//! Gradients that fused ops hand over directly, beside candle's `GradStore`.
//!
//! candle's backward pass gives each input's gradient a zero-filled buffer and adds into it,
//! on one thread: for a 30k-row embedding table that is two serial passes over 47 MB every
//! step, for a gradient that is zero except in the rows the batch used. An op whose input is
//! such a table leaves it out of candle's graph (its backward returns no gradient for it) and
//! deposits the rows it touched here, on the thread that runs the backward pass; [`backward`]
//! runs candle's pass and collects them. The optimizer reads the rows as they are.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// The gradient of a table whose rows outside `rows` are zero: `values` holds one row of
/// `width` per entry of `rows` (sorted, each once).
#[derive(Clone, Debug)]
pub struct RowGrad {
    rows: Vec<u32>,
    values: Vec<f32>,
    width: usize,
}

impl RowGrad {
    /// Rows `rows` (sorted, distinct) of a table `width` wide, holding `values` (`rows.len()·width`).
    pub fn new(rows: Vec<u32>, values: Vec<f32>, width: usize) -> Result<Self> {
        if values.len() != rows.len() * width || rows.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("row gradient: {} rows of width {width} need sorted distinct rows and as many values", rows.len());
        }
        Ok(Self { rows, values, width })
    }

    /// The table rows that have a gradient, ascending.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Their gradients, one row of [`RowGrad::width`] after another.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values per row: the table's width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Sum of squares, over fixed chunks added in order: the same whatever the thread count.
    pub fn sq_norm(&self) -> f64 {
        let parts: Vec<f64> = self.values.par_chunks(1 << 16).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect();
        parts.iter().sum()
    }

    /// The whole table's gradient, zeros but in `rows`, shaped as `table`.
    pub fn to_dense(&self, table: &Tensor) -> Result<Tensor> {
        let total = table.elem_count();
        let w = self.width.max(1);
        if !total.is_multiple_of(w) || self.rows.last().is_some_and(|&r| (r as usize + 1) * w > total) {
            candle_core::bail!("row gradient of width {w} does not fit a table of shape {:?}", table.shape());
        }
        let mut dense = vec![0f32; total];
        for (&r, row) in self.rows.iter().zip(self.values.chunks(w)) {
            let r = r as usize;
            dense[r * w..(r + 1) * w].copy_from_slice(row);
        }
        Tensor::from_vec(dense, table.shape(), table.device())
    }

    /// The sum of two gradients of the same table.
    fn plus(self, other: RowGrad) -> RowGrad {
        let w = self.width;
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < self.rows.len() || j < other.rows.len() {
            let a = self.rows.get(i).copied().unwrap_or(u32::MAX);
            let b = other.rows.get(j).copied().unwrap_or(u32::MAX);
            rows.push(a.min(b));
            let start = values.len();
            values.resize(start + w, 0.0);
            if a <= b {
                values[start..].iter_mut().zip(&self.values[i * w..(i + 1) * w]).for_each(|(v, x)| *v += x);
                i += 1;
            }
            if b <= a {
                values[start..].iter_mut().zip(&other.values[j * w..(j + 1) * w]).for_each(|(v, x)| *v += x);
                j += 1;
            }
        }
        RowGrad { rows, values, width: w }
    }
}

thread_local! {
    /// One list of deposits per backward pass running on this thread, innermost last: a rayon
    /// thread that waits inside one job's op can run another job's whole step (jobs share the
    /// training pool), so passes nest, and each must collect only its own rows.
    static FRAMES: RefCell<Vec<Vec<(Tensor, RowGrad)>>> = const { RefCell::new(Vec::new()) };
}

/// Hands over `param`'s gradient from inside an op's backward pass (see the module's note).
/// Outside a [`backward`] there is nobody to collect it, and it is dropped.
pub(crate) fn deposit(param: &Tensor, grad: RowGrad) {
    FRAMES.with(|f| {
        if let Some(frame) = f.borrow_mut().last_mut() {
            frame.push((param.clone(), grad));
        }
    });
}

/// The gradients of one backward pass: candle's, and the rows that fused ops handed over.
pub struct Gradients {
    store: GradStore,
    rows: HashMap<TensorId, RowGrad>,
}

/// Runs the backward pass from `loss` and collects every gradient, candle's and the deposited.
pub fn backward(loss: &Tensor) -> Result<Gradients> {
    FRAMES.with(|f| f.borrow_mut().push(Vec::new()));
    let outcome = loss.backward();
    // Popped whatever the outcome: a pass that failed half-way leaves nothing behind.
    let deposits = FRAMES.with(|f| f.borrow_mut().pop().unwrap_or_default());
    let mut store = outcome?;
    let mut rows: HashMap<TensorId, (Tensor, RowGrad)> = HashMap::new();
    for (param, grad) in deposits {
        let merged = match rows.remove(&param.id()) {
            Some((_, earlier)) => earlier.plus(grad),
            None => grad,
        };
        rows.insert(param.id(), (param, merged));
    }
    let mut kept = HashMap::new();
    for (id, (param, grad)) in rows {
        // The table also had a gradient through candle (the masked-LM decoder tied to the
        // word embeddings): one dense gradient, the sum of both.
        match store.remove(&param) {
            Some(dense) => {
                let sum = (dense + grad.to_dense(&param)?)?;
                store.insert(&param, sum);
            }
            None => {
                kept.insert(id, grad);
            }
        }
    }
    Ok(Gradients { store, rows: kept })
}

/// One parameter's gradient as the optimizer reads it.
pub enum Grad<'a> {
    Dense(&'a Tensor),
    Rows(&'a RowGrad),
}

impl Gradients {
    /// `param`'s gradient, if the pass reached it.
    pub fn grad(&self, param: &Tensor) -> Option<Grad<'_>> {
        match self.rows.get(&param.id()) {
            Some(rows) => Some(Grad::Rows(rows)),
            None => self.store.get(param).map(Grad::Dense),
        }
    }

    /// `param`'s gradient as one dense tensor of its shape.
    pub fn get(&self, param: &Tensor) -> Result<Option<Tensor>> {
        match self.grad(param) {
            Some(Grad::Rows(rows)) => rows.to_dense(param).map(Some),
            Some(Grad::Dense(t)) => Ok(Some(t.clone())),
            None => Ok(None),
        }
    }
}
