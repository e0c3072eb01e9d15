"""A strict CuPy stand-in on NumPy: device-array rules checked on a machine without a GPU.

It computes with NumPy, so it checks nothing about GPU arithmetic; what it checks is the
host/device discipline that real CuPy enforces and plain NumPy (``xp = numpy``) never
does, so that a mistake shows up in public CI and not on the first, rare GPU run:

* no implicit device -> host conversion: ``np.asarray(device_array)`` raises TypeError,
  as CuPy's ``__array__`` does; arrays have no ``__index__`` (``range(a[0])`` fails);
* no host arrays inside device operations: a NumPy array given to a ufunc, operator or
  namespace function (other than ``asarray``/``array``) raises TypeError; NumPy scalars
  and Python numbers are fine, NumPy arrays as indices are fine (CuPy copies them over);
* reductions and scalar indexing give 0-d device arrays, not NumPy scalars;
* shapes and sizes must be Python/NumPy integers, not device arrays;
* ``sort``/``argsort`` accept only ``kind=None`` or ``"stable"``; ``lexsort`` one array of
  rank <= 2; ``partition`` a Python int ``kth``; ``searchsorted`` values of the array's own
  dtype; in-place ``sort``/``partition`` and ``view`` to another item size only contiguous
  arrays; numeric and bool dtypes only;
* ``argpartition`` is a full stable argsort (as in CuPy), so its ties differ from NumPy's;
* a scatter through repeated indices must write one value (CuPy's pick is undefined);
* NumPy functions called on device arrays dispatch to this namespace (as CuPy's
  ``__array_function__`` does).

Use it as ``cupy`` with :func:`install` (``sys.modules``), or as ``xp`` directly.
"""

from __future__ import annotations

import builtins
import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "devicelike (NumPy, strict CuPy rules)"


def _host_error(where: str) -> TypeError:
    return TypeError(f"devicelike: a NumPy array was passed to {where}; CuPy rejects host "
                     "arrays in device operations (move it with xp.asarray first)")


