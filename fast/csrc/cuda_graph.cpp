// Capture of a whole training step as one CUDA graph (at::cuda::CUDAGraph), replayed each step.
// The step is a Rust callback run on a side stream between capture_begin and capture_end, as
// torch.cuda.graph does; everything it touches must keep static shapes and addresses.
//
// Only device-generic c10 guards, streams and events here (c10::DeviceGuard, c10::StreamGuard,
// c10::Event): their CUDA implementations live in libc10_cuda, so this file calls no CUDA runtime
// function itself and the binary needs no libcudart of its own (the CUDA-specific guard headers
// inline cudart calls).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdlib>

#include "ffi_error.h"

namespace {
// b waits for all work queued on a so far (stream.wait_stream in Python).
void wait_stream(const c10::Stream &b, const c10::Stream &a) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(a);
  ev.block(b);
}
}  // namespace

extern "C" {
typedef int (*mm_step_fn)(void *ctx);


// Warm up `warmup` times on a side stream, then capture one call of `step` into a new graph.
// A callback returning non-zero aborts the capture with an error.
char *mm_graph_capture(int device, int warmup, mm_step_fn step, void *ctx, void **out) {
  try {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::DeviceGuard device_guard(c10::Device(c10::DeviceType::CUDA, index));
    c10::Stream side = c10::cuda::getStreamFromPool(false, index).unwrap();
    c10::Stream main = c10::cuda::getCurrentCUDAStream(index).unwrap();
    wait_stream(side, main);
    auto graph = new at::cuda::CUDAGraph();
    {
      c10::StreamGuard stream_guard(side);
      for (int i = 0; i < warmup; ++i) {
        if (step(ctx) != 0) {
          delete graph;
          return mm_ffi::c_string("the step failed during graph warm-up");
        }
      }
      side.synchronize();
      // The graph allocates from a private pool; blocks the warm-up left cached in the ordinary
      // pool would stay reserved beside it (at large batches capture then ran out of memory), so
      // they go back to the driver first.
      c10::cuda::CUDACachingAllocator::emptyCache();
      graph->capture_begin();
      int rc = step(ctx);
      graph->capture_end();
      if (rc != 0) {
        delete graph;
        return mm_ffi::c_string("the step failed during graph capture");
      }
    }
    wait_stream(main, side);
    *out = graph;
    return nullptr;
  } catch (const std::exception &e) {
    return mm_ffi::c_string(e.what());
  } catch (...) {
    return mm_ffi::c_string("unknown C++ exception during graph capture");
  }
}

char *mm_graph_replay(void *g) {
  try {
    static_cast<at::cuda::CUDAGraph *>(g)->replay();
    return nullptr;
  } catch (const std::exception &e) {
    return mm_ffi::c_string(e.what());
  }
}

void mm_graph_free(void *g) { delete static_cast<at::cuda::CUDAGraph *>(g); }

// The caching allocator's peak bytes since the last reset (torch.cuda.max_memory_allocated and
// max_memory_reserved); -1 for both where there is no such CUDA device (nothing is thrown into
// Rust).
void mm_cuda_peak_memory(int device, int64_t *allocated, int64_t *reserved) {
  *allocated = -1;
  *reserved = -1;
  try {
    auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].peak;
    *reserved = stats.reserved_bytes[agg].peak;
  } catch (...) {
  }
}

// Does nothing where there is no such CUDA device.
void mm_cuda_reset_peak_memory(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (...) {
  }
}
}
