//! `fast doctor`: which libtorch this binary runs on, whether CUDA is usable, and what each
//! device delivers on the two operations a training step lives on (bf16 matmul, causal SDPA).
use anyhow::{bail, Context, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Devices to check: `auto` (every CUDA device, else the CPU), `cpu`, `cuda` (all), `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Square matmul size for the TFLOP/s figure (smaller on the CPU).
    #[arg(long)]
    pub matmul_size: Option<i64>,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    let (version, dir) = libtorch_location();
    println!("libtorch      {version} ({dir})");
    println!("tch           0.24.0");
    let n = tch::Cuda::device_count();
    let cuda = tch::Cuda::is_available();
    if cuda {
        println!(
            "CUDA          available: {n} device(s), cuDNN {}",
            tch::utils::version_cudnn()
        );
    } else {
        println!("CUDA          not available: this libtorch sees no CUDA device; training runs on the CPU.");
    }

    let devices: Vec<Device> = match args.device.as_str() {
        "auto" if cuda => (0..n as usize).map(Device::Cuda).collect(),
        "auto" | "cpu" => vec![Device::Cpu],
        "cuda" => {
            if !cuda {
                bail!("--device cuda was requested, but CUDA is not available to this libtorch (no driver or no GPU); use --device cpu");
            }
            (0..n as usize).map(Device::Cuda).collect()
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) if cuda && (i as i64) < n => vec![Device::Cuda(i)],
            Some(Ok(i)) => bail!(
                "--device {other} was requested, but CUDA sees {n} device(s); cuda:{i} is unusable"
            ),
            _ => bail!("--device {other:?} is not one of auto, cpu, cuda, cuda:N"),
        },
    };

    for device in devices {
        check_device(device, args.matmul_size)
            .with_context(|| format!("device {device:?} failed its check"))?;
    }
    Ok(())
}

fn check_device(device: Device, matmul_size: Option<i64>) -> Result<()> {
    match device {
        Device::Cuda(i) => {
            let p = cuda_driver::properties(i)?;
            let bf16 = p.major >= 8;
            println!(
                "cuda:{i}        {}, {:.1} GiB, compute capability {}.{}, bf16 {}",
                p.name,
                p.total_mem as f64 / (1u64 << 30) as f64,
                p.major,
                p.minor,
                if bf16 {
                    "supported"
                } else {
                    "NOT supported (needs compute capability >= 8.0)"
                }
            );
        }
        _ => println!("cpu           {} threads", tch::get_num_threads()),
    }
    let (kind, n) = match device {
        Device::Cuda(_) => (Kind::BFloat16, matmul_size.unwrap_or(8192)),
        _ => (Kind::Float, matmul_size.unwrap_or(1024)),
    };
    let (secs, flops) = matmul_rate(device, kind, n);
    let rate = flop_rate(flops);
    println!(
        "  matmul      {n}x{n} {kind:?}: {:.3} ms, {rate}",
        secs * 1e3
    );

    // The 26M model's attention shape: batch 32, 8 heads, seq 340, head_dim 64.
    let (bsz, h, t, hd) = match device {
        Device::Cuda(_) => (32i64, 8i64, 340i64, 64i64),
        _ => (4, 8, 340, 64),
    };
    let q = Tensor::randn([bsz, h, t, hd], (kind, device));
    let k = Tensor::randn([bsz, h, t, hd], (kind, device));
    let v = Tensor::randn([bsz, h, t, hd], (kind, device));
    let secs = time_op(device, || {
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
    });
    // Causal: half of the two [T,T] products is computed.
    let flops = 2.0 * 2.0 * (bsz * h * t * t * hd) as f64 / 2.0;
    println!(
        "  causal SDPA [{bsz},{h},{t},{hd}] {kind:?}: {:.3} ms, {}",
        secs * 1e3,
        flop_rate(flops / secs)
    );
    Ok(())
}

/// Median seconds of one `[n, n] x [n, n]` matmul of `kind` on `device` (random operands: zeros
/// run faster), and the FLOP/s that gives. `fast bench` measures its ceiling with this.
pub fn matmul_rate(device: Device, kind: Kind, n: i64) -> (f64, f64) {
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let secs = time_op(device, || {
        let _ = a.matmul(&b);
    });
    (secs, 2.0 * (n as f64).powi(3) / secs)
}

fn flop_rate(flops_per_s: f64) -> String {
    if flops_per_s >= 1e12 {
        format!("{:.1} TFLOP/s", flops_per_s / 1e12)
    } else {
        format!("{:.1} GFLOP/s", flops_per_s / 1e9)
    }
}

/// Median seconds of `f` over a few runs after a warm-up, synchronising the device around each.
fn time_op(device: Device, mut f: impl FnMut()) -> f64 {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..3 {
        f();
    }
    sync();
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let t0 = Instant::now();
            f();
            sync();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The libtorch version and folder this process actually loaded (read from the mapped library).
fn libtorch_location() -> (String, String) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"));
    let Some(lib) = lib else {
        return (
            "unknown".into(),
            "libtorch_cpu.so not found in /proc/self/maps".into(),
        );
    };
    let dir = std::path::Path::new(lib).parent().and_then(|p| p.parent());
    let version = dir
        .and_then(|d| std::fs::read_to_string(d.join("version.py")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("__version__"))
                .and_then(|l| l.split('\'').nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into());
    (
        version,
        dir.map(|d| d.display().to_string()).unwrap_or_default(),
    )
}

/// Device facts from the CUDA driver API (stable across CUDA versions, unlike cudaDeviceProp).
pub(crate) mod cuda_driver {
    use anyhow::{bail, Context, Result};
    use std::ffi::{c_char, c_int, c_uint, CStr};

    pub struct Properties {
        pub name: String,
        pub total_mem: usize,
        pub major: i32,
        pub minor: i32,
    }

    const CC_MAJOR: c_int = 75;
    const CC_MINOR: c_int = 76;

    pub fn properties(ordinal: usize) -> Result<Properties> {
        // libcuda.so.1 is already loaded by libtorch when CUDA is available.
        let lib = unsafe { libloading::Library::new("libcuda.so.1") }
            .context("cannot load the CUDA driver libcuda.so.1")?;
        unsafe {
            let init: libloading::Symbol<unsafe extern "C" fn(c_uint) -> c_int> =
                lib.get(b"cuInit")?;
            let get: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> c_int> =
                lib.get(b"cuDeviceGet")?;
            let name: libloading::Symbol<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int> =
                lib.get(b"cuDeviceGetName")?;
            let mem: libloading::Symbol<unsafe extern "C" fn(*mut usize, c_int) -> c_int> =
                lib.get(b"cuDeviceTotalMem_v2")?;
            let attr: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int> =
                lib.get(b"cuDeviceGetAttribute")?;
            let check = |rc: c_int, what: &str| -> Result<()> {
                if rc != 0 {
                    bail!("CUDA driver call {what} failed with error {rc}");
                }
                Ok(())
            };
            check(init(0), "cuInit")?;
            let mut dev: c_int = 0;
            check(get(&mut dev, ordinal as c_int), "cuDeviceGet")?;
            let mut buf = [0 as c_char; 256];
            check(name(buf.as_mut_ptr(), 256, dev), "cuDeviceGetName")?;
            let mut total = 0usize;
            check(mem(&mut total, dev), "cuDeviceTotalMem")?;
            let (mut major, mut minor) = (0, 0);
            check(attr(&mut major, CC_MAJOR, dev), "cuDeviceGetAttribute")?;
            check(attr(&mut minor, CC_MINOR, dev), "cuDeviceGetAttribute")?;
            Ok(Properties {
                name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                total_mem: total,
                major,
                minor,
            })
        }
    }
}
