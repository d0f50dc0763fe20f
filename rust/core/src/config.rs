//! The environment variables the core reads, parsed once and validated:
//! `FUSEDCE_NUM_THREADS` (the default thread count) and `FUSEDCE_SIMD` (a cap
//! on the instruction set). A malformed value is an error naming the
//! variable, returned by every call until the process restarts.

use crate::error::CeError;
use crate::simd::Level;
use std::sync::OnceLock;

/// The most worker threads a pool may have.
pub const MAX_THREADS: usize = 1024;

#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// `FUSEDCE_NUM_THREADS`, when set.
    pub num_threads: Option<usize>,
    /// `FUSEDCE_SIMD`, when set.
    pub simd_cap: Option<Level>,
}

/// The parsed environment (or the error of its first malformed variable).
pub(crate) fn get() -> Result<&'static Config, CeError> {
    static CONFIG: OnceLock<Result<Config, CeError>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Ok(Config {
                num_threads: var("FUSEDCE_NUM_THREADS")
                    .map(|v| parse_threads("FUSEDCE_NUM_THREADS", &v))
                    .transpose()?,
                simd_cap: var("FUSEDCE_SIMD").map(|v| parse_simd(&v)).transpose()?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// A thread count in `1..=MAX_THREADS` named `arg`.
pub fn check_threads(arg: &'static str, n: i128) -> Result<usize, CeError> {
    if n < 1 || n > MAX_THREADS as i128 {
        return Err(CeError::invalid(
            arg,
            format!("expected a number of threads between 1 and {MAX_THREADS}, got {n}"),
        ));
    }
    Ok(n as usize)
}

fn parse_threads(name: &'static str, v: &str) -> Result<usize, CeError> {
    match v.trim().parse::<i128>() {
        Ok(n) => check_threads(name, n),
        Err(_) => Err(CeError::invalid(
            name,
            format!("expected a number of threads between 1 and {MAX_THREADS}, got {v:?}"),
        )),
    }
}

fn parse_simd(v: &str) -> Result<Level, CeError> {
    match v.trim() {
        "scalar" => Ok(Level::Scalar),
        "avx2" => Ok(Level::Avx2),
        "avx512" => Ok(Level::Avx512),
        "avx512bf16" => Ok(Level::Avx512Bf16),
        _ => Err(CeError::invalid(
            "FUSEDCE_SIMD",
            format!("expected 'scalar', 'avx2', 'avx512' or 'avx512bf16', got {v:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_values_name_the_variable() {
        let e = parse_threads("FUSEDCE_NUM_THREADS", "lots").unwrap_err();
        assert!(e.to_string().starts_with("FUSEDCE_NUM_THREADS: expected"));
        assert!(parse_threads("FUSEDCE_NUM_THREADS", "0").is_err());
        assert!(parse_threads("FUSEDCE_NUM_THREADS", "100000").is_err());
        assert_eq!(parse_threads("FUSEDCE_NUM_THREADS", " 3 ").unwrap(), 3);
        assert!(parse_simd("sse9")
            .unwrap_err()
            .to_string()
            .contains("FUSEDCE_SIMD"));
        assert_eq!(parse_simd("avx2").unwrap(), Level::Avx2);
    }
}
