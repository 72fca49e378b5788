// Python bindings of zerokit._C: tensor checks here, the work in torch-independent files.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "async_io.h"
#include "cpu_adam.h"
#include "host_memory.h"

namespace py = pybind11;

namespace zerokit {
namespace {

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous; call .contiguous() first");
}

ElementType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kHalf:
      return ElementType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void adam_step_binding(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled_weight_decay,
                       const std::optional<at::Tensor>& low_precision_out, int64_t num_threads,
                       const std::string& simd_level, double grad_scale) {
  const std::pair<const at::Tensor*, const char*> fp32_tensors[] = {
      {&param, "param"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [t, name] : fp32_tensors) {
    check_cpu_contiguous(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->numel() == param.numel(), name, " has ", t->numel(), " elements, param has ", param.numel());
  }
  check_cpu_contiguous(grad, "grad");
  TORCH_CHECK(grad.numel() == param.numel(), "grad has ", grad.numel(), " elements, param has ", param.numel());
  AdamTile tile{param.data_ptr<float>(), grad.data_ptr(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                nullptr, param.numel(), element_type(grad, "grad"), ElementType::kBFloat16};
  if (low_precision_out.has_value()) {
    const at::Tensor& out = *low_precision_out;
    check_cpu_contiguous(out, "low_precision_out");
    TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf,
                "low_precision_out must be bfloat16 or float16, got ", out.scalar_type());
    TORCH_CHECK(out.numel() == param.numel(), "low_precision_out has ", out.numel(), " elements, param has ",
                param.numel());
    tile.low_precision_out = out.data_ptr();
    tile.out_type = element_type(out, "low_precision_out");
  }
  const AdamHyperParams hp{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay};
  py::gil_scoped_release no_gil;
  adam_step(tile, step, hp, static_cast<int>(num_threads), simd_level, static_cast<float>(grad_scale));
}

py::tuple allocate_host_binding(int64_t nbytes, int64_t alignment, bool pin) {
  TORCH_CHECK(nbytes >= 0, "nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK(alignment > 0, "alignment must be positive, got ", alignment);
  HostAllocation a = allocate_host(static_cast<size_t>(nbytes), static_cast<size_t>(alignment), pin);
  const bool pinned = a.pinned;
  at::Tensor tensor = torch::from_blob(
      a.data, {nbytes}, [pinned](void* data) { free_host(data, pinned); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  return py::make_tuple(tensor, a.pinned, a.pin_reason);
}

std::shared_ptr<IoRequest> submit_binding(IoPool& pool, const std::shared_ptr<IoFile>& file, const at::Tensor& buffer,
                                          int64_t offset, bool write) {
  check_cpu_contiguous(buffer, "buffer");
  const size_t nbytes = static_cast<size_t>(buffer.numel()) * buffer.element_size();
  // The request owns a reference to the tensor until its last block finishes.
  auto keep_alive = std::make_shared<at::Tensor>(buffer);
  return pool.submit(file, buffer.data_ptr(), nbytes, offset, write, std::move(keep_alive));
}

// Joining the I/O threads must not hold the GIL: a finishing block may drop the last reference
// to a tensor, and torch takes the GIL to release its Python object.
std::shared_ptr<IoPool> make_io_pool(int num_threads, size_t block_size) {
  return std::shared_ptr<IoPool>(new IoPool(num_threads, block_size), [](IoPool* pool) {
    if (PyGILState_Check()) {
      py::gil_scoped_release no_gil;
      delete pool;
    } else {
      delete pool;
    }
  });
}

}  // namespace
}  // namespace zerokit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace zerokit;
  // module_local: the prebuilt and a JIT-built copy can then live in one process.
  m.doc() = "zerokit native ops: fused CPU Adam, asynchronous file I/O, aligned/pinned host memory";
  m.attr("IO_ALIGNMENT") = py::int_(kIoAlignment);

  m.def("adam_step", &adam_step_binding, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled_weight_decay"), py::arg("low_precision_out") = py::none(),
        py::arg("num_threads") = 0, py::arg("simd_level") = "", py::arg("grad_scale") = 1.0,
        "One Adam/AdamW step in place over contiguous CPU tensors (fp32 state; fp32/bf16/fp16 grad, "
        "multiplied by grad_scale in fp32 first).");
  m.def("adam_simd_level", &adam_simd_level, "Instruction set the CPU Adam kernel uses on this CPU.");
  m.def("allocate_host", &allocate_host_binding, py::arg("nbytes"), py::arg("alignment"), py::arg("pin"),
        "Aligned uint8 host tensor; returns (tensor, pinned, reason it is not pinned).");
  m.def("cuda_host_register_unavailable_reason", &cuda_host_register_unavailable_reason);

  py::class_<IoFile, std::shared_ptr<IoFile>>(m, "IoFile", py::module_local())
      .def_property_readonly("path", &IoFile::path)
      .def_property_readonly("direct", &IoFile::direct)
      .def_property_readonly("fallback_reason", &IoFile::fallback_reason)
      .def_property_readonly("closed", &IoFile::closed)
      .def("close", &IoFile::close);

  py::class_<IoRequest, std::shared_ptr<IoRequest>>(m, "IoRequest", py::module_local())
      .def("done", &IoRequest::done)
      .def("wait", &IoRequest::wait, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("error", &IoRequest::error)
      .def_property_readonly("nbytes", &IoRequest::nbytes);

  py::class_<IoPool, std::shared_ptr<IoPool>>(m, "IoPool", py::module_local())
      .def(py::init(&make_io_pool), py::arg("num_threads"), py::arg("block_size"))
      .def_property_readonly("num_threads", &IoPool::num_threads)
      .def_property_readonly("block_size", &IoPool::block_size)
      .def_static("open", &IoFile::open, py::arg("path"), py::arg("create"), py::arg("direct"))
      .def("submit", &submit_binding, py::arg("file"), py::arg("buffer"), py::arg("offset"), py::arg("write"));
}
