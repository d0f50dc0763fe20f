//! DLPack both ways, for any dtype fusedce reads (bfloat16 included, which
//! numpy's own DLPack refuses), on CPU memory.
//!
//! In: [`dlpack_view`] consumes a producer's capsule (versioned DLPack 1.x
//! when the producer takes `max_version`, else the legacy one) and returns a
//! [`DlpackView`] that keeps the producer's tensor alive and describes its
//! memory through numpy's `__array_interface__`, so that `numpy.asarray`
//! views it without a copy, strides and the read-only flag honoured.
//!
//! Out: [`DlpackExport`] wraps a numpy array (any dtype, a bfloat16 one
//! included) with `__dlpack__` / `__dlpack_device__`, so that
//! `torch.from_dlpack` or `jax.dlpack.from_dlpack` take it without a copy.
//!
//! This is the one place outside the kernels with `unsafe`: DLPack is a C
//! ABI of raw pointers, read and freed here under the protocol's rules.

use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::ffi::{c_void, CStr};

const CPU: i32 = 1;
const READ_ONLY: u64 = 1;
const LEGACY: &CStr = c"dltensor";
const LEGACY_USED: &CStr = c"used_dltensor";
const VERSIONED: &CStr = c"dltensor_versioned";
const VERSIONED_USED: &CStr = c"used_dltensor_versioned";

#[repr(C)]
#[derive(Clone, Copy)]
struct Device {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Tensor {
    data: *mut c_void,
    device: Device,
    ndim: i32,
    dtype: DataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct Managed {
    tensor: Tensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut Managed)>,
}

#[repr(C)]
struct Version {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct ManagedVersioned {
    version: Version,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut ManagedVersioned)>,
    flags: u64,
    tensor: Tensor,
}

/// numpy's name and `__array_interface__` type string of a DLPack dtype
/// (bfloat16's bits travel as `uint16`, viewed back by the package).
fn dtype_names(dt: DataType) -> Option<(&'static str, &'static str)> {
    if dt.lanes != 1 {
        return None;
    }
    Some(match (dt.code, dt.bits) {
        (2, 16) => ("float16", "<f2"),
        (2, 32) => ("float32", "<f4"),
        (2, 64) => ("float64", "<f8"),
        (4, 16) => ("bfloat16", "<u2"),
        (0, 8) => ("int8", "|i1"),
        (0, 16) => ("int16", "<i2"),
        (0, 32) => ("int32", "<i4"),
        (0, 64) => ("int64", "<i8"),
        (1, 8) => ("uint8", "|u1"),
        (1, 16) => ("uint16", "<u2"),
        (1, 32) => ("uint32", "<u4"),
        (1, 64) => ("uint64", "<u8"),
        (6, 8) => ("bool", "|b1"),
        _ => return None,
    })
}

/// A consumed capsule's tensor; its deleter runs when this is dropped.
enum Owned {
    Legacy(*mut Managed),
    Versioned(*mut ManagedVersioned),
}

// SAFETY: the managed tensor is only read while building the view (GIL
// held) and freed by its deleter in `drop`, which runs with the GIL held
// (a pyclass is dropped by Python); DLPack deleters may run on any thread.
unsafe impl Send for Owned {}
unsafe impl Sync for Owned {}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: the pointers came from consumed capsules (renamed "used_"),
        // so we are their only owner and call each deleter exactly once.
        unsafe {
            match *self {
                Owned::Legacy(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
                Owned::Versioned(m) => {
                    if let Some(d) = (*m).deleter {
                        d(m)
                    }
                }
            }
        }
    }
}

/// A producer's tensor, kept alive, as numpy's `__array_interface__`.
#[pyclass(frozen, module = "fusedce._native")]
pub(crate) struct DlpackView {
    _owned: Owned,
    /// numpy's name of the element type ("bfloat16" for bfloat16).
    #[pyo3(get)]
    dtype: &'static str,
    interface: Py<PyDict>,
}

#[pymethods]
impl DlpackView {
    #[getter]
    fn __array_interface__(&self, py: Python<'_>) -> Py<PyDict> {
        self.interface.clone_ref(py)
    }
}

/// Consumes `obj.__dlpack__()` (argument `arg`) into a [`DlpackView`]:
/// CPU memory only, every dtype of [`dtype_names`]; a TypeError or
/// BufferError naming `arg` otherwise.
#[pyfunction]
pub(crate) fn dlpack_view(
    py: Python<'_>,
    arg: &str,
    obj: &Bound<'_, PyAny>,
) -> PyResult<DlpackView> {
    let (device_type, _): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
    if device_type != CPU {
        return Err(PyTypeError::new_err(format!(
            "{arg}: a DLPack tensor on device type {device_type}; fusedce reads CPU memory (move it to the CPU first)"
        )));
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item("max_version", (1, 0))?;
    let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(c) => c,
        Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__")?,
        Err(e) => return Err(e),
    };
    let owned = consume(arg, &capsule)?;
    // SAFETY: `owned` holds a live managed tensor (its deleter has not run).
    let (tensor, read_only) = unsafe {
        match owned {
            Owned::Legacy(m) => (&(*m).tensor, false),
            Owned::Versioned(m) => (&(*m).tensor, (*m).flags & READ_ONLY != 0),
        }
    };
    let Some((dtype, typestr)) = dtype_names(tensor.dtype) else {
        let DataType { code, bits, lanes } = tensor.dtype;
        return Err(PyTypeError::new_err(format!(
            "{arg}: unsupported DLPack dtype (code {code}, {bits} bits, {lanes} lanes); expected a float, integer or bool type"
        )));
    };
    let interface = array_interface(py, tensor, typestr, read_only)?;
    Ok(DlpackView {
        _owned: owned,
        dtype,
        interface,
    })
}

