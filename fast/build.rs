include!("link_libtorch.rs");

fn main() {
    link_libtorch();
    build_ops();
    build_nccl();
    build_cuda_graph();
    build_fused_kernels();
}

/// fast/csrc/ops.cpp: libtorch's foreach and fused-optimizer ops that tch does not expose, and
/// MoE's autograd nodes on libtorch's ops (grouped_experts.h, shared with fused_ops.cpp);
/// fast/csrc/profiler.cpp: libtorch's Kineto profiler for `fast bench --profile`.
/// Needs only libtorch's own headers (no CUDA headers), so it builds on every machine.
fn build_ops() {
    let Some(lib) = libtorch_lib_dir() else {
        return;
    };
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    println!("cargo:rerun-if-changed=csrc/ops.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/ffi_error.h");
    println!("cargo:rerun-if-changed=csrc/grouped_experts.h");
    cc::Build::new()
        .cpp(true)
        .file("csrc/ops.cpp")
        .file("csrc/profiler.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("mm_ops");
}

/// fast/csrc/c10d_shim.cpp: PyTorch's own c10d (TCPStore + ProcessGroupNCCL) for data parallelism.
/// Only with `--features nccl`: it needs the CUDA and NCCL headers that
/// `pip install "cuda-toolkit[cccl,nvcc]==13.0.2"` adds to the virtualenv (`make setup-cuda`).
fn build_nccl() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.h");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_none() {
        return;
    }
    let lib = libtorch_lib_dir()
        .expect("feature nccl: DEP_TCH_LIBTORCH_LIB is not set; run `make setup`");
    // .venv/libtorch links to site-packages/torch; the CUDA pip packages sit beside it.
    let root = lib
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .expect("feature nccl: cannot resolve the libtorch root");
    let site = root
        .parent()
        .expect("feature nccl: libtorch root has no parent");
    let includes = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cu13/include/cccl"),
        site.join("nvidia/nccl/include"),
    ];
    for dir in &includes {
        if !dir.is_dir() {
            panic!(
                "feature nccl: missing {}; install the CUDA headers with `make setup-cuda` \
                 (.venv/bin/pip install \"cuda-toolkit[cccl,nvcc]==13.0.2\")",
                dir.display()
            );
        }
    }
    let mut build = cc::Build::new();
    build.cpp(true).file("csrc/c10d_shim.cpp");
    for dir in &includes {
        build.include(dir);
    }
    build
        .flag("-std=c++17")
        .define("USE_C10D_NCCL", None)
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("c10d_shim");
    // libtorch_cuda holds ProcessGroupNCCL; libtorch_cpu holds TCPStore and PrefixStore.
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}

