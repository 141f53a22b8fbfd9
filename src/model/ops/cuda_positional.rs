//! The CUDA side of [`super::device_positional`]: launches the rotary, GeGLU and relative-position
//! kernels of `kernels/finetuned.cu` on candle's CUDA storage (contiguous inputs; results are new
//! storage in the input's dtype). Elementwise launches as in [`super::cuda`].

use super::cuda::{by_dtype, elementwise, ptx, view, Elem, MODULE};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

fn u32_of(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cuda {op}: {what} {v} out of range")))
}

/// The contiguous u32 elements of a tensor on the GPU.
fn index_view<'a>(op: &str, storage: &'a candle_core::Storage, l: &Layout) -> Result<CudaView<'a, u32>> {
    let candle_core::Storage::Cuda(s) = storage else { bail!("cuda {op}: the index is not on the GPU") };
    let Some((a, b)) = l.contiguous_offsets() else { bail!("cuda {op}: the index must be contiguous") };
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

/// Rotary embedding of `x` `[batch, seq, hidden]` by an f32 table `[seq, 2·head_dim]` (cosines,
/// then sines); `inverse`: the transposed rotation.
pub fn rotary(x: &CudaStorage, lx: &Layout, table: &CudaStorage, lt: &Layout, head_dim: usize, inverse: bool) -> Result<CudaStorage> {
    by_dtype!("rotary", x.dtype(), rotary_t(x, lx, table, lt, head_dim, inverse))
}

