//! Errors of the core, each naming the argument at fault. The Python bindings
//! map [`CeError::TargetOutOfBounds`] to `IndexError` (as PyTorch does) and
//! [`CeError::Invalid`] to `ValueError`.

use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum CeError {
    /// A class-index target outside `[0, classes)` that is not `ignore_index`.
    TargetOutOfBounds {
        /// Flat position of the offending target.
        position: usize,
        value: i64,
        classes: usize,
        ignore_index: i64,
    },
    /// An argument with a wrong size or value.
    Invalid { arg: &'static str, msg: String },
    /// The machine refused a resource (threads, memory).
    Resource(String),
}

impl CeError {
    pub(crate) fn invalid(arg: &'static str, msg: impl Into<String>) -> Self {
        CeError::Invalid {
            arg,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for CeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CeError::TargetOutOfBounds {
                position,
                value,
                classes,
                ignore_index,
            } => write!(
                f,
                "target: Target {value} is out of bounds (at flat position {position}); expected a class index in [0, {classes}) or ignore_index={ignore_index}"
            ),
            CeError::Invalid { arg, msg } => write!(f, "{arg}: {msg}"),
            CeError::Resource(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for CeError {}