/// Takes ownership of a DLPack capsule: renames it "used_…" as the
/// protocol asks, so that its destructor leaves the tensor to us.
fn consume(arg: &str, capsule: &Bound<'_, PyAny>) -> PyResult<Owned> {
    let cap = capsule.as_ptr();
    for (name, used, versioned) in [
        (VERSIONED, VERSIONED_USED, true),
        (LEGACY, LEGACY_USED, false),
    ] {
        // SAFETY: `cap` is a live object; PyCapsule_IsValid accepts any object.
        if unsafe { ffi::PyCapsule_IsValid(cap, name.as_ptr()) } != 1 {
            continue;
        }
        // SAFETY: `cap` is a valid capsule of this name (checked above).
        let ptr = unsafe { ffi::PyCapsule_GetPointer(cap, name.as_ptr()) };
        // SAFETY: as above; the new name is a static C string.
        if ptr.is_null() || unsafe { ffi::PyCapsule_SetName(cap, used.as_ptr()) } != 0 {
            return Err(PyErr::take(capsule.py()).unwrap_or_else(|| {
                PyBufferError::new_err(format!("{arg}: unreadable DLPack capsule"))
            }));
        }
        return Ok(if versioned {
            Owned::Versioned(ptr.cast())
        } else {
            Owned::Legacy(ptr.cast())
        });
    }
    Err(PyTypeError::new_err(format!(
        "{arg}: __dlpack__ did not return an unconsumed DLPack capsule"
    )))
}

/// numpy's `__array_interface__` (version 3) of `t`'s memory.
fn array_interface(
    py: Python<'_>,
    t: &Tensor,
    typestr: &str,
    read_only: bool,
) -> PyResult<Py<PyDict>> {
    let ndim = usize::try_from(t.ndim)
        .map_err(|_| PyValueError::new_err(format!("DLPack tensor with ndim {}", t.ndim)))?;
    let itemsize = (t.dtype.bits as u64).div_ceil(8) as i64;
    // SAFETY: DLPack guarantees `shape` (and `strides` when not null) hold
    // `ndim` values that live as long as the managed tensor, which the
    // caller keeps alive.
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let strides: Option<Vec<i64>> = (!t.strides.is_null() && ndim > 0).then(|| {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(t.strides, ndim) }
            .iter()
            .map(|&s| s * itemsize)
            .collect()
    });
    let empty = shape.contains(&0);
    let data = if empty || t.data.is_null() {
        0usize
    } else {
        (t.data as usize).wrapping_add(t.byte_offset as usize)
    };
    let d = PyDict::new(py);
    d.set_item("version", 3)?;
    d.set_item("typestr", typestr)?;
    d.set_item("shape", PyTuple::new(py, shape)?)?;
    d.set_item("strides", strides.map(|s| PyTuple::new(py, s)).transpose()?)?;
    d.set_item("data", (data, read_only))?;
    Ok(d.unbind())
}

/// What an exported capsule owns: the DLPack struct, its shape and strides,
/// and a reference to the numpy array whose memory it describes.
struct Export {
    managed: ManagedVersioned,
    legacy: Managed,
    shape: Vec<i64>,
    strides: Vec<i64>,
    /// Held, never read: keeps the array (and its memory) alive.
    _owner: Py<PyAny>,
}

/// A numpy array offered to DLPack consumers (`torch.from_dlpack`,
/// `jax.dlpack.from_dlpack`) without a copy, whatever its dtype.
#[pyclass(frozen, module = "fusedce._native")]
pub(crate) struct DlpackExport {
    array: Py<PyAny>,
    data: usize,
    shape: Vec<i64>,
    strides: Vec<i64>,
    dtype: DataType,
    read_only: bool,
}

