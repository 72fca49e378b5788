// Page-aligned host memory, page-locked through the CUDA runtime when one is loaded.
#pragma once

#include <cstddef>
#include <string>

namespace zerokit {

struct HostAllocation {
  void* data = nullptr;
  size_t nbytes = 0;         // bytes reserved: the request rounded up to the alignment
  bool pinned = false;
  std::string pin_reason;    // why the memory is not pinned (empty when pinned or not asked)
};

// alignment: a power of two, at least 4096 for O_DIRECT. Throws std::bad_alloc when out of memory.
HostAllocation allocate_host(size_t nbytes, size_t alignment, bool pin);

// Releases memory from allocate_host (unregistering it first when pinned).
void free_host(void* data, bool pinned);

// Empty when the CUDA runtime's host-registration entry points were found, else the reason.
std::string cuda_host_register_unavailable_reason();

}  // namespace zerokit
