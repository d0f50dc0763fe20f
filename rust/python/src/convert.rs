//! Conversions from Python objects to what the core reads: the dtype, the
//! reduction, the targets, the upstream gradient and where the gradient
//! goes, as typed `FromPyObject` values; numpy buffers borrowed (never
//! copied) as slices, with every failure a Python exception naming the
//! argument; and the check that no output overlaps an input.

use crate::error::CoreError;
use fusedce_core::{self as core, Elem, Io};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyAnyMethods;
use std::ops::Range;

/// The floating storage types fusedce reads, named by numpy's dtype names.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dtype {
    F32,
    F64,
    F16,
    BF16,
}

impl Dtype {
    /// The dtype of the array `obj` (argument `arg`), or a TypeError.
    pub fn of(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        // the common cases by numpy's own type check, without attribute lookups
        if obj.cast::<PyArrayDyn<f32>>().is_ok() {
            return Ok(Dtype::F32);
        }
        if obj.cast::<PyArrayDyn<f64>>().is_ok() {
            return Ok(Dtype::F64);
        }
        let name = obj.getattr("dtype")?.getattr("name")?;
        match name.extract::<String>()?.as_str() {
            "float32" => Ok(Dtype::F32),
            "float64" => Ok(Dtype::F64),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::BF16),
            other => Err(PyTypeError::new_err(format!(
                "{arg}: unsupported dtype {other}; expected float32, float64, float16 or bfloat16"
            ))),
        }
    }
}

/// Calls `$go!(T)` with `T` the core storage type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $go:ident) => {
        match $dtype {
            $crate::convert::Dtype::F32 => $go!(f32),
            $crate::convert::Dtype::F64 => $go!(f64),
            $crate::convert::Dtype::F16 => $go!(half::f16),
            $crate::convert::Dtype::BF16 => $go!(half::bf16),
        }
    };
}
pub(crate) use by_dtype;

/// `reduction` parsed by the core (whose parser owns the message).
pub(crate) fn reduction(name: &str) -> PyResult<core::Reduction> {
    Ok(name.parse().map_err(CoreError)?)
}

/// The upstream gradient: a number, or one per sample (float64).
pub(crate) enum GradOutput<'py> {
    PerSample(Bound<'py, PyArrayDyn<f64>>),
    Scalar(f64),
}

/// An array is per sample, anything else a number. (Written out: a derived
/// extraction tries the array first and formats an error for every number,
/// about a microsecond per call.)
impl<'a, 'py> FromPyObject<'a, 'py> for GradOutput<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyArrayDyn<f64>>() {
            Ok(a) => Ok(GradOutput::PerSample(a.to_owned())),
            Err(_) => Ok(GradOutput::Scalar(obj.extract::<f64>()?)),
        }
    }
}

/// A numpy element type and the core storage type its buffer holds
/// (16-bit floats are read through a `uint16` view of their bits).
pub(crate) trait Storage: Elem {
    type Np: numpy::Element;
    const HALF: bool;
    fn view(s: &[Self::Np]) -> &[Self];
    fn view_mut(s: &mut [Self::Np]) -> &mut [Self];
}

macro_rules! storage {
    ($t:ty, $np:ty, $half:expr, $view:ident, $view_mut:ident) => {
        impl Storage for $t {
            type Np = $np;
            const HALF: bool = $half;
            fn view(s: &[$np]) -> &[$t] {
                s.$view()
            }
            fn view_mut(s: &mut [$np]) -> &mut [$t] {
                s.$view_mut()
            }
        }
    };
}

/// The identity view of a buffer that already holds the core's type.
trait Same {
    fn same(&self) -> &Self {
        self
    }
    fn same_mut(&mut self) -> &mut Self {
        self
    }
}
impl<T> Same for [T] {}

storage!(f32, f32, false, same, same_mut);
storage!(f64, f64, false, same, same_mut);
storage!(f16, u16, true, reinterpret_cast, reinterpret_cast_mut);
storage!(bf16, u16, true, reinterpret_cast, reinterpret_cast_mut);

