//! Finding and opening the GEMM library at run time.
//!
//! Candidates, in the order measured fastest on the machines this project
//! runs on (see the README's performance section; `dsel bench` prints every
//! candidate's rate side by side):
//!
//! 1. **Intel MKL** (`libmkl_rt.so.3`, from the PyPI wheel `mkl`, which
//!    `make setup` unpacks into `.deps/mkl/lib` without root): `cblas_sgemm`
//!    and `cblas_gemm_bf16bf16f32`, whose kernels use AMX-BF16 tiles where
//!    the processor has them. Run on MKL's sequential layer; the output rows
//!    are split over the rayon pool instead, so that MKL's and rayon's
//!    threads never compete for the cores.
//! 2. **OpenBLAS** (`libopenblas.so.0`, Debian `libopenblas0-pthread`):
//!    f32/f64 only, its own single-threaded kernels, split over rayon.
//! 3. **candle's matmul** (the `gemm` crate): always there; bf16 is then
//!    emulated (inputs rounded to bf16, products in f32), slower than f32.
//!
//! With OpenBLAS, and with MKL on a non-Intel processor (whose bf16 GEMM
//! MKL runs in emulation there), bf16 products go to this crate's own
//! AVX512-BF16 kernel ([`crate::bf16_gemm`]) where the processor has it.
//!
//! `DSEL_BLAS=auto|mkl|openblas|off` restricts the choice (`off`: candle
//! only). MKL is looked for in `DSEL_MKL_DIR`, then the checkout's
//! `.deps/mkl/lib` (relative to this crate's sources and to the running
//! executable), then `$VIRTUAL_ENV/lib` and `$CONDA_PREFIX/lib` (where `pip
//! install mkl` puts it), then the dynamic loader's own search path.

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// CBLAS `?gemm` entry point (row/column major, transpositions, sizes,
/// alpha, A, lda, B, ldb, beta, C, ldc).
pub(crate) type GemmFn<I, O> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    O,
    *const I,
    c_int,
    *const I,
    c_int,
    O,
    *mut O,
    c_int,
);

/// Entry points of the loaded library.
pub(crate) struct Loaded {
    pub sgemm: GemmFn<f32, f32>,
    pub dgemm: Option<GemmFn<f64, f64>>,
    /// `cblas_gemm_bf16bf16f32` (bf16 given as raw `u16` bits).
    pub bf16: Option<GemmFn<u16, f32>>,
    /// Keeps the library mapped for the life of the process.
    _lib: libloading::Library,
}

/// Which library runs the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Intel MKL (f32 and native bf16).
    Mkl,
    /// OpenBLAS (f32/f64).
    OpenBlas,
    /// candle's own matmul.
    Candle,
}

/// The GEMM backend this process uses, as recorded in manifests.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The library.
    pub kind: BackendKind,
    /// One line: library, version, file, threading.
    pub description: String,
    /// Whether bf16 products run natively: MKL's bf16 GEMM on an Intel
    /// processor with bf16 units (AVX512-BF16 or AMX-BF16), or this crate's
    /// [`crate::bf16_gemm`] on any processor with AVX512-BF16. Otherwise
    /// bf16 is computed from rounded operands in f32, slower than f32.
    pub bf16_native: bool,
    /// The processor's relevant features.
    pub cpu: CpuFacts,
    /// Why a faster library was not used (`None` when MKL loaded).
    pub fallback_reason: Option<String>,
}

static STATE: OnceLock<(Backend, Option<Loaded>)> = OnceLock::new();

/// What the processor offers the GEMM libraries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFacts {
    /// CPUID vendor string is `GenuineIntel`.
    pub intel: bool,
    /// AVX512-BF16 dot products (`vdpbf16ps`).
    pub avx512_bf16: bool,
    /// AMX-BF16 tile products.
    pub amx_bf16: bool,
}

impl CpuFacts {
    /// Whether bf16 products run on hardware bf16 units (otherwise a bf16
    /// GEMM converts to f32 inside and is no faster than f32).
    pub fn bf16_hardware(&self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }
}