def _unwrap(obj, where: str):
    """Device arrays -> their NumPy data; host arrays -> TypeError (recursing into lists)."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise _host_error(where)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v, where) for v in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, where) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """NumPy results -> device arrays (NumPy scalars become 0-d arrays, as in CuPy)."""
    if isinstance(obj, np.ndarray):
        return ndarray(obj)
    if isinstance(obj, np.generic):
        return ndarray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(v) for v in obj)
    return obj


def _check_shape(shape, where: str):
    for v in (shape if isinstance(shape, (tuple, list)) else (shape,)):
        if isinstance(v, (ndarray, np.ndarray)):
            raise TypeError(f"devicelike: {where} got an array {v!r} as a size; CuPy needs a "
                            "Python int (use int(...) to read it from the device)")


def _kind(where, a, *args, kind=None, **kwargs):
    if kind not in (None, "stable"):
        raise ValueError(f"devicelike: {where}(kind={kind!r}): CuPy accepts only None or "
                         "'stable'")


def _kth(where, a, kth=None, *args, **kwargs):
    if "kind" in kwargs:
        raise TypeError(f"devicelike: {where} takes no kind= in CuPy")
    for k in kth if isinstance(kth, (list, tuple)) else (kth,):
        if type(k) is not int:
            raise TypeError(f"devicelike: {where}(kth={k!r}): CuPy needs a Python int")


def _searchsorted(where, a, v=None, *args, **kwargs):
    if isinstance(v, ndarray) and v.dtype != a.dtype:
        raise TypeError(f"devicelike: {where} of {v.dtype} values in a {a.dtype} array: CuPy "
                        "compares them without NumPy's type promotion")
    if not isinstance(v, (ndarray, int, float)):
        raise TypeError(f"devicelike: {where} takes a device array or a Python number, "
                        f"not {type(v).__name__}")


def _lexsort(where, keys, *args, **kwargs):
    if not isinstance(keys, ndarray) or keys.ndim > 2:
        raise NotImplementedError(f"devicelike: CuPy's {where} takes one array of rank <= 2")


def _in_place(where, a, *args, **kwargs):
    if not a._a.flags.c_contiguous:
        raise NotImplementedError(f"devicelike: {where} of a non-contiguous array (CuPy "
                                  "sorts only arrays with their own data)")


def _view(where, a, dtype=None, *args, **kwargs):
    if dtype is not None and np.dtype(dtype).itemsize != a.dtype.itemsize \
            and not a._a.flags.c_contiguous:
        raise ValueError(f"devicelike: {where} to another item size needs a C-contiguous "
                         "array in CuPy")


def _sizes(where, a, *args, **kwargs):
    _check_shape(args, where)


#: CuPy's restrictions, by function or method name; each rule sees (where, array, ...).
_RULES = {"sort": [_kind], "argsort": [_kind], "partition": [_kth], "argpartition": [_kth],
          "searchsorted": [_searchsorted], "lexsort": [_lexsort], "view": [_view],
          "reshape": [_sizes], "repeat": [_sizes]}
#: Methods that work in place.
_IN_PLACE = {"sort": [_kind, _in_place], "partition": [_kth, _in_place]}


def _check(rules, where, args, kwargs):
    for rule in rules:
        rule(where, *args, **kwargs)


def _index(key):
    """Index: device arrays unwrap; NumPy arrays and lists are allowed (CuPy copies them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def _check_scatter(a, key, value):
    """CuPy scatters in parallel: which of several writes to one element through repeated
    indices lands is undefined, so they must agree."""
    parts = key if isinstance(key, tuple) else (key,)
    if not builtins.any(np.asarray(k).dtype.kind in "iu" and np.ndim(k) > 0
                        for k in parts if isinstance(k, (np.ndarray, list))):
        return
    ids = np.arange(a.size).reshape(a.shape)[key]
    vals = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=a.dtype), ids.shape))
    order = np.argsort(ids, axis=None, kind="stable")
    ids = ids.ravel()[order]
    vals = vals.reshape(-1).view(f"V{a.dtype.itemsize}")[order]  # bytes: NaN == NaN
    if np.any((ids[1:] == ids[:-1]) & (vals[1:] != vals[:-1])):
        raise ValueError("devicelike: a scatter writes different values to one element "
                         "through repeated indices; on CuPy which one lands is undefined")


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 (the name CuPy gives it)
    """A NumPy array that behaves like a ``cupy.ndarray`` towards host code."""

    __array_priority__ = 100

    def __init__(self, data):
        self._a = data

    # -- conversions CuPy allows or refuses
    def __array__(self, dtype=None, copy=None):
        raise TypeError("devicelike: implicit conversion to a NumPy array is not allowed "
                        "(CuPy refuses it too); use .get() or cupy.asnumpy()")

    def get(self, stream=None, order="C", out=None, blocking=True):
        return np.array(self._a, order=order)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(np.asarray(self._a[i])) for i in range(len(self._a)))

    def __repr__(self):
        return f"devicelike.{self._a!r}"

    # -- element access
    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        key = _index(key)
        value = _unwrap(value, "ndarray.__setitem__ (as the value)")
        _check_scatter(self._a, key, value)
        self._a[key] = value

    # -- NumPy protocols: ufuncs and functions run here, on device arrays only
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"the ufunc {ufunc.__name__}"
        result = getattr(ufunc, method)(*_unwrap(inputs, where), **_unwrap(kwargs, where))
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        impl = _NAMESPACE.get(func.__name__)
        if impl is None:
            raise TypeError(f"devicelike: numpy.{func.__name__} has no CuPy counterpart here")
        return impl(*args, **kwargs)

    # -- attributes and methods: NumPy's, with device arrays in and out
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            where = f"ndarray.{name}"
            _check(_IN_PLACE.get(name, _RULES.get(name, ())), where, (self,) + args, kwargs)
            if name == "argpartition":  # CuPy sorts the whole axis, stably
                return self.argsort(*args[1:], **kwargs)
            return _wrap(attr(*_unwrap(args, where), **_unwrap(kwargs, where)))

        return method


def _function(name):
    func = getattr(np, name)

    def call(*args, **kwargs):
        _check(_RULES.get(name, ()), name, args, kwargs)
        if name == "argpartition":  # CuPy sorts the whole axis, stably: its ties differ
            a, _, *rest = args
            return _wrap(np.argsort(_unwrap(a, name), *rest, kind="stable", **kwargs))
        return _wrap(func(*_unwrap(args, name), **_unwrap(kwargs, name)))

    call.__name__ = name
    return call


