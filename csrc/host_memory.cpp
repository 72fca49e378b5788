// [Note: pinning without linking CUDA]
// The extension is built as plain C++ so that one source tree serves CPU and CUDA torch builds.
// A CUDA build of torch has already loaded the CUDA runtime into the process, so the runtime's
// cudaHostRegister/cudaHostUnregister are looked up there. Memory registered this way is pinned
// for exactly its lifetime: the deleter unregisters before it frees.
#include "host_memory.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace zerokit {
namespace {

using CudaError = int;  // cudaError_t; 0 is cudaSuccess

struct CudaHostRuntime {
  CudaError (*host_register)(void*, size_t, unsigned int) = nullptr;
  CudaError (*host_unregister)(void*) = nullptr;
  CudaError (*get_last_error)() = nullptr;
  const char* (*error_string)(CudaError) = nullptr;
  std::string unavailable_reason;
};

int find_cudart(struct dl_phdr_info* info, size_t, void* found) {
  const char* name = info->dlpi_name;
  if (name != nullptr && std::strstr(name, "libcudart.so") != nullptr) {
    *static_cast<std::string*>(found) = name;
    return 1;
  }
  return 0;
}

CudaHostRuntime load_cuda_host_runtime() {
  CudaHostRuntime rt;
  std::string path;
  dl_iterate_phdr(find_cudart, &path);
  if (path.empty()) {
    rt.unavailable_reason = "the CUDA runtime (libcudart) is not loaded in this process";
    return rt;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) {
    rt.unavailable_reason = "could not open the loaded CUDA runtime " + path;
    return rt;
  }
  rt.host_register = reinterpret_cast<decltype(rt.host_register)>(dlsym(handle, "cudaHostRegister"));
  rt.host_unregister = reinterpret_cast<decltype(rt.host_unregister)>(dlsym(handle, "cudaHostUnregister"));
  rt.get_last_error = reinterpret_cast<decltype(rt.get_last_error)>(dlsym(handle, "cudaGetLastError"));
  rt.error_string = reinterpret_cast<decltype(rt.error_string)>(dlsym(handle, "cudaGetErrorString"));
  if (!rt.host_register || !rt.host_unregister || !rt.get_last_error || !rt.error_string) {
    rt = CudaHostRuntime{};
    rt.unavailable_reason = "the CUDA runtime " + path + " lacks cudaHostRegister/cudaHostUnregister";
  }
  return rt;
}

const CudaHostRuntime& cuda_host_runtime() {
  static const CudaHostRuntime runtime = load_cuda_host_runtime();
  return runtime;
}

}  // namespace

std::string cuda_host_register_unavailable_reason() { return cuda_host_runtime().unavailable_reason; }

HostAllocation allocate_host(size_t nbytes, size_t alignment, bool pin) {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1)) != 0) {
    throw std::invalid_argument("alignment must be a power of two >= " + std::to_string(sizeof(void*)) +
                                ", got " + std::to_string(alignment));
  }
  HostAllocation a;
  a.nbytes = (nbytes + alignment - 1) / alignment * alignment;
  if (a.nbytes == 0) a.nbytes = alignment;  // a valid, aligned pointer even for empty buffers
  if (posix_memalign(&a.data, alignment, a.nbytes) != 0) throw std::bad_alloc();
  if (!pin) return a;
  const CudaHostRuntime& rt = cuda_host_runtime();
  if (rt.host_register == nullptr) {
    a.pin_reason = rt.unavailable_reason;
    return a;
  }
  const CudaError err = rt.host_register(a.data, a.nbytes, 0 /* cudaHostRegisterDefault */);
  if (err == 0) {
    a.pinned = true;
  } else {
    rt.get_last_error();  // clear it, or torch would report it at its next CUDA call
    a.pin_reason = std::string("cudaHostRegister failed: ") + rt.error_string(err);
  }
  return a;
}

void free_host(void* data, bool pinned) {
  if (data == nullptr) return;
  if (pinned) {
    const CudaHostRuntime& rt = cuda_host_runtime();
    // At interpreter exit the runtime may already be shutting down; the memory is freed anyway.
    if (rt.host_unregister(data) != 0) rt.get_last_error();
  }
  std::free(data);
}

}  // namespace zerokit