fn rotary_t<T: Elem>(
    x: &CudaStorage,
    lx: &Layout,
    table: &CudaStorage,
    lt: &Layout,
    head_dim: usize,
    inverse: bool,
) -> Result<CudaStorage> {
    const OP: &str = "rotary";
    let dev = x.device();
    let (_, seq, hidden) = lx.shape().dims3()?;
    let xs = view::<T>(OP, "input", x, lx)?;
    let ts = view::<f32>(OP, "table", table, lt)?;
    let n = xs.len();
    let out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_rotary_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (n64, seq32, hidden32, hd32) =
            (n as u64, u32_of(OP, "seq", seq)?, u32_of(OP, "hidden", hidden)?, u32_of(OP, "head_dim", head_dim)?);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let mut b = f.builder();
        b.arg(&xs).arg(&ts).arg(&out).arg(&n64).arg(&seq32).arg(&hidden32).arg(&hd32).arg(&sign);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// GeGLU of `x` `[.., 2n]`: `[.., n]`.
pub fn geglu_fwd(x: &CudaStorage, l: &Layout, n: usize) -> Result<CudaStorage> {
    by_dtype!("geglu", x.dtype(), geglu_t(x, l, None, n))
}

/// GeGLU's input gradient `[.., 2n]` from `x` and the output's gradient `g` `[.., n]`.
pub fn geglu_bwd(x: &CudaStorage, l: &Layout, g: &CudaStorage, lg: &Layout, n: usize) -> Result<CudaStorage> {
    by_dtype!("geglu-grad", x.dtype(), geglu_t(x, l, Some((g, lg)), n))
}

fn geglu_t<T: Elem>(x: &CudaStorage, l: &Layout, grad: Option<(&CudaStorage, &Layout)>, n: usize) -> Result<CudaStorage> {
    const OP: &str = "geglu";
    let dev = x.device();
    let xs = view::<T>(OP, "input", x, l)?;
    let outputs = xs.len() / 2;
    let n32 = u32_of(OP, "width", n)?;
    let out = unsafe { dev.alloc::<T>(if grad.is_some() { xs.len() } else { outputs })? };
    if outputs > 0 {
        let n64 = outputs as u64;
        match grad {
            None => {
                let f = dev.get_or_load_custom_func(&format!("ft_geglu_fwd_{}", T::SUFFIX), MODULE, ptx(dev))?;
                let mut b = f.builder();
                b.arg(&xs).arg(&out).arg(&n64).arg(&n32);
                unsafe { b.launch(elementwise(outputs)) }.w()?;
            }
            Some((g, lg)) => {
                let gs = view::<T>(OP, "gradient", g, lg)?;
                if gs.len() != outputs {
                    bail!("cuda {OP}: a gradient of {} elements for {outputs} outputs", gs.len())
                }
                let f = dev.get_or_load_custom_func(&format!("ft_geglu_bwd_{}", T::SUFFIX), MODULE, ptx(dev))?;
                let mut b = f.builder();
                b.arg(&xs).arg(&gs).arg(&out).arg(&n64).arg(&n32);
                unsafe { b.launch(elementwise(outputs)) }.w()?;
            }
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The relative-position gather of `c` `[bh, seq, rows]` into `[bh, seq, seq]` by `index`.
pub fn rel_gather(c: &CudaStorage, l: &Layout, index: &Tensor, bh: usize, seq: usize, rows: usize, transpose: bool) -> Result<CudaStorage> {
    by_dtype!("relative-gather", c.dtype(), rel_gather_t(c, l, index, bh, seq, rows, transpose))
}

fn rel_gather_t<T: Elem>(
    c: &CudaStorage,
    l: &Layout,
    index: &Tensor,
    bh: usize,
    seq: usize,
    rows: usize,
    transpose: bool,
) -> Result<CudaStorage> {
    const OP: &str = "relative-gather";
    let dev = c.device();
    let cs = view::<T>(OP, "products", c, l)?;
    let (istore, il) = index.storage_and_layout();
    let is = index_view(OP, &istore, il)?;
    let n = bh * seq * seq;
    let out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_rel_gather_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (n64, seq32, rows32, tr) = (n as u64, u32_of(OP, "seq", seq)?, u32_of(OP, "rows", rows)?, u32::from(transpose));
        let mut b = f.builder();
        b.arg(&cs).arg(&is).arg(&out).arg(&n64).arg(&seq32).arg(&rows32).arg(&tr);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The gradient `[bh, seq, rows]` of [`rel_gather`]'s input from the scores' gradient `g`:
/// summed in f32 by one thread per row, in order, then rounded to `g`'s dtype once.
pub fn rel_scatter(
    g: &CudaStorage,
    l: &Layout,
    index: &Tensor,
    bh: usize,
    seq: usize,
    rows: usize,
    transpose: bool,
) -> Result<CudaStorage> {
    by_dtype!("relative-scatter", g.dtype(), rel_scatter_t(g, l, index, bh, seq, rows, transpose))
}

fn rel_scatter_t<T: Elem>(
    g: &CudaStorage,
    l: &Layout,
    index: &Tensor,
    bh: usize,
    seq: usize,
    rows: usize,
    transpose: bool,
) -> Result<CudaStorage> {
    const OP: &str = "relative-scatter";
    let dev = g.device();
    let gs = view::<T>(OP, "gradient", g, l)?;
    let (istore, il) = index.storage_and_layout();
    let is = index_view(OP, &istore, il)?;
    let owners = bh * seq;
    let out = unsafe { dev.alloc::<f32>(owners * rows)? };
    if owners > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_rel_scatter_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (o64, seq32, rows32, tr) = (owners as u64, u32_of(OP, "seq", seq)?, u32_of(OP, "rows", rows)?, u32::from(transpose));
        let mut b = f.builder();
        b.arg(&gs).arg(&is).arg(&out).arg(&o64).arg(&seq32).arg(&rows32).arg(&tr);
        unsafe { b.launch(elementwise(owners)) }.w()?;
    }
    let sums = CudaStorage::wrap_cuda_slice(out, dev.clone());
    match T::DTYPE {
        DType::F32 => Ok(sums),
        dt => sums.to_dtype(&Layout::contiguous(Shape::from(owners * rows)), dt),
    }
}
