// Shared by fast/build.rs and the root build.rs (each binary that links libtorch needs it).
//
// The linker drops libtorch_cuda.so under --as-needed because no symbol of ours names it,
// and CUDA is then silently unavailable at run time. Link it explicitly, and put the
// libtorch lib dir in the rpath so the binaries run without LD_LIBRARY_PATH.
#[allow(dead_code)]
fn libtorch_lib_dir() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(Into::into)
}

fn link_libtorch() {
    let Some(lib) = libtorch_lib_dir() else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; run `make setup` first");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // fast's fused kernels (`--features cuda`, fast/build.rs) link libcudart.so.13 from the CUDA
    // pip package beside torch; find it as libtorch_cuda.so's own `$ORIGIN/../../nvidia/cu13/lib`
    // does. Here rather than in fast/build.rs, so every binary linking fast gets it (a link-arg
    // applies to its own package only); an rpath entry nothing needs costs nothing.
    let cudart = lib.join("../../nvidia/cu13/lib");
    if cudart.join("libcudart.so.13").exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cudart.display());
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
