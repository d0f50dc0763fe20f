//! The one mapping from the core's errors onto Python exceptions:
//! an out-of-range class index is an `IndexError` (as in PyTorch), an
//! invalid argument a `ValueError`, a refused resource a `RuntimeError`.

use fusedce_core::CeError;
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// A core error on its way to Python (`.map_err(CoreError)?`).
pub(crate) struct CoreError(pub CeError);

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        let msg = e.0.to_string();
        match e.0 {
            CeError::TargetOutOfBounds { .. } => PyIndexError::new_err(msg),
            CeError::Invalid { .. } => PyValueError::new_err(msg),
            CeError::Resource(_) => PyRuntimeError::new_err(msg),
        }
    }
}