#[pymethods]
impl DlpackExport {
    /// `array`: a numpy array; `code`, `bits`: its DLPack type; `data`,
    /// `strides` (bytes) and `read_only` from its `__array_interface__`.
    #[new]
    #[pyo3(signature = (array, data, shape, strides, code, bits, read_only))]
    fn new(
        array: Py<PyAny>,
        data: usize,
        shape: Vec<i64>,
        strides: Vec<i64>,
        code: u8,
        bits: u8,
        read_only: bool,
    ) -> PyResult<Self> {
        let dtype = DataType {
            code,
            bits,
            lanes: 1,
        };
        let itemsize = (bits as u64).div_ceil(8) as i64;
        if dtype_names(dtype).is_none() || shape.len() != strides.len() {
            return Err(PyValueError::new_err(
                "array: not exportable through DLPack",
            ));
        }
        if strides.iter().any(|s| s % itemsize != 0) {
            return Err(PyBufferError::new_err(
                "array: strides that are not a multiple of the item size cannot cross DLPack",
            ));
        }
        let strides = strides.iter().map(|s| s / itemsize).collect();
        Ok(DlpackExport {
            array,
            data,
            shape,
            strides,
            dtype,
            read_only,
        })
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (CPU, 0)
    }

    /// A capsule for one consumer: versioned when it asks for DLPack ≥ 1.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = stream; // CPU memory: nothing to synchronise
        if dl_device.is_some_and(|d| d.0 != CPU) {
            return Err(PyBufferError::new_err(
                "array: only CPU memory can be exported",
            ));
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "array: exported without a copy only (copy=True is not supported)",
            ));
        }
        let versioned = max_version.is_some_and(|v| v.0 >= 1);
        self.capsule(py, versioned)
    }
}

impl DlpackExport {
    fn capsule<'py>(&self, py: Python<'py>, versioned: bool) -> PyResult<Bound<'py, PyAny>> {
        let tensor = Tensor {
            data: self.data as *mut c_void,
            device: Device {
                device_type: CPU,
                device_id: 0,
            },
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        };
        let mut export = Box::new(Export {
            managed: ManagedVersioned {
                version: Version { major: 1, minor: 0 },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned),
                flags: if self.read_only { READ_ONLY } else { 0 },
                tensor,
            },
            legacy: Managed {
                tensor,
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_legacy),
            },
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            _owner: self.array.clone_ref(py),
        });
        let ctx: *mut Export = &mut *export;
        let (shape, strides) = (export.shape.as_mut_ptr(), export.strides.as_mut_ptr());
        for t in [&mut export.managed.tensor, &mut export.legacy.tensor] {
            t.shape = shape;
            t.strides = strides;
        }
        export.managed.manager_ctx = ctx.cast();
        export.legacy.manager_ctx = ctx.cast();
        let raw = Box::into_raw(export);
        // SAFETY: `raw` is a live Box; the capsule points at one of its
        // structs, and whichever of the capsule destructor (unconsumed) or
        // the consumer (through the deleter) comes last frees it, once.
        let (ptr, name, destructor): (*mut c_void, &CStr, ffi::PyCapsule_Destructor) = unsafe {
            if versioned {
                (
                    std::ptr::addr_of_mut!((*raw).managed).cast(),
                    VERSIONED,
                    destroy_versioned,
                )
            } else {
                (
                    std::ptr::addr_of_mut!((*raw).legacy).cast(),
                    LEGACY,
                    destroy_legacy,
                )
            }
        };
        // SAFETY: a static name, a valid pointer and destructor.
        let cap = unsafe { ffi::PyCapsule_New(ptr, name.as_ptr(), Some(destructor)) };
        if cap.is_null() {
            // SAFETY: the capsule was not made, so nothing else owns `raw`.
            drop(unsafe { Box::from_raw(raw) });
            return Err(PyErr::fetch(py));
        }
        // SAFETY: PyCapsule_New returned a new reference.
        Ok(unsafe { Bound::from_owned_ptr(py, cap) })
    }
}

/// Frees an [`Export`] (taking the GIL to release its array).
///
/// SAFETY: `ctx` is the `manager_ctx` of a live export, freed once.
unsafe fn free_export(ctx: *mut c_void) {
    let export = unsafe { Box::from_raw(ctx.cast::<Export>()) };
    Python::attach(move |_| drop(export));
}

unsafe extern "C" fn delete_versioned(m: *mut ManagedVersioned) {
    // SAFETY: called once by the consumer (or the capsule destructor).
    unsafe { free_export((*m).manager_ctx) }
}

unsafe extern "C" fn delete_legacy(m: *mut Managed) {
    // SAFETY: as above.
    unsafe { free_export((*m).manager_ctx) }
}

/// A capsule destructor: frees the export unless a consumer took it (and
/// renamed the capsule "used_…"), in which case the consumer's deleter call
/// frees it.
unsafe fn destroy_unconsumed(cap: *mut ffi::PyObject, name: &CStr) {
    // SAFETY: `cap` is the capsule being destroyed; IsValid checks the name.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, name.as_ptr()) == 1 {
            let ptr = ffi::PyCapsule_GetPointer(cap, name.as_ptr());
            let ctx = if name == VERSIONED {
                (*ptr.cast::<ManagedVersioned>()).manager_ctx
            } else {
                (*ptr.cast::<Managed>()).manager_ctx
            };
            free_export(ctx);
        }
    }
}

unsafe extern "C" fn destroy_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule being destroyed.
    unsafe { destroy_unconsumed(cap, VERSIONED) }
}

unsafe extern "C" fn destroy_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: as above.
    unsafe { destroy_unconsumed(cap, LEGACY) }
}
