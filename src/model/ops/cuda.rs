//! The CUDA side of [`super::device_ops`]: launches the kernels of `kernels/finetuned.cu`
//! (compiled to PTX by `build.rs`) on candle's CUDA storage. Inputs must be contiguous (any start
//! offset); results are new storage in the input's dtype (f32, bf16 or f16), except the
//! optimizer's, which update f32 storage in place.
//!
//! Launches: elementwise kernels use 256-thread blocks over a grid-stride loop; row kernels
//! (layer norm, masked softmax) give each row one warp, 8 rows to a 256-thread block.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{self, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetuned.ptx"));
const PTX_90: &str = include_str!(concat!(env!("OUT_DIR"), "/finetuned_90.ptx"));
pub(super) const MODULE: &str = "finetuned";
pub(super) const THREADS: u32 = 256;
const ROWS_PER_BLOCK: u32 = THREADS / 32;

/// A storage type the kernels exist for, with the suffix of their names.
pub(super) trait Elem: DeviceRepr + CudaDType + WithDType {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Elem for f16 {
    const SUFFIX: &'static str = "f16";
}

/// Calls `$f::<T>(args)` with `T` the Rust type of `$dtype`.
macro_rules! by_dtype {
    ($op:literal, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            dt => bail!("cuda {}: f32, bf16 or f16 input expected, got {dt:?}", $op),
        }
    };
}
pub(super) use by_dtype;

/// This crate's PTX for `dev`. A device loads the module once (by name), on first use.
pub(super) fn ptx(dev: &CudaDevice) -> &'static str {
    // compute_90 PTX does not load below Hopper; compute_80's runs everywhere from Ampere on.
    match dev.cuda_stream().context().compute_capability() {
        Ok((major, _)) if major >= 9 => PTX_90,
        _ => PTX,
    }
}

/// The contiguous elements of `s` under `l`, which must be of type `T`.
pub(super) fn view<'a, T: Elem>(op: &str, what: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    if s.dtype() != T::DTYPE {
        bail!("cuda {op}: {what} is {:?}, expected {:?}", s.dtype(), T::DTYPE)
    }
    let Some((a, b)) = l.contiguous_offsets() else { bail!("cuda {op}: {what} must be contiguous") };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

pub(super) fn elementwise(n: usize) -> LaunchConfig {
    // More blocks than this only add scheduling; the grid-stride loop covers the rest.
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn per_row(rows: usize) -> Result<LaunchConfig> {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK as usize);
    if blocks > i32::MAX as usize {
        bail!("cuda row kernel: {rows} rows are too many for one launch")
    }
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, ROWS_PER_BLOCK, 1), shared_mem_bytes: 0 })
}

fn row_len(op: &str, len: usize) -> Result<u32> {
    match u32::try_from(len) {
        Ok(len) if len > 0 => Ok(len),
        _ => bail!("cuda {op}: row length {len} out of range"),
    }
}

/// Inverted dropout: `x·scale` where `rng::bits(seed, i) < keep_below`, else 0.
pub fn dropout(x: &CudaStorage, l: &Layout, keep_below: u32, scale: f32, seed: u64) -> Result<CudaStorage> {
    by_dtype!("dropout", x.dtype(), dropout_t(x, l, keep_below, scale, seed))
}

fn dropout_t<T: Elem>(x: &CudaStorage, l: &Layout, keep_below: u32, scale: f32, seed: u64) -> Result<CudaStorage> {
    let dev = x.device();
    let xs = view::<T>("dropout", "input", x, l)?;
    let n = xs.len();
    let out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_dropout_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&xs).arg(&out).arg(&n64).arg(&keep_below).arg(&scale).arg(&seed);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// LayerNorm over the last dimension with weight `w` and bias `b` (`[hidden]`, `x`'s dtype).
pub fn layer_norm_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    by_dtype!("layer-norm", x.dtype(), layer_norm_t(false, x, lx, w, lw, b, lb, eps))
}

