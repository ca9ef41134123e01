// Capture of a whole training step as one CUDA graph (at::cuda::CUDAGraph), replayed each step.
// The step is a Rust callback run on a side stream between capture_begin and capture_end, as
// torch.cuda.graph does; everything it touches must keep static shapes and addresses.
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <cstdlib>
#include <cstring>

namespace {
// b waits for all work queued on a so far (stream.wait_stream in Python).
void wait_stream(const c10::cuda::CUDAStream &b, const c10::cuda::CUDAStream &a) {
  at::cuda::CUDAEvent ev;
  ev.record(a);
  ev.block(b);
}

char *error(const char *what) {
  char *s = static_cast<char *>(std::malloc(std::strlen(what) + 1));
  std::strcpy(s, what);
  return s;
}
}  // namespace

extern "C" {
typedef int (*mm_step_fn)(void *ctx);

void mm_graph_free_error(char *e) { std::free(e); }

// Warm up `warmup` times on a side stream, then capture one call of `step` into a new graph.
// A callback returning non-zero aborts the capture with an error.
char *mm_graph_capture(int device, int warmup, mm_step_fn step, void *ctx, void **out) {
  try {
    c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
    auto side = c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
    auto main = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
    wait_stream(side, main);
    auto graph = new at::cuda::CUDAGraph();
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      for (int i = 0; i < warmup; ++i) {
        if (step(ctx) != 0) {
          delete graph;
          return error("the step failed during graph warm-up");
        }
      }
      side.synchronize();
      graph->capture_begin();
      int rc = step(ctx);
      graph->capture_end();
      if (rc != 0) {
        delete graph;
        return error("the step failed during graph capture");
      }
    }
    wait_stream(main, side);
    *out = graph;
    return nullptr;
  } catch (const std::exception &e) {
    return error(e.what());
  } catch (...) {
    return error("unknown C++ exception during graph capture");
  }
}

char *mm_graph_replay(void *g) {
  try {
    static_cast<at::cuda::CUDAGraph *>(g)->replay();
    return nullptr;
  } catch (const std::exception &e) {
    return error(e.what());
  }
}

void mm_graph_free(void *g) { delete static_cast<at::cuda::CUDAGraph *>(g); }
}
