fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Packed relative relocations (DT_RELR): the loader reads about 15 KB instead of a 480 KB
    // `.rela.dyn` at start-up, and those pages stay resident. Release builds for the machine
    // they are built on only, and only when its C library can load them (glibc >= 2.36 defines
    // the GLIBC_ABI_DT_RELR version the linker then requires; binutils >= 2.38 and lld >= 15
    // know the flag, older GNU ld ignores it with a warning).
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let native = var("HOST") == var("TARGET");
    let linux_gnu = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if release && native && linux_gnu && libc_loads_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this machine's glibc defines the GLIBC_ABI_DT_RELR symbol version.
fn libc_loads_relr() -> bool {
    const NEEDLE: &[u8] = b"GLIBC_ABI_DT_RELR";
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    [
        format!("/lib/{arch}-linux-gnu/libc.so.6"),
        format!("/usr/lib/{arch}-linux-gnu/libc.so.6"),
        "/lib64/libc.so.6".to_owned(),
        "/usr/lib64/libc.so.6".to_owned(),
        "/usr/lib/libc.so.6".to_owned(),
    ]
    .iter()
    .filter_map(|path| std::fs::read(path).ok())
    .any(|libc| libc.windows(NEEDLE.len()).any(|w| w == NEEDLE))
}
