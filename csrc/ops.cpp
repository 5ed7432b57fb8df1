// The nanops operator library: its schemas (nanops/ops.def) and the Python module whose import
// runs the registrations. Kernels register themselves per device in csrc/cpu/*.cpp and
// csrc/cuda/*_host.cpp.
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"

namespace nanops {

CudaProbe& cuda_probe() {
  static CudaProbe probe = nullptr;
  return probe;
}

namespace {

// cuda_kernels_run_on(index) -> True/False, or None when the build has no CUDA kernels.
PyObject* cuda_kernels_run_on(PyObject* /*module*/, PyObject* arg) {
  const long index = PyLong_AsLong(arg);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  if (cuda_probe() == nullptr) Py_RETURN_NONE;
  const int runs = cuda_probe()(static_cast<int>(index));
  if (runs < 0) {
    PyErr_Format(PyExc_ValueError, "cuda_kernels_run_on: no usable CUDA device %ld", index);
    return nullptr;
  }
  return PyBool_FromLong(runs);
}

PyMethodDef methods[] = {
    {"cuda_kernels_run_on", cuda_kernels_run_on, METH_O,
     "Whether this build's CUDA kernels have an image for CUDA device `index` (None: no CUDA kernels built)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace nanops

extern "C" {
// Importing nanops._C runs the static TORCH_LIBRARY registrations below; ops are reached through
// torch.ops.nanops, the module itself only describes the build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nanops::methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

// The schemas themselves are nanops/ops.def, the list the PyTorch fallback reads too.
TORCH_LIBRARY(nanops, m) {
#define NANOPS_OP(schema) m.def(schema);
#include "nanops/ops.def"
#undef NANOPS_OP
}
