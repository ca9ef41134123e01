include!("link_libtorch.rs");

fn main() {
    link_libtorch();
    build_ops();
    build_nccl();
    build_cuda_graph();
}

/// fast/csrc/ops.cpp: libtorch's foreach and fused-optimizer ops that tch does not expose;
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
    let lib = libtorch_lib_dir()
        .expect("feature cuda: DEP_TCH_LIBTORCH_LIB is not set; run `make setup`");
    let root = lib
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .expect("feature cuda: cannot resolve the libtorch root");
    let site = root
        .parent()
        .expect("feature cuda: libtorch root has no parent");
    let includes = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cu13/include/cccl"),
    ];
    if let Some(missing) = includes.iter().find(|d| !d.is_dir()) {
        panic!(
            "feature cuda: missing {}; install the CUDA headers with `make setup-cuda`",
            missing.display()
        );
    }
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