/// Reads the processor's vendor and bf16 features (CPUID).
pub fn cpu_facts() -> CpuFacts {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // CPUID exists on every x86_64 processor; leaves above the reported
        // maximum are not queried.
        let l0 = __cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&l0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&l0.ecx.to_le_bytes());
        let mut facts = CpuFacts {
            intel: &vendor == b"GenuineIntel",
            ..CpuFacts::default()
        };
        if l0.eax >= 7 {
            let l7 = __cpuid_count(7, 0);
            facts.amx_bf16 = (l7.edx >> 22) & 1 == 1;
            if l7.eax >= 1 {
                facts.avx512_bf16 = (__cpuid_count(7, 1).eax >> 5) & 1 == 1;
            }
        }
        facts
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        CpuFacts::default()
    }
}

fn state() -> &'static (Backend, Option<Loaded>) {
    STATE.get_or_init(load)
}

pub(crate) fn loaded() -> Option<&'static Loaded> {
    state().1.as_ref()
}

/// The backend in use (the library is opened on the first call).
pub fn backend() -> &'static Backend {
    &state().0
}

/// One warning line when this process runs slower than the machine allows
/// for want of a library — no BLAS at all, or an Intel processor with bf16
/// units but no MKL — saying how to fix it; `None` on the fast path.
/// Commands print it once at start.
pub fn fast_path_warning() -> Option<String> {
    let b = backend();
    let missing_mkl = b.cpu.intel && b.cpu.bf16_hardware() && !b.bf16_native;
    if b.kind != BackendKind::Candle && !missing_mkl {
        return None;
    }
    Some(format!(
        "warning: slow matrix products ({}): {}; run `make setup` (unpacks the PyPI wheels `mkl` and `scipy-openblas32` into .deps/) or set DSEL_MKL_DIR / DSEL_OPENBLAS_DIR",
        b.description,
        b.fallback_reason.as_deref().unwrap_or("no fast library loaded")
    ))
}

fn choice() -> String {
    std::env::var("DSEL_BLAS")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn load() -> (Backend, Option<Loaded>) {
    let choice = choice();
    let cpu = cpu_facts();
    let off = matches!(choice.as_str(), "off" | "0" | "false" | "no" | "candle");
    let mut reasons = Vec::new();
    if off {
        reasons.push("disabled by DSEL_BLAS=off".to_string());
    }
    // Order measured on both processor families this project meets (README,
    // "Performance"): on Intel MKL's sgemm beats OpenBLAS and its bf16 GEMM
    // runs on AMX; elsewhere (AMD EPYC, AVX2) MKL takes a generic code path
    // at half OpenBLAS's f32 rate. The order is a fixed rule, not a timing
    // taken at start-up, so the same machine always computes the same bytes.
    let order: &[BackendKind] = match choice.as_str() {
        _ if off => &[],
        "mkl" => &[BackendKind::Mkl],
        "openblas" => &[BackendKind::OpenBlas],
        _ if cpu.intel => &[BackendKind::Mkl, BackendKind::OpenBlas],
        _ => &[BackendKind::OpenBlas, BackendKind::Mkl],
    };
    for &kind in order {
        let attempt = match kind {
            BackendKind::Mkl => load_mkl(),
            _ => load_openblas(),
        };
        match attempt {
            Ok((mut loaded, mut description)) => {
                // MKL's bf16 GEMM runs on the hardware on Intel processors
                // only; elsewhere (and with OpenBLAS, which has none) this
                // crate's AVX512-BF16 kernel takes the bf16 products.
                if !(kind == BackendKind::Mkl && cpu.intel) && crate::bf16_gemm::available() {
                    loaded.bf16 = Some(crate::bf16_gemm::cblas_gemm_bf16bf16f32);
                    description.push_str("; bf16 on dsel's AVX512-BF16 kernel");
                }
                let bf16_native = loaded.bf16.is_some() && cpu.bf16_hardware();
                if kind == BackendKind::Mkl && !cpu.bf16_hardware() {
                    reasons.push("this processor has no bf16 units (AVX512-BF16/AMX)".into());
                }
                return (
                    Backend {
                        kind,
                        description: threads_note(description),
                        bf16_native,
                        cpu,
                        fallback_reason: (!bf16_native).then(|| reasons.join("; ")),
                    },
                    Some(loaded),
                );
            }
            Err(e) => reasons.push(e),
        }
    }
    (
        Backend {
            kind: BackendKind::Candle,
            description: "candle matmul (gemm crate)".to_string(),
            bf16_native: false,
            cpu,
            fallback_reason: Some(reasons.join("; ")),
        },
        None,
    )
}

fn threads_note(description: String) -> String {
    format!(
        "{description}, split over {} rayon threads",
        rayon::current_num_threads()
    )
}

/// Folders to look for a library in, in order: `$<env>`, the checkout's
/// `.deps/<sub>/lib` (beside this crate's sources, then beside the running
/// executable), then `$VIRTUAL_ENV/lib` and `$CONDA_PREFIX/lib`.
fn search_dirs(env: &str, sub: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(env) {
        dirs.push(PathBuf::from(d));
    }
    let deps = Path::new(".deps").join(sub).join("lib");
    // The checkout this binary was built from (tests, `cargo run`, make).
    dirs.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(&deps),
    );
    // A checkout the binary sits in (target/<profile>/dsel), or beside it.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(bin) = exe.parent() {
            dirs.push(bin.join("../..").join(&deps));
            dirs.push(bin.join(&deps));
        }
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(PathBuf::from(d).join("lib"));
        }
    }
    dirs
}

