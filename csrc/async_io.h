// Asynchronous positioned file I/O on a pool of threads, O_DIRECT where the filesystem allows.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace zerokit {

// File offsets, O_DIRECT transfers and on-disk extents are multiples of this.
constexpr size_t kIoAlignment = 4096;

class IoFile {
 public:
  // Opens (or with create, creates) path read-write. With direct, tries O_DIRECT first and falls
  // back to buffered I/O when the filesystem refuses it, recording why in fallback_reason.
  static std::shared_ptr<IoFile> open(const std::string& path, bool create, bool direct);
  ~IoFile();
  IoFile(const IoFile&) = delete;
  IoFile& operator=(const IoFile&) = delete;

  // Closes the descriptor; throws if requests on this file are still in flight.
  void close();
  bool closed() const;

  const std::string& path() const { return path_; }
  bool direct() const { return direct_; }
  const std::string& fallback_reason() const { return fallback_reason_; }

 private:
  IoFile(int fd, std::string path, bool direct, std::string fallback_reason);
  friend class IoPool;

  int fd_;
  const std::string path_;
  const bool direct_;
  const std::string fallback_reason_;
  mutable std::mutex mutex_;
  int64_t in_flight_ = 0;  // blocks submitted and not yet finished; guarded by mutex_
};

class IoRequest {
 public:
  IoRequest(size_t nbytes, int64_t blocks, std::shared_ptr<void> keep_alive);
  bool done() const;
  // Blocks until every block finished; throws std::runtime_error with the first failure.
  void wait();
  std::string error() const;
  size_t nbytes() const { return nbytes_; }

 private:
  friend class IoPool;
  void finish_block(const std::string& error);

  const size_t nbytes_;
  mutable std::mutex mutex_;
  std::condition_variable finished_;
  int64_t remaining_;               // guarded by mutex_
  std::string error_;               // guarded by mutex_
  std::shared_ptr<void> keep_alive_;  // the buffer's owner, released when the last block finishes
};

class IoPool {
 public:
  // block_size: bytes per unit of work handed to a thread; a positive multiple of kIoAlignment.
  IoPool(int num_threads, size_t block_size);
  ~IoPool();  // finishes queued work, then joins the threads
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  // Reads or writes nbytes between buffer and the file at offset (a multiple of kIoAlignment).
  // keep_alive owns the buffer and is held until the request completes. With O_DIRECT an
  // unaligned buffer or tail goes through an aligned bounce buffer; a write then occupies
  // nbytes rounded up to kIoAlignment on disk (zero padded).
  std::shared_ptr<IoRequest> submit(const std::shared_ptr<IoFile>& file, void* buffer, size_t nbytes,
                                    int64_t offset, bool write, std::shared_ptr<void> keep_alive);

  int num_threads() const { return static_cast<int>(workers_.size()); }
  size_t block_size() const { return block_size_; }

 private:
  struct Block {
    std::shared_ptr<IoFile> file;
    std::shared_ptr<IoRequest> request;
    char* buffer;
    size_t nbytes;
    int64_t offset;
    bool write;
  };
  void worker_loop();

  const size_t block_size_;
  std::mutex mutex_;
  std::condition_variable work_available_;
  std::deque<Block> queue_;  // guarded by mutex_
  bool stopping_ = false;    // guarded by mutex_
  std::vector<std::thread> workers_;
};

}  // namespace zerokit
