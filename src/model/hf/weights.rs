//! Reading a checkpoint's `model.safetensors`: its header checked against the file, and the
//! tensors a model keeps read one at a time straight into their own buffers, so loading holds
//! no second copy of the file (XLM-R base's 1.1 GB would otherwise double the load's peak).

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

// safetensors is little-endian; f32 data is read straight into f32 buffers.
#[cfg(target_endian = "big")]
compile_error!("reading safetensors assumes a little-endian machine");

/// The header's entry for each tensor (`dtype`, `shape`, `data_offsets`) and `__metadata__`.
pub type Header = HashMap<String, serde_json::Value>;

/// Reads the header and checks it against the file's size: every tensor lies inside the file.
pub fn check_header(path: &Path) -> anyhow::Result<Header> {
    Ok(open(path)?.1)
}

/// The open file, its header and where the tensor data begins.
fn open(path: &Path) -> anyhow::Result<(File, Header, u64)> {
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).context("file shorter than its header")?;
    let n = u64::from_le_bytes(len);
    ensure!(n <= 100 << 20 && 8 + n <= size, "header length {n} does not fit a {size}-byte file");
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: Header = serde_json::from_slice(&header).context("header")?;
    let data_len = size - 8 - n;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        match span(info) {
            Some((start, end)) if start <= end && end <= data_len => {}
            _ => bail!("tensor {name:?} lies outside the file (truncated?)"),
        }
    }
    Ok((f, header, 8 + n))
}

fn span(info: &serde_json::Value) -> Option<(u64, u64)> {
    let o = info.get("data_offsets")?;
    Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?))
}

/// The tensors of `path` whose names `keep` maps to a name, under that name, as f32 on `device`.
/// Where `keep` maps two file names to one name, the one `prefer` says wins.
pub fn read_f32(
    path: &Path,
    device: &Device,
    keep: impl Fn(&str) -> Option<String>,
    prefer: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let (mut f, header, data_start) = open(path)?;
    let mut chosen: HashMap<String, &str> = HashMap::new();
    for name in header.keys().filter(|k| *k != "__metadata__") {
        let Some(ours) = keep(name) else { continue };
        if !chosen.contains_key(&ours) || prefer(&ours, name) {
            chosen.insert(ours, name);
        }
    }
    let mut out = HashMap::with_capacity(chosen.len());
    for (ours, name) in chosen {
        // A tensor of a type we do not compute in (integer buffers, fp8) is left out: a model
        // that needs it is refused as missing that tensor, naming it.
        let Some(t) = read_one(&mut f, &header[name], data_start).with_context(|| format!("tensor {name:?}"))? else { continue };
        out.insert(ours, if device.is_cpu() { t } else { t.to_device(device)? });
    }
    Ok(out)
}

/// One tensor as f32 on the CPU (`None` for a type we do not read). f32 data is read into the
/// tensor's own buffer; other float types are read as bytes and converted.
fn read_one(f: &mut File, info: &serde_json::Value, data_start: u64) -> anyhow::Result<Option<Tensor>> {
    let (start, end) = span(info).context("no data_offsets")?;
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .context("no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).context("a dimension that is not a number"))
        .collect::<anyhow::Result<_>>()?;
    let dtype = match info.get("dtype").and_then(|d| d.as_str()).context("no dtype")? {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return Ok(None),
    };
    let elems = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).context("its shape overflows")?;
    let bytes = elems.checked_mul(dtype.size_in_bytes()).context("its shape overflows")?;
    ensure!(end - start == bytes as u64, "its data does not hold {shape:?} of {dtype:?}");
    f.seek(SeekFrom::Start(data_start + start))?;
    if dtype == DType::F32 {
        let mut v = vec![0f32; elems];
        f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
        // safetensors is little-endian, as are the machines we run on.
        return Ok(Some(Tensor::from_vec(v, shape, &Device::Cpu)?));
    }
    let mut raw = vec![0u8; bytes];
    f.read_exact(&mut raw)?;
    Ok(Some(Tensor::from_raw_buffer(&raw, dtype, &shape, &Device::Cpu)?.to_dtype(DType::F32)?))
}
