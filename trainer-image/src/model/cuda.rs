//! Launches of the trainer's own CUDA kernels (`trainer-image/kernels/*.cu`, compiled to
//! PTX by `build.rs`) for the custom ops of [`super::causal`] and [`super::ops`]. Every
//! kernel runs one block per row of a contiguous `[rows, width]` tensor.

#![allow(unsafe_code)]

use candle_core::{
    CudaDevice, CudaStorage, DType, Layout, Result,
    backend::BackendStorage,
    cuda_backend::{
        CudaDType, WrapErr,
        cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg},
    },
};

const CAUSAL_SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/causal_softmax.ptx"));
const CROSS_ENTROPY: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The contiguous elements of `(s, l)` as a typed view.
fn view<'a, T: CudaDType>(kernel: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{kernel}: expected contiguous inputs");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// One block per row of `width`, four columns per thread, whole warps, at most 1024.
fn config(kernel: &str, rows: usize, width: usize) -> Result<(LaunchConfig, i32)> {
    let grid = u32::try_from(rows).map_err(|_| err(format!("{kernel}: {rows} rows")))?;
    let w = i32::try_from(width).map_err(|_| err(format!("{kernel}: width {width}")))?;
    let threads = width.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, w))
}

fn suffix(kernel: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{kernel}: f32 or bf16 on a GPU, not {other:?}"),
    }
}