def _creation(name):
    func = getattr(np, name)

    def call(*args, **kwargs):
        _check_shape(args[0] if name != "arange" else args, name)
        return _wrap(func(*_unwrap(args, name), **_unwrap(kwargs, name)))

    call.__name__ = name
    return call


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host -> device copy (or the device array itself)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    if isinstance(a, (list, tuple)) and builtins.any(isinstance(v, ndarray) for v in a):
        raise TypeError("devicelike: asarray of a list holding device arrays; use stack")
    out = np.array(a, dtype=dtype, order=order or "K")
    if out.dtype.kind in "OUSVMm":
        raise TypeError(f"devicelike: CuPy has no {out.dtype} arrays")
    return ndarray(out)


array = asarray


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Device -> host copy; host data passes through, as in CuPy."""
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def from_dlpack(obj):
    return ndarray(np.from_dlpack(obj))


def show_config():
    print(__version__)


class _UFunc:
    """A NumPy ufunc that takes device arrays only (its methods too: reduce, at, ...)."""

    def __init__(self, ufunc):
        self._u = ufunc

    def __call__(self, *args, **kwargs):
        where = f"the ufunc {self._u.__name__}"
        return _wrap(self._u(*_unwrap(args, where), **_unwrap(kwargs, where)))

    def __getattr__(self, name):
        method = getattr(self._u, name)
        if not callable(method):
            return method
        where = f"{self._u.__name__}.{name}"
        return lambda *a, **kw: _wrap(method(*_unwrap(a, where), **_unwrap(kw, where)))


def _sliding_window_view(a, *args, **kwargs):
    return _wrap(np.lib.stride_tricks.sliding_window_view(
        _unwrap(a, "sliding_window_view"), *args, **kwargs))


_NAMESPACE: dict = {"asarray": asarray, "array": array}
_FUNCTIONS = (
    "all any argmax argmin argpartition argsort around broadcast_to clip concatenate "
    "count_nonzero cumsum diff einsum empty_like full_like lexsort mean moveaxis nonzero "
    "ones_like partition ravel repeat reshape round searchsorted sort stack sum take "
    "take_along_axis tile unique where zeros_like ascontiguousarray max min prod "
    "flatnonzero bincount allclose array_equal expand_dims squeeze transpose copyto"
).split()
for _name in _FUNCTIONS:
    _NAMESPACE[_name] = _function(_name)
for _name in ("zeros", "empty", "ones", "full", "arange"):
    _NAMESPACE[_name] = _creation(_name)
globals().update(_NAMESPACE)  # shadows builtins (any, sum, ...): use builtins.* here
lib = types.SimpleNamespace(
    stride_tricks=types.SimpleNamespace(sliding_window_view=_sliding_window_view))


class _Generator:
    """``cupy.random.default_rng(seed)``: NumPy's generator, drawing device arrays."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        draw = getattr(self._g, name)
        return lambda *a, **kw: _wrap(draw(*a, **kw))


random = types.SimpleNamespace(default_rng=_Generator)


def __getattr__(name):
    """Ufuncs (strict), and the dtypes and constants CuPy re-exports from NumPy."""
    value = getattr(np, name)
    if isinstance(value, np.ufunc):
        return _UFunc(value)
    if isinstance(value, types.ModuleType) or (callable(value) and not isinstance(value, type)):
        raise AttributeError(f"devicelike has no {name!r}; add it here if CuPy has it")
    return value


class _Device:
    def __init__(self, device=None):
        self.id = 0

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda i: {"name": b"devicelike (NumPy)", "totalGlobalMem": 2**34,
                                       "major": 0, "minor": 0},
        runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
        deviceGetAttribute=lambda *a: 0,
        memGetInfo=lambda: (2**33, 2**34)),  # (free, total): 8 of 16 GiB
    nvrtc=types.SimpleNamespace(getVersion=lambda: (12, 8)),
)


class _MemoryPool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _MemoryPool()


def install(monkeypatch, cuml=None):
    """Make ``import cupy`` give this module (and ``cuml`` the given stand-in, or none)."""
    monkeypatch.setitem(sys.modules, "cupy", sys.modules[__name__])
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    if cuml is not None:
        monkeypatch.setitem(sys.modules, "cuml.neighbors", cuml.neighbors)