/// `obj` as a numpy array of `E`, or a TypeError naming `arg`.
pub(crate) fn array<'py, E: numpy::Element>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<E>>> {
    obj.cast::<PyArrayDyn<E>>().cloned().map_err(|_| {
        let got = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{arg}: expected a numpy array of {}, got {got}",
            std::any::type_name::<E>()
        ))
    })
}

/// `obj` as an array of `T`'s buffer type (a `uint16` view for halves).
fn storage_array<'py, T: Storage>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<T::Np>>> {
    if T::HALF {
        let view = obj.call_method1("view", ("uint16",))?;
        return array::<T::Np>(arg, &view);
    }
    array::<T::Np>(arg, obj)
}

/// Borrows `obj` for reading; an array being written by another call is a
/// ValueError that says so (never a panic).
pub(crate) fn read<'py, E: numpy::Element>(
    arg: &str,
    a: &Bound<'py, PyArrayDyn<E>>,
) -> PyResult<PyReadonlyArrayDyn<'py, E>> {
    a.try_readonly().map_err(|e| {
        PyValueError::new_err(format!(
            "{arg}: cannot be read: it overlaps an array that this or another running call writes ({e})"
        ))
    })
}

/// Borrows `obj` for writing; see [`read`].
pub(crate) fn write<'py, E: numpy::Element>(
    arg: &str,
    a: &Bound<'py, PyArrayDyn<E>>,
) -> PyResult<PyReadwriteArrayDyn<'py, E>> {
    a.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{arg}: cannot be written: it is read-only, or overlaps an array that this or another running call uses ({e})"
        ))
    })
}

/// Reads the storage array `obj` of `T`.
pub(crate) fn read_as<'py, T: Storage>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArrayDyn<'py, T::Np>> {
    read(arg, &storage_array::<T>(arg, obj)?)
}

/// Writes the storage array `obj` of `T`.
pub(crate) fn write_as<'py, T: Storage>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadwriteArrayDyn<'py, T::Np>> {
    write(arg, &storage_array::<T>(arg, obj)?)
}

pub(crate) fn slice<'a, E: numpy::Element>(
    arg: &str,
    a: &'a PyReadonlyArrayDyn<'_, E>,
) -> PyResult<&'a [E]> {
    a.as_slice().map_err(|_| {
        PyValueError::new_err(format!("{arg}: expected an aligned C-contiguous array"))
    })
}

pub(crate) fn slice_mut<'a, E: numpy::Element>(
    arg: &str,
    a: &'a mut PyReadwriteArrayDyn<'_, E>,
) -> PyResult<&'a mut [E]> {
    a.as_slice_mut().map_err(|_| {
        PyValueError::new_err(format!("{arg}: expected an aligned C-contiguous array"))
    })
}

/// Class indices (int64) or probabilities (the input's dtype), borrowed.
pub(crate) enum TargetArray<'py, T: Storage> {
    Index(PyReadonlyArrayDyn<'py, i64>),
    Probs(PyReadonlyArrayDyn<'py, T::Np>),
}

impl<'py, T: Storage> TargetArray<'py, T> {
    /// An int64 array is class indices; anything else is read as probabilities.
    pub fn borrow(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyArrayDyn<i64>>() {
            Ok(a) => Ok(TargetArray::Index(read("target", a)?)),
            Err(_) => Ok(TargetArray::Probs(read_as::<T>("target", obj)?)),
        }
    }

    pub fn targets(&self) -> PyResult<core::Targets<'_, T>> {
        Ok(match self {
            TargetArray::Index(a) => core::Targets::Index(slice("target", a)?),
            TargetArray::Probs(a) => core::Targets::Probs(T::view(slice("target", a)?)),
        })
    }
}

/// The upstream gradient, borrowed.
pub(crate) enum GradOutputArray<'py> {
    PerSample(PyReadonlyArrayDyn<'py, f64>),
    Scalar(f64),
}

