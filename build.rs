//! Links OpenBLAS where it is installed (Debian's and Ubuntu's `libopenblas-dev`, Fedora's
//! `openblas-devel`, Homebrew's `openblas`): kedit then sends CPU f32 matrix products of more than a
//! few dozen rows to `cblas_sgemm`, which runs them 1.6–1.8× faster than candle's gemm on the
//! shapes of an edit (`benches/kernels.rs`). Without it the pure-Rust path is used.
//! `KEDIT_BLAS=none` builds without it where it is installed.

use std::path::Path;

const LIBRARY_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/opt/openblas/lib",
    "/usr/local/opt/openblas/lib",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kedit_openblas)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=KEDIT_BLAS");
    if std::env::var("KEDIT_BLAS").is_ok_and(|v| v == "none") {
        return;
    }
    let found = LIBRARY_DIRS.iter().find(|dir| {
        ["libopenblas.so", "libopenblas.dylib"]
            .iter()
            .any(|lib| Path::new(dir).join(lib).exists())
    });
    match found {
        Some(dir) => {
            println!("cargo::rustc-link-search=native={dir}");
            println!("cargo::rustc-link-lib=dylib=openblas");
            println!("cargo::rustc-cfg=kedit_openblas");
        }
        None => println!(
            "cargo::warning=OpenBLAS not found: large CPU matrix products use candle's gemm \
             (install libopenblas-dev and rebuild for 1.6-1.8x faster ones)"
        ),
    }
}