/// `causal_softmax_{fwd,bwd}`: inputs (`x`, or `y` and `g`) of one dtype and shape
/// `[.., t]`; the output has the same.
pub(super) fn causal_softmax(
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    t: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let Some(&(first, l)) = inputs.first() else {
        candle_core::bail!("{kernel}: no input");
    };
    let dtype = first.dtype();
    let n = l.shape().elem_count();
    if inputs
        .iter()
        .any(|(s, l)| s.dtype() != dtype || l.shape().elem_count() != n)
    {
        candle_core::bail!("{kernel}: inputs of different dtypes or sizes");
    }
    fn typed<T: CudaDType + DeviceRepr>(
        kernel: &str,
        suffix: &str,
        inputs: &[(&CudaStorage, &Layout)],
        n: usize,
        t: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let dev: CudaDevice = inputs[0].0.device().clone();
        let views = inputs
            .iter()
            .map(|(s, l)| view::<T>(kernel, s, l))
            .collect::<Result<Vec<_>>>()?;
        let (cfg, t) = config(kernel, n / t, t)?;
        let func = dev.get_or_load_custom_func(
            &format!("{kernel}_{suffix}"),
            "taper_causal_softmax",
            CAUSAL_SOFTMAX,
        )?;
        // SAFETY: the kernel writes every element of `out` before anything reads it.
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut builder = func.builder();
        for v in &views {
            builder.arg(v);
        }
        builder.arg(&out);
        builder.arg(&t);
        builder.arg(&scale);
        // SAFETY: the arguments match the kernel's signature (input pointers, the output
        // pointer, int t, float scale), and every pointer covers rows × t elements.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    let sfx = suffix(kernel, dtype)?;
    match dtype {
        DType::F32 => typed::<f32>(kernel, sfx, inputs, n, t, scale),
        _ => typed::<half::bf16>(kernel, sfx, inputs, n, t, scale),
    }
}

/// `cross_entropy_fwd`: logits `[rows, v]` (f32 or bf16), targets `[rows]` (u32), weights
/// `[rows]` (f32) → `[2, rows]` f32: each row's weighted loss, then its log-sum-exp.
pub(super) fn cross_entropy_fwd(
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    weights: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const K: &str = "cross_entropy_fwd";
    let (rows, v) = x.1.shape().dims2()?;
    let dev: CudaDevice = x.0.device().clone();
    let tv = view::<u32>(K, targets.0, targets.1)?;
    let wv = view::<f32>(K, weights.0, weights.1)?;
    if tv.len() != rows || wv.len() != rows {
        candle_core::bail!(
            "{K}: {rows} rows of logits, {} targets, {} weights",
            tv.len(),
            wv.len()
        );
    }
    let sfx = suffix(K, x.0.dtype())?;
    let func =
        dev.get_or_load_custom_func(&format!("{K}_{sfx}"), "taper_cross_entropy", CROSS_ENTROPY)?;
    let (cfg, v) = config(K, rows, v)?;
    // SAFETY: the kernel writes every element of `out` (rows losses, rows lse).
    let out = unsafe { dev.alloc::<f32>(2 * rows)? };
    let loss = out.slice(..rows);
    let lse = out.slice(rows..);
    let mut builder = func.builder();
    let xs32;
    let xs16;
    if sfx == "f32" {
        xs32 = view::<f32>(K, x.0, x.1)?;
        builder.arg(&xs32);
    } else {
        xs16 = view::<half::bf16>(K, x.0, x.1)?;
        builder.arg(&xs16);
    }
    builder.arg(&tv);
    builder.arg(&wv);
    builder.arg(&loss);
    builder.arg(&lse);
    builder.arg(&v);
    // SAFETY: the arguments match the kernel's signature (logits, targets, weights, loss,
    // lse pointers, int v); the logits cover rows × v elements and the others rows.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `cross_entropy_bwd`: logits `[rows, v]`, targets `[rows]` (u32), `[2, rows]` f32 (each
/// row's log-sum-exp, then its coefficient: weight × the loss's gradient) → the logits'
/// gradient, in their dtype.
pub(super) fn cross_entropy_bwd(
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    lse_coef: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    const K: &str = "cross_entropy_bwd";
    let (rows, v) = x.1.shape().dims2()?;
    let dev: CudaDevice = x.0.device().clone();
    let tv = view::<u32>(K, targets.0, targets.1)?;
    let lc = view::<f32>(K, lse_coef.0, lse_coef.1)?;
    if tv.len() != rows || lc.len() != 2 * rows {
        candle_core::bail!(
            "{K}: {rows} rows of logits, {} targets, {} lse and coefficients",
            tv.len(),
            lc.len()
        );
    }
    let (lse, coef) = (lc.slice(..rows), lc.slice(rows..));
    let sfx = suffix(K, x.0.dtype())?;
    let (cfg, vi) = config(K, rows, v)?;
    fn go<T: CudaDType + DeviceRepr>(
        sfx: &str,
        dev: &CudaDevice,
        x: (&CudaStorage, &Layout),
        rest: (&CudaView<'_, f32>, &CudaView<'_, u32>, &CudaView<'_, f32>),
        cfg: LaunchConfig,
        n: usize,
        v: i32,
    ) -> Result<CudaStorage> {
        let func = dev.get_or_load_custom_func(
            &format!("cross_entropy_bwd_{sfx}"),
            "taper_cross_entropy",
            CROSS_ENTROPY,
        )?;
        let xv = view::<T>("cross_entropy_bwd", x.0, x.1)?;
        // SAFETY: the kernel writes every element of `out` (rows × v).
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut builder = func.builder();
        builder.arg(&xv);
        builder.arg(rest.0);
        builder.arg(rest.1);
        builder.arg(rest.2);
        builder.arg(&out);
        builder.arg(&v);
        // SAFETY: the arguments match the kernel's signature (logits, lse, targets,
        // coefficients, gradient pointers, int v), each covering its rows.
        unsafe { builder.launch(cfg) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let n = rows * v;
    match sfx {
        "f32" => go::<f32>(sfx, &dev, x, (&lse, &tv, &coef), cfg, n, vi),
        _ => go::<half::bf16>(sfx, &dev, x, (&lse, &tv, &coef), cfg, n, vi),
    }
}

const LAYER_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));

/// Rows summed by one block of `layer_norm_bwd_partial` (`LN_CHUNK` in the kernel).
const LN_CHUNK: usize = 256;

/// The operands of a LayerNorm kernel: `x` `[rows, c]`, the weight `[c]` and a third
/// (the bias `[c]`, or the gradient `[rows, c]`), all f32 and contiguous.
struct LayerNormArgs<'a> {
    x: CudaView<'a, f32>,
    w: CudaView<'a, f32>,
    third: CudaView<'a, f32>,
    rows: usize,
    c: i32,
}

fn layer_norm_args<'a>(
    k: &str,
    x: (&'a CudaStorage, &Layout),
    w: (&'a CudaStorage, &Layout),
    third: (&'a CudaStorage, &Layout),
) -> Result<LayerNormArgs<'a>> {
    if [x.0, w.0, third.0].iter().any(|s| s.dtype() != DType::F32) {
        candle_core::bail!("{k}: f32 operands on a GPU");
    }
    let c = w.1.shape().elem_count();
    let n = x.1.shape().elem_count();
    if c == 0 || !n.is_multiple_of(c) {
        candle_core::bail!("{k}: input {:?} with {c} columns", x.1.dims());
    }
    Ok(LayerNormArgs {
        x: view(k, x.0, x.1)?,
        w: view(k, w.0, w.1)?,
        third: view(k, third.0, third.1)?,
        rows: n / c,
        c: i32::try_from(c).map_err(|_| err(format!("{k}: width {c}")))?,
    })
}

/// `layer_norm_fwd`: `x` `[rows, c]`, weight and bias `[c]` → `y` `[rows, c]`, f32.
pub(super) fn layer_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    const K: &str = "layer_norm_fwd";
    let dev: CudaDevice = x.0.device().clone();
    let LayerNormArgs {
        x: xv,
        w: wv,
        third: bv,
        rows,
        c,
    } = layer_norm_args(K, x, w, b)?;
    if bv.len() != wv.len() {
        candle_core::bail!("{K}: weight of {}, bias of {}", wv.len(), bv.len());
    }
    let func = dev.get_or_load_custom_func(&format!("{K}_f32"), "taper_layer_norm", LAYER_NORM)?;
    let (cfg, c) = config(K, rows, c as usize)?;
    // SAFETY: the kernel writes every element of `y`.
    let y = unsafe { dev.alloc::<f32>(xv.len())? };
    let mut builder = func.builder();
    builder.arg(&xv);
    builder.arg(&wv);
    builder.arg(&bv);
    builder.arg(&y);
    builder.arg(&c);
    builder.arg(&eps);
    // SAFETY: the arguments match the kernel's signature (x, w, b, y pointers, int c, float
    // eps); x and y cover rows × c elements, w and b c.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// `layer_norm_bwd`: `x` `[rows, c]`, weight `[c]`, gradient `g` `[rows, c]` → `[dx, dw,
/// db]` packed in one f32 buffer of `rows·c + 2c`, as the CPU op packs them. Three
/// kernels: `dx` (one block per row, which also keeps each row's mean and rstd), partial
/// sums of `dw` and `db` over chunks of rows, and their sum in chunk order.
pub(super) fn layer_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<CudaStorage> {
    const K: &str = "layer_norm_bwd";
    let dev: CudaDevice = x.0.device().clone();
    let LayerNormArgs {
        x: xv,
        w: wv,
        third: gv,
        rows,
        c: ci,
    } = layer_norm_args(K, x, w, g)?;
    if gv.len() != xv.len() {
        candle_core::bail!("{K}: input of {}, gradient of {}", xv.len(), gv.len());
    }
    let (n, c) = (xv.len(), wv.len());
    let rows_i = i32::try_from(rows).map_err(|_| err(format!("{K}: {rows} rows")))?;
    let chunks = rows.div_ceil(LN_CHUNK);
    let load = |name: &str| {
        dev.get_or_load_custom_func(&format!("{name}_f32"), "taper_layer_norm", LAYER_NORM)
    };
    // SAFETY: dx (out[..n]) is written by the first kernel, dw and db (out[n..]) by the
    // last; stats and partial in full by the kernels before their readers.
    let out = unsafe { dev.alloc::<f32>(n + 2 * c)? };
    let stats = unsafe { dev.alloc::<f32>(2 * rows)? };
    let partial = unsafe { dev.alloc::<f32>(chunks * 2 * c)? };
    let (dx, dwdb) = (out.slice(..n), out.slice(n..));

    let (cfg, _) = config(K, rows, c)?;
    let func = load("layer_norm_bwd_dx")?;
    let mut builder = func.builder();
    builder.arg(&xv);
    builder.arg(&wv);
    builder.arg(&gv);
    builder.arg(&dx);
    builder.arg(&stats);
    builder.arg(&rows_i);
    builder.arg(&ci);
    builder.arg(&eps);
    // SAFETY: (x, w, g, dx, stats pointers, int rows, int c, float eps) as the kernel
    // takes them; x, g and dx cover rows × c, w c, stats 2 × rows.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);

    let grid_x = u32::try_from(c.div_ceil(32)).map_err(|_| err(format!("{K}: width {c}")))?;
    let grid_y = u32::try_from(chunks).map_err(|_| err(format!("{K}: {rows} rows")))?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x, grid_y, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let func = load("layer_norm_bwd_partial")?;
    let mut builder = func.builder();
    builder.arg(&xv);
    builder.arg(&gv);
    builder.arg(&stats);
    builder.arg(&partial);
    builder.arg(&rows_i);
    builder.arg(&ci);
    // SAFETY: (x, g, stats, partial pointers, int rows, int c); partial covers chunks ×
    // 2c, one chunk per blockIdx.y.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);

    let c2 = i32::try_from(2 * c).map_err(|_| err(format!("{K}: width {c}")))?;
    let chunks_i = i32::try_from(chunks).map_err(|_| err(format!("{K}: {rows} rows")))?;
    let cfg = LaunchConfig {
        grid_dim: ((2 * c).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = load("layer_norm_bwd_sum")?;
    let mut builder = func.builder();
    builder.arg(&partial);
    builder.arg(&dwdb);
    builder.arg(&chunks_i);
    builder.arg(&c2);
    // SAFETY: (partial, out pointers, int chunks, int 2c); dwdb holds 2c elements.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
