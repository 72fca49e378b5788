#include "async_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace zerokit {
namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)); }

bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kIoAlignment == 0; }

size_t round_up(size_t n) { return (n + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

std::string describe(const char* op, size_t nbytes, int64_t offset, const std::string& path) {
  return std::string(op) + " of " + std::to_string(nbytes) + " bytes at offset " + std::to_string(offset) +
         " in " + path;
}

// Writes all of buf; returns an error message or "".
std::string write_fully(int fd, const char* buf, size_t nbytes, int64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < nbytes) {
    const ssize_t n = ::pwrite(fd, buf + done, nbytes - done, offset + static_cast<int64_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return describe("pwrite", nbytes, offset, path) + " failed: " + errno_text(errno);
    if (n == 0) return describe("pwrite", nbytes, offset, path) + " made no progress";
    done += static_cast<size_t>(n);
  }
  return "";
}

// Reads up to `want` bytes, of which at least `need` must exist before end of file.
std::string read_at_least(int fd, char* buf, size_t want, size_t need, int64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < want) {
    const ssize_t n = ::pread(fd, buf + done, want - done, offset + static_cast<int64_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return describe("pread", need, offset, path) + " failed: " + errno_text(errno);
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  if (done < need) {
    return describe("pread", need, offset, path) + " hit end of file after " + std::to_string(done) +
           " bytes (was this extent written?)";
  }
  return "";
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t nbytes) {
    if (posix_memalign(&data, kIoAlignment, nbytes) != 0) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void* data = nullptr;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// IoFile

IoFile::IoFile(int fd, std::string path, bool direct, std::string fallback_reason)
    : fd_(fd), path_(std::move(path)), direct_(direct), fallback_reason_(std::move(fallback_reason)) {}

std::shared_ptr<IoFile> IoFile::open(const std::string& path, bool create, bool direct) {
  const int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0);
  std::string reason;
  if (direct) {
#ifdef O_DIRECT
    const int fd = ::open(path.c_str(), flags | O_DIRECT, 0600);
    if (fd >= 0) return std::shared_ptr<IoFile>(new IoFile(fd, path, true, ""));
    if (errno != EINVAL) throw std::runtime_error("cannot open " + path + ": " + errno_text(errno));
    reason = "the filesystem does not support O_DIRECT (open returned EINVAL); using buffered I/O";
#else
    reason = "O_DIRECT is not available on this platform; using buffered I/O";
#endif
  }
  const int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + errno_text(errno));
  return std::shared_ptr<IoFile>(new IoFile(fd, path, false, reason));
}

IoFile::~IoFile() {
  if (fd_ >= 0) ::close(fd_);
}

void IoFile::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (fd_ < 0) return;
  if (in_flight_ > 0) {
    throw std::runtime_error("cannot close " + path_ + ": " + std::to_string(in_flight_) +
                             " I/O blocks are still in flight; wait for its requests first");
  }
  ::close(fd_);
  fd_ = -1;
}

bool IoFile::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fd_ < 0;
}

// ---------------------------------------------------------------------------------------------
// IoRequest

IoRequest::IoRequest(size_t nbytes, int64_t blocks, std::shared_ptr<void> keep_alive)
    : nbytes_(nbytes), remaining_(blocks), keep_alive_(blocks > 0 ? std::move(keep_alive) : nullptr) {}

bool IoRequest::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return remaining_ == 0;
}

void IoRequest::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  finished_.wait(lock, [this] { return remaining_ == 0; });
  if (!error_.empty()) throw std::runtime_error(error_);
}

std::string IoRequest::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void IoRequest::finish_block(const std::string& error) {
  std::shared_ptr<void> release;  // dropped outside the lock: it may free the buffer
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error.empty() && error_.empty()) error_ = error;
    if (--remaining_ > 0) return;
    release = std::move(keep_alive_);
  }
  finished_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// IoPool

IoPool::IoPool(int num_threads, size_t block_size) : block_size_(block_size) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
  if (block_size == 0 || block_size % kIoAlignment != 0) {
    throw std::invalid_argument("block_size must be a positive multiple of " + std::to_string(kIoAlignment) +
                                ", got " + std::to_string(block_size));
  }
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

IoPool::~IoPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_available_.notify_all();
  for (std::thread& t : workers_) t.join();
}

std::shared_ptr<IoRequest> IoPool::submit(const std::shared_ptr<IoFile>& file, void* buffer, size_t nbytes,
                                          int64_t offset, bool write, std::shared_ptr<void> keep_alive) {
  if (offset < 0 || offset % static_cast<int64_t>(kIoAlignment) != 0) {
    throw std::invalid_argument("file offset " + std::to_string(offset) + " is not a non-negative multiple of " +
                                std::to_string(kIoAlignment) + "; place extents at aligned offsets");
  }
  const int64_t blocks = static_cast<int64_t>((nbytes + block_size_ - 1) / block_size_);
  auto request = std::make_shared<IoRequest>(nbytes, blocks, std::move(keep_alive));
  if (blocks == 0) return request;
  {
    std::lock_guard<std::mutex> file_lock(file->mutex_);
    if (file->fd_ < 0) throw std::invalid_argument("file " + file->path_ + " is closed");
    file->in_flight_ += blocks;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t b = 0; b < blocks; ++b) {
      const size_t start = static_cast<size_t>(b) * block_size_;
      const size_t length = std::min(block_size_, nbytes - start);
      queue_.push_back(Block{file, request, static_cast<char*>(buffer) + start, length,
                             offset + static_cast<int64_t>(start), write});
    }
  }
  work_available_.notify_all();
  return request;
}

void IoPool::worker_loop() {
  std::unique_ptr<AlignedBuffer> bounce;  // allocated on first need, block_size_ bytes
  for (;;) {
    Block block;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_available_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and all work done
      block = std::move(queue_.front());
      queue_.pop_front();
    }
    IoFile& file = *block.file;
    std::string error;
    try {
      // O_DIRECT needs aligned address, length and offset; anything else goes via the bounce buffer.
      const bool via_bounce = file.direct_ && (!is_aligned(block.buffer) || block.nbytes % kIoAlignment != 0);
      if (!via_bounce) {
        error = block.write ? write_fully(file.fd_, block.buffer, block.nbytes, block.offset, file.path_)
                            : read_at_least(file.fd_, block.buffer, block.nbytes, block.nbytes, block.offset,
                                            file.path_);
      } else {
        if (!bounce) bounce = std::make_unique<AlignedBuffer>(block_size_);
        char* staging = static_cast<char*>(bounce->data);
        const size_t padded = round_up(block.nbytes);
        if (block.write) {
          std::memcpy(staging, block.buffer, block.nbytes);
          std::memset(staging + block.nbytes, 0, padded - block.nbytes);
          error = write_fully(file.fd_, staging, padded, block.offset, file.path_);
        } else {
          error = read_at_least(file.fd_, staging, padded, block.nbytes, block.offset, file.path_);
          if (error.empty()) std::memcpy(block.buffer, staging, block.nbytes);
        }
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(file.mutex_);
      --file.in_flight_;
    }
    block.request->finish_block(error);
  }
}

}  // namespace zerokit
