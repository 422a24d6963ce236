// The Python module init of sta._C (AOT build) or sta_C_<tag> (just-in-time build).
//
// The ops register themselves with the dispatcher when the library is loaded (TORCH_LIBRARY_*
// static initialisers); this module only carries the torch version the library was compiled
// against, so sta/_extension.py can refuse a stale build with the rebuild command instead of
// crashing later. No pybind11: the bare CPython API keeps the compile short.
#include <Python.h>
#include <torch/headeronly/version.h>

#define STA_CONCAT_(a, b) a##b
#define STA_CONCAT(a, b) STA_CONCAT_(a, b)
#define STA_STR_(x) #x
#define STA_STR(x) STA_STR_(x)

static struct PyModuleDef sta_module_def = {
    PyModuleDef_HEAD_INIT, STA_STR(TORCH_EXTENSION_NAME),
    "sta C++/CUDA ops, registered as torch.ops.sta.* (see csrc/README.md)", -1, nullptr};

PyMODINIT_FUNC STA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&sta_module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
#ifdef STA_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