impl<'py> GradOutputArray<'py> {
    pub fn borrow(g: &GradOutput<'py>) -> PyResult<Self> {
        Self::borrow_as("grad_output", g)
    }

    /// Borrows an upstream gradient passed as `arg`.
    pub fn borrow_as(arg: &str, g: &GradOutput<'py>) -> PyResult<Self> {
        Ok(match g {
            GradOutput::PerSample(a) => GradOutputArray::PerSample(read(arg, a)?),
            GradOutput::Scalar(v) => GradOutputArray::Scalar(*v),
        })
    }

    pub fn get(&self) -> PyResult<core::GradOutput<'_>> {
        Ok(match self {
            GradOutputArray::PerSample(a) => core::GradOutput::PerSample(slice("grad_output", a)?),
            GradOutputArray::Scalar(v) => core::GradOutput::Scalar(*v),
        })
    }
}

/// The logits and where their gradient goes, borrowed: the core's [`Io`]
/// over numpy borrows. `grad` is None (forward only), the input itself (in
/// place) or another array.
pub(crate) type IoArrays<'py, E> = Io<PyReadonlyArrayDyn<'py, E>, PyReadwriteArrayDyn<'py, E>>;

pub(crate) fn borrow_io<'py, T: Storage>(
    input: &Bound<'py, PyAny>,
    grad: Option<&Bound<'py, PyAny>>,
) -> PyResult<IoArrays<'py, T::Np>> {
    Ok(match grad {
        None => Io::Forward(read_as::<T>("input", input)?),
        Some(g) if g.is(input) => Io::InPlace(write_as::<T>("input", input)?),
        Some(g) => {
            let x = read_as::<T>("input", input)?;
            Io::Grad(x, write_as::<T>("grad_out", g)?)
        }
    })
}

/// The slices of borrowed logits.
pub(crate) fn io_slices<'a, T: Storage>(
    io: &'a mut IoArrays<'_, T::Np>,
) -> PyResult<core::Logits<'a, T>> {
    Ok(match io {
        Io::Forward(x) => Io::Forward(T::view(slice("input", x)?)),
        Io::Grad(x, g) => Io::Grad(
            T::view(slice("input", x)?),
            T::view_mut(slice_mut("grad_out", g)?),
        ),
        Io::InPlace(x) => Io::InPlace(T::view_mut(slice_mut("input", x)?)),
    })
}

/// Adds the memory of the logits to `inputs` and of their gradient to
/// `outputs` (in place, the logits are an output).
pub(crate) fn add_io_spans<T>(
    io: &core::Logits<'_, T>,
    inputs: &mut Vec<(&'static str, Range<usize>)>,
    outputs: &mut Vec<(&'static str, Range<usize>)>,
) {
    match io {
        Io::Forward(x) => inputs.push(("input", span(x))),
        Io::Grad(x, g) => {
            inputs.push(("input", span(x)));
            outputs.push(("grad_out", span(g)));
        }
        Io::InPlace(x) => outputs.push(("input", span(x))),
    }
}

/// The bytes a slice covers.
pub(crate) fn span<T>(s: &[T]) -> Range<usize> {
    let a = s.as_ptr() as usize;
    a..a + std::mem::size_of_val(s)
}

/// No output overlaps an input (or another output): else a ValueError
/// naming both. Checked before any slice is used, so the core never sees
/// aliased buffers.
pub(crate) fn check_disjoint(
    outputs: &[(&str, Range<usize>)],
    inputs: &[(&str, Range<usize>)],
) -> PyResult<()> {
    for (i, (out, o)) in outputs.iter().enumerate() {
        let others = inputs.iter().chain(&outputs[i + 1..]);
        for (name, r) in others {
            if o.start < r.end && r.start < o.end {
                return Err(PyValueError::new_err(format!(
                    "{out}: overlaps {name}; outputs must not share memory with the inputs or each other \
                     (only grad_out=input, exactly, writes the gradient in place)"
                )));
            }
        }
    }
    Ok(())
}