/// Existing files `dir/name` over `dirs` × `names`, then the bare names
/// (the dynamic loader's search path: LD_LIBRARY_PATH, ld.so.cache).
fn candidates(dirs: &[PathBuf], names: &[&str], bare: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .filter(|p| p.is_file())
        .collect();
    out.extend(bare.iter().map(PathBuf::from));
    out
}

const MKL_NAMES: [&str; 3] = ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"];

fn open_first(candidates: &[PathBuf]) -> Option<(libloading::Library, PathBuf)> {
    for c in candidates {
        // SAFETY: opening a shared library runs its initialisers; MKL's and
        // OpenBLAS's are the libraries' own, documented set-up.
        if let Ok(lib) = unsafe { libloading::Library::new(c) } {
            return Some((lib, c.clone()));
        }
    }
    None
}

fn load_mkl() -> Result<(Loaded, String), String> {
    let found = candidates(&search_dirs("DSEL_MKL_DIR", "mkl"), &MKL_NAMES, &MKL_NAMES);
    let Some((lib, path)) = open_first(&found) else {
        return Err("MKL (libmkl_rt.so.3) not found".to_string());
    };
    // SAFETY: symbols are looked up by their documented C names and cast to
    // the prototypes of MKL's C interface (mkl_cblas.h, mkl_service.h).
    unsafe {
        // Sequential layer (MKL_THREADING_SEQUENTIAL = 1), chosen before any
        // other call: rayon splits the work instead.
        if let Ok(set_layer) =
            lib.get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0")
        {
            set_layer(1);
        }
        let mut version = String::from("Intel MKL");
        if let Ok(get) =
            lib.get::<unsafe extern "C" fn(*mut c_char, c_int)>(b"MKL_Get_Version_String\0")
        {
            let mut buf = [0 as c_char; 256];
            get(buf.as_mut_ptr(), buf.len() as c_int);
            buf[255] = 0;
            let text = CStr::from_ptr(buf.as_ptr()).to_string_lossy();
            // "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build …"
            if let Some(v) = text.split("Version ").nth(1) {
                let v = v.split(['-', ' ']).next().unwrap_or(v);
                version = format!("Intel MKL {v}");
            }
        }
        let loaded = entry_points(lib, &path, "")?;
        Ok((loaded, format!("{version} ({})", path.display())))
    }
}