/// LayerNorm's backward pass from `x`, `w` and the output's gradient `g`: `[2·rows, hidden]`,
/// the input's gradient then `g·x̂`.
pub fn layer_norm_bwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    by_dtype!("layer-norm-grad", x.dtype(), layer_norm_t(true, x, lx, w, lw, g, lg, eps))
}

/// Forward (`third` is the bias) or backward (`third` is the output's gradient) LayerNorm.
#[allow(clippy::too_many_arguments)]
fn layer_norm_t<T: Elem>(
    bwd: bool,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    third: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    let (op, what) = if bwd { ("layer-norm-grad", "gradient") } else { ("layer-norm", "bias") };
    let dev = x.device();
    let xs = view::<T>(op, "input", x, lx)?;
    let ws = view::<T>(op, "weight", w, lw)?;
    let ts = view::<T>(op, what, third, l3)?;
    let h = ws.len();
    let want = if bwd { xs.len() } else { h };
    if h == 0 || xs.len() % h != 0 || ts.len() != want {
        bail!("cuda {op}: input of {} elements, weight of {h}, {what} of {}", xs.len(), ts.len())
    }
    let rows = xs.len() / h;
    let out = unsafe { dev.alloc::<T>(if bwd { 2 * xs.len() } else { xs.len() })? };
    if rows > 0 {
        let dir = if bwd { "bwd" } else { "fwd" };
        let f = dev.get_or_load_custom_func(&format!("ft_layer_norm_{dir}_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (rows64, h32) = (rows as u64, row_len(op, h)?);
        let mut b = f.builder();
        b.arg(&xs).arg(&ws).arg(&ts).arg(&out).arg(&rows64).arg(&h32).arg(&eps);
        unsafe { b.launch(per_row(rows)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Exact (erf) GELU of `x + bias`, the bias (`x`'s dtype) repeating over the last dimension.
pub fn bias_gelu_fwd(x: &CudaStorage, l: &Layout, bias: Option<(&CudaStorage, &Layout)>) -> Result<CudaStorage> {
    by_dtype!("bias-gelu", x.dtype(), bias_gelu_t(x, l, bias, None))
}

/// The gradient of [`bias_gelu_fwd`] with respect to `x`: `g · gelu'(x + bias)`.
pub fn bias_gelu_bwd(
    x: &CudaStorage,
    lx: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<CudaStorage> {
    by_dtype!("bias-gelu-grad", x.dtype(), bias_gelu_t(x, lx, bias, Some((g, lg))))
}

fn bias_gelu_t<T: Elem>(
    x: &CudaStorage,
    lx: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    grad: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let op = if grad.is_some() { "bias-gelu-grad" } else { "bias-gelu" };
    let dev = x.device();
    let xs = view::<T>(op, "input", x, lx)?;
    let n = xs.len();
    let bs = bias.map(|(s, l)| view::<T>(op, "bias", s, l)).transpose()?;
    let nb = bs.as_ref().map_or(0, |b| b.len());
    if bs.is_some() && (nb == 0 || n % nb != 0) {
        bail!("cuda {op}: a bias of {nb} elements does not divide an input of {n}")
    }
    let gs = grad.map(|(s, l)| view::<T>(op, "gradient", s, l)).transpose()?;
    if let Some(gs) = &gs {
        if gs.len() != n {
            bail!("cuda {op}: gradient of {} elements for an input of {n}", gs.len())
        }
    }
    let out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let dir = if gs.is_some() { "bwd" } else { "fwd" };
        let f = dev.get_or_load_custom_func(&format!("ft_bias_gelu_{dir}_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (n64, nb64, null) = (n as u64, nb as u64, 0u64);
        let mut b = f.builder();
        b.arg(&xs);
        // A null pointer tells the kernel there is no bias.
        match &bs {
            Some(bs) => b.arg(bs),
            None => b.arg(&null),
        };
        b.arg(&nb64);
        if let Some(gs) = &gs {
            b.arg(gs);
        }
        b.arg(&out).arg(&n64);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Dropout as the kernels take it: (on, keep_below, scale, seed).
fn drop_args(dropout: Option<(u32, f32, u64)>) -> (u32, u32, f32, u64) {
    dropout.map_or((0, 0, 1.0, 0), |(keep_below, scale, seed)| (1, keep_below, scale, seed))
}

/// `softmax_j(scale·s_ij + bias_j)` over scores `[batch, heads, seq, seq]` with an f32 key bias
/// `[batch, seq]` (over the keys within `window` of the query, where one is given), then, with
/// `dropout = (keep_below, scale, seed)`, inverted dropout with the bits of element `row·seq + j`.
pub fn masked_softmax_fwd(
    s: &CudaStorage,
    ls: &Layout,
    bias: &CudaStorage,
    lb: &Layout,
    scale: f32,
    dropout: Option<(u32, f32, u64)>,
    window: Option<usize>,
) -> Result<CudaStorage> {
    by_dtype!("masked-softmax", s.dtype(), masked_softmax_t(s, ls, bias, lb, scale, dropout, window))
}

fn masked_softmax_t<T: Elem>(
    s: &CudaStorage,
    ls: &Layout,
    bias: &CudaStorage,
    lb: &Layout,
    scale: f32,
    dropout: Option<(u32, f32, u64)>,
    window: Option<usize>,
) -> Result<CudaStorage> {
    const OP: &str = "masked-softmax";
    let dev = s.device();
    let (batch, heads, seq, keys) = ls.shape().dims4()?;
    if seq != keys {
        bail!("cuda {OP}: square scores [batch, heads, seq, seq] expected, got {:?}", ls.shape())
    }
    let ss = view::<T>(OP, "scores", s, ls)?;
    let bs = view::<f32>(OP, "key bias", bias, lb)?;
    if bs.len() != batch * seq {
        bail!("cuda {OP}: key bias of {} elements for batch {batch} and seq {seq}", bs.len())
    }
    let rows = batch * heads * seq;
    let out = unsafe { dev.alloc::<T>(ss.len())? };
    if rows > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_masked_softmax_fwd_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (rows64, seq32) = (rows as u64, row_len(OP, seq)?);
        let heads32 = u32::try_from(heads).map_err(|_| candle_core::Error::Msg(format!("cuda {OP}: {heads} heads")))?;
        let (on, keep_below, drop_scale, seed) = drop_args(dropout);
        let mut b = f.builder();
        // u32::MAX: no window (every key is within it).
        let window32 = window.map_or(u32::MAX, |w| u32::try_from(w).unwrap_or(u32::MAX));
        b.arg(&ss).arg(&bs).arg(&out).arg(&rows64).arg(&seq32).arg(&heads32).arg(&scale);
        b.arg(&on).arg(&keep_below).arg(&drop_scale).arg(&seed).arg(&window32);
        unsafe { b.launch(per_row(rows)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The scores' gradient from the probabilities before dropout `p` and the output's gradient
/// `g` (rows over the last dimension): `scale · p ⊙ (g' − Σ_k p_k g'_k)`, `g'` being `g` under
/// the same dropout as the forward pass.
pub fn masked_softmax_bwd(
    p: &CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    scale: f32,
    dropout: Option<(u32, f32, u64)>,
) -> Result<CudaStorage> {
    by_dtype!("masked-softmax-grad", p.dtype(), masked_softmax_grad_t(p, lp, g, lg, scale, dropout))
}

fn masked_softmax_grad_t<T: Elem>(
    p: &CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    scale: f32,
    dropout: Option<(u32, f32, u64)>,
) -> Result<CudaStorage> {
    const OP: &str = "masked-softmax-grad";
    let dev = p.device();
    let ps = view::<T>(OP, "probabilities", p, lp)?;
    let gs = view::<T>(OP, "gradient", g, lg)?;
    let seq = lp.shape().dims().last().copied().unwrap_or(1);
    if gs.len() != ps.len() || seq == 0 || ps.len() % seq != 0 {
        bail!("cuda {OP}: probabilities {:?} and a gradient of {} elements", lp.shape(), gs.len())
    }
    let rows = ps.len() / seq;
    let out = unsafe { dev.alloc::<T>(ps.len())? };
    if rows > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_masked_softmax_bwd_{}", T::SUFFIX), MODULE, ptx(dev))?;
        let (rows64, seq32) = (rows as u64, row_len(OP, seq)?);
        let (on, keep_below, drop_scale, seed) = drop_args(dropout);
        let mut b = f.builder();
        b.arg(&ps).arg(&gs).arg(&out).arg(&rows64).arg(&seq32).arg(&scale);
        b.arg(&on).arg(&keep_below).arg(&drop_scale).arg(&seed);
        unsafe { b.launch(per_row(rows)?) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// AdamW's moments, in place on f32 `[2, n]` (m then v), from the gradient `g` (`[n]`, f32, bf16
/// or f16) times `grad_scale`.
pub fn adamw_moments(
    mv: &mut CudaStorage,
    lmv: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
) -> Result<()> {
    by_dtype!("adamw-moments", g.dtype(), adamw_moments_t(mv, lmv, g, lg, grad_scale, beta1, beta2))
}

fn adamw_moments_t<T: Elem>(
    mv: &mut CudaStorage,
    lmv: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
) -> Result<()> {
    const OP: &str = "adamw-moments";
    let dev = mv.device().clone();
    let gs = view::<T>(OP, "gradient", g, lg)?;
    let mut mvs = view_mut(OP, "moments", mv, lmv)?;
    let n = gs.len();
    if mvs.len() != 2 * n {
        bail!("cuda {OP}: moments of {} elements for a gradient of {n}", mvs.len())
    }
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("ft_adamw_moments_{}", T::SUFFIX), MODULE, ptx(&dev))?;
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&mut mvs).arg(&gs).arg(&n64).arg(&grad_scale).arg(&beta1).arg(&beta2);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(())
}

/// AdamW's step, in place on an f32 parameter `[n]`, from its f32 moments `[2, n]`:
/// `p·(1 − lr·decay) − lr/bc1 · m / (sqrt(v/bc2) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_apply(
    p: &mut CudaStorage,
    lp: &Layout,
    mv: &CudaStorage,
    lmv: &Layout,
    lr: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
) -> Result<()> {
    const OP: &str = "adamw-apply";
    let dev = p.device().clone();
    let mvs = view::<f32>(OP, "moments", mv, lmv)?;
    let mut ps = view_mut(OP, "parameter", p, lp)?;
    let n = ps.len();
    if mvs.len() != 2 * n {
        bail!("cuda {OP}: moments of {} elements for a parameter of {n}", mvs.len())
    }
    if n > 0 {
        let f = dev.get_or_load_custom_func("ft_adamw_apply", MODULE, ptx(&dev))?;
        // The same f32 expressions as the CPU reference, so that both round alike.
        let (shrink, step) = (1.0 - lr * decay, lr / bc1);
        let n64 = n as u64;
        let mut b = f.builder();
        b.arg(&mut ps).arg(&mvs).arg(&n64).arg(&shrink).arg(&step).arg(&bc2).arg(&eps);
        unsafe { b.launch(elementwise(n)) }.w()?;
    }
    Ok(())
}

/// The contiguous f32 elements of `s` under `l`, writable.
fn view_mut<'a>(op: &str, what: &str, s: &'a mut CudaStorage, l: &Layout) -> Result<driver::CudaViewMut<'a, f32>> {
    if s.dtype() != DType::F32 {
        bail!("cuda {op}: {what} is {:?}, expected F32", s.dtype())
    }
    let Some((a, b)) = l.contiguous_offsets() else { bail!("cuda {op}: {what} must be contiguous") };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// Device memory in use now (total − free, MiB) on the current context, for the peak-memory report.
///
/// The context current on this thread (the one that ran candle's kernels), else GPU 0's primary
/// context, which candle's device 0 holds; `None` when the driver cannot say.
pub fn memory_used_mib() -> Option<u64> {
    let has_current = driver::result::ctx::get_current().ok().flatten().is_some();
    let (free, total) =
        if has_current { driver::result::mem_get_info().ok()? } else { driver::CudaContext::new(0).ok()?.mem_get_info().ok()? };
    Some((total.saturating_sub(free) >> 20) as u64)
}