/// fast/csrc/cuda_graph.cpp: whole-step CUDA graph capture (at::cuda::CUDAGraph).
/// Only with `--features cuda` (which also turns on `nccl`): needs the CUDA headers of
/// `make setup-cuda`.
fn build_cuda_graph() {
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let (lib, includes, _) = cuda_paths();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/cuda_graph.cpp")
        .includes(&includes);
    build
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("mm_cuda_graph");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cuda", "c10_cuda"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}

/// Under `--features cuda`: libtorch's lib dir, the include dirs of a C++ file that uses libtorch
/// and the CUDA runtime headers, and the CUDA pip package root (`site-packages/nvidia/cu13`).
fn cuda_paths() -> (
    std::path::PathBuf,
    Vec<std::path::PathBuf>,
    std::path::PathBuf,
) {
    let lib = libtorch_lib_dir()
        .expect("feature cuda: DEP_TCH_LIBTORCH_LIB is not set; run `make setup`");
    // .venv/libtorch links to site-packages/torch; the CUDA pip packages sit beside it.
    let root = lib
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .expect("feature cuda: cannot resolve the libtorch root");
    let site = root
        .parent()
        .expect("feature cuda: libtorch root has no parent");
    let cu13 = site.join("nvidia/cu13");
    let includes = vec![
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
        cu13.join("include"),
        cu13.join("include/cccl"),
    ];
    if let Some(missing) = includes.iter().find(|d| !d.is_dir()) {
        panic!(
            "feature cuda: missing {}; install the CUDA headers with `make setup-cuda`",
            missing.display()
        );
    }
    (lib, includes, cu13)
}

/// fast/csrc/kernels.cu (fused RMSNorm->bf16, RoPE + head layout, SwiGLU) and
/// fast/csrc/cross_entropy.cu (fused cross-entropy forward + backward) and fast/csrc/attention.cu
/// (causal attention over the merged q/k/v projection, RoPE fused), each compiled by nvcc for
/// sm_90 to an object, and fast/csrc/fused_ops.cpp (their autograd functions and C entry points);
/// fast/csrc/grad_events.cpp (data parallel: the gradient hooks that let a bucket's all-reduce
/// start during backward). Only with `--features cuda`.
///
/// nvcc comes from the virtualenv's CUDA pip packages (`make setup-cuda`, which pins nvcc's
/// compiler front end nvidia-nvvm and nvidia-cuda-crt to the 13.0 release of nvcc and ptxas: left
/// free, pip resolves them to 13.5, whose PTX ISA 9.5 ptxas 13.0 refuses).
///
/// Kernels are launched with `<<<>>>`, which calls the CUDA runtime: the binary links the
/// shared libcudart.so.13 from `nvidia/cu13/lib` (the same file libtorch_cuda.so loads through
/// its own rpath, so both share one runtime: one current device, one set of streams), not
/// nvcc's default static cudart. There is no unversioned libcudart.so in the wheel, hence the
/// verbatim link name, and binaries get an rpath to that directory (`link_libtorch`, beside the
/// one to libtorch's lib dir), so they still run with only torch's lib dir on LD_LIBRARY_PATH.
fn build_fused_kernels() {
    for f in [
        "csrc/kernels.cu",
        "csrc/cross_entropy.cu",
        "csrc/attention.cu",
        "csrc/kernels.h",
        "csrc/fused_ops.cpp",
        "csrc/grouped_experts.h",
        "csrc/grad_events.cpp",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let (lib, includes, cu13) = cuda_paths();
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let nvcc = cu13.join("bin/nvcc");
    if !nvcc.is_file() {
        panic!(
            "feature cuda: missing {}; install nvcc with `make setup-cuda`",
            nvcc.display()
        );
    }
    let objs: Vec<std::path::PathBuf> = ["kernels", "cross_entropy", "attention"]
        .iter()
        .map(|name| {
            let src = format!("csrc/{name}.cu");
            let obj = out.join(format!("{name}.o"));
            let output = std::process::Command::new(&nvcc)
                .args(["-c", &src, "-o"])
                .arg(&obj)
                // No --use_fast_math: expf, logf, division and rsqrtf stay the IEEE-accurate
                // versions libtorch's own kernels use, so outputs match the unfused path.
                .args(["-arch=sm_90", "-O3", "-std=c++17", "-Xcompiler", "-fPIC"])
                .arg(format!("-I{}", cu13.join("include").display()))
                .arg("-isystem")
                .arg(cu13.join("include/cccl"))
                .output()
                .unwrap_or_else(|e| panic!("feature cuda: cannot run {}: {e}", nvcc.display()));
            if !output.status.success() {
                panic!(
                    "feature cuda: nvcc failed on {src}:\n{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            obj
        })
        .collect();
    cc::Build::new()
        .cpp(true)
        .file("csrc/fused_ops.cpp")
        .file("csrc/grad_events.cpp")
        .objects(&objs)
        .includes(&includes)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("mm_fused");
    let cudart_dir = cu13.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-search=native={}", cudart_dir.display());
    for l in ["torch_cpu", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    // The rpath to cudart_dir comes from link_libtorch() (fast/link_libtorch.rs), which every
    // binary linking fast runs.
}