fn load_openblas() -> Result<(Loaded, String), String> {
    // The PyPI wheel `scipy-openblas32` (rootless, recent, every kernel
    // family) prefixes its symbols with `scipy_`; Debian's library does not.
    const WHEEL: &str = "libscipy_openblas.so";
    const SYSTEM: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0"];
    let mut names = vec![WHEEL];
    names.extend(SYSTEM);
    let found = candidates(
        &search_dirs("DSEL_OPENBLAS_DIR", "openblas"),
        &names,
        &SYSTEM,
    );
    let Some((lib, path)) = open_first(&found) else {
        return Err(
            "OpenBLAS (libopenblas.so.0 or the scipy-openblas32 wheel) not found".to_string(),
        );
    };
    let prefix = if path.file_name().is_some_and(|n| n == WHEEL) {
        "scipy_"
    } else {
        ""
    };
    let name = |s: &str| format!("{prefix}{s}\0").into_bytes();
    // SAFETY: as in `load_mkl`, with OpenBLAS's documented C prototypes.
    unsafe {
        if let Ok(set) = lib.get::<unsafe extern "C" fn(c_int)>(&name("openblas_set_num_threads")) {
            set(1);
        }
        let text = |sym: &str| -> Option<String> {
            let f = lib
                .get::<unsafe extern "C" fn() -> *const c_char>(&name(sym))
                .ok()?;
            let p = f();
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().trim().to_string())
        };
        let config = text("openblas_get_config").unwrap_or_else(|| "OpenBLAS".into());
        let core = text("openblas_get_corename").unwrap_or_else(|| "?".into());
        let version = config
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let loaded = entry_points(lib, &path, prefix)?;
        Ok((
            loaded,
            format!("{version} (core {core}; {})", path.display()),
        ))
    }
}

/// The GEMM entry points of an opened library (symbol names with
/// `prefix`), checked by [`check`]; `cblas_sgemm` is required, the others
/// are used when present.
///
/// # Safety
/// The symbols, when present, must have the CBLAS prototypes (MKL's and
/// OpenBLAS's C interfaces).
unsafe fn entry_points(
    lib: libloading::Library,
    path: &Path,
    prefix: &str,
) -> Result<Loaded, String> {
    let name = |s: &str| format!("{prefix}{s}\0").into_bytes();
    // SAFETY: forwarded from the caller.
    let loaded = unsafe {
        let sgemm = *lib
            .get::<GemmFn<f32, f32>>(&name("cblas_sgemm"))
            .map_err(|e| format!("{}: no cblas_sgemm ({e})", path.display()))?;
        let dgemm = lib
            .get::<GemmFn<f64, f64>>(&name("cblas_dgemm"))
            .ok()
            .map(|s| *s);
        let bf16 = lib
            .get::<GemmFn<u16, f32>>(&name("cblas_gemm_bf16bf16f32"))
            .ok()
            .map(|s| *s);
        Loaded {
            sgemm,
            dgemm,
            bf16,
            _lib: lib,
        }
    };
    check(&loaded, path)?;
    Ok(loaded)
}

/// A 2×2 product through every entry point: a library that loads but
/// computes garbage (a wrong ABI, a broken wheel) is rejected here.
fn check(l: &Loaded, path: &Path) -> Result<(), String> {
    let a = [1.0f32, 2.0, 3.0, 4.0];
    let b = [5.0f32, 6.0, 7.0, 8.0];
    check_one(l.sgemm, a, b, "cblas_sgemm", path)?;
    if let Some(bf16) = l.bf16 {
        let bits = |v: [f32; 4]| v.map(crate::bf16::from_f32);
        check_one(bf16, bits(a), bits(b), "cblas_gemm_bf16bf16f32", path)?;
    }
    Ok(())
}

/// `[[1,2],[3,4]]·[[5,6],[7,8]]` through one entry point (every value is
/// exact in bf16 and f32).
fn check_one<I>(
    f: GemmFn<I, f32>,
    a: [I; 4],
    b: [I; 4],
    name: &str,
    path: &Path,
) -> Result<(), String> {
    let want = [19.0f32, 22.0, 43.0, 50.0];
    let mut c = [0f32; 4];
    // SAFETY: 2×2 row-major operands with leading dimension 2.
    unsafe {
        f(
            101,
            111,
            111,
            2,
            2,
            2,
            1.0,
            a.as_ptr(),
            2,
            b.as_ptr(),
            2,
            0.0,
            c.as_mut_ptr(),
            2,
        )
    };
    if c != want {
        return Err(format!(
            "{}: {name} gave {c:?}, expected {want:?}",
            path.display()
        ));
    }
    Ok(())
}
