// Data parallel: start reducing a bucket of gradients while backward is still computing the rest.
//
// A gradient hook on a tensor that only layer i's first op reads (parallel/overlap.rs: the previous
// layer's feed-forward output, or the embedding's) fires once every layer >= i has
// backpropagated, and their .grad are written: AccumulateGrad nodes run first in the engine's
// ready queue. The hook records CUDA event i on the backward's stream. After backward returns on the host,
// `mm_grad_events_enter(i)` makes a side stream wait for event i and current, so a collective
// issued next (ProcessGroupNCCL orders its own stream after the current one) starts on the device
// as soon as layer i is done, not when all of backward is; `mm_grad_events_leave` restores the
// previous stream.
//
// Under CUDA graph capture the hook records with cudaEventRecordExternal: the captured graph gets
// an event-record node, and every replay records the event as an eager cudaEventRecord at that
// point would (a cudaStreamWaitEvent issued after cudaGraphLaunch waits for that launch's node).
// No collective is ever captured.
//
// Entry points follow ffi_error.h: nullptr or a malloc'd message.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <memory>
#include <optional>
#include <vector>

#include "ffi_error.h"

namespace {

void cuda_ok(cudaError_t e, const char *what) {
  TORCH_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

struct Events {
  int device;
  std::vector<cudaEvent_t> ev;
  ~Events() {
    for (auto e : ev) cudaEventDestroy(e);
  }
};

}  // namespace

struct MmGradEvents {
  // Shared with the hooks, which may outlive this handle's use but never its events' last replay.
  std::shared_ptr<Events> events;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> saved;
};

extern "C" {

char *mm_grad_events_new(int device, int n, MmGradEvents **out) {
  *out = nullptr;
  return mm_ffi::guard([&] {
    TORCH_CHECK(n >= 0, "grad events: n = ", n);
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::CUDAGuard guard(index);
    auto events = std::make_shared<Events>();
    events->device = device;
    for (int i = 0; i < n; ++i) {
      cudaEvent_t e;
      cuda_ok(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      events->ev.push_back(e);
    }
    *out = new MmGradEvents{events, c10::cuda::getStreamFromPool(false, index), std::nullopt};
  });
}

void mm_grad_events_free(MmGradEvents *g) { delete g; }

// When `tensor`'s gradient is computed in a backward pass, record event i on the current stream.
char *mm_grad_events_hook(MmGradEvents *g, int i, void *tensor) {
  return mm_ffi::guard([&] {
    TORCH_CHECK(g != nullptr && tensor != nullptr, "grad events: null handle");
    TORCH_CHECK(i >= 0 && i < static_cast<int>(g->events->ev.size()), "grad events: event ", i,
                " of ", g->events->ev.size());
    at::Tensor &t = *static_cast<at::Tensor *>(tensor);
    TORCH_CHECK(t.requires_grad(), "grad events: the hooked tensor does not require grad");
    std::shared_ptr<Events> events = g->events;
    t.register_hook([events, i](const at::Tensor &) {
      auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(events->device));
      cudaStreamCaptureStatus status;
      cuda_ok(cudaStreamIsCapturing(stream.stream(), &status), "cudaStreamIsCapturing");
      if (status == cudaStreamCaptureStatusActive) {
        cuda_ok(cudaEventRecordWithFlags(events->ev[i], stream.stream(), cudaEventRecordExternal),
                "cudaEventRecordWithFlags(external)");
      } else {
        cuda_ok(cudaEventRecord(events->ev[i], stream.stream()), "cudaEventRecord");
      }
    });
  });
}

// The side stream waits for event i's last record and becomes the current stream.
char *mm_grad_events_enter(MmGradEvents *g, int i) {
  return mm_ffi::guard([&] {
    TORCH_CHECK(g != nullptr, "grad events: null handle");
    TORCH_CHECK(!g->saved.has_value(), "grad events: enter twice without leave");
    TORCH_CHECK(i >= 0 && i < static_cast<int>(g->events->ev.size()), "grad events: event ", i,
                " of ", g->events->ev.size());
    auto index = static_cast<c10::DeviceIndex>(g->events->device);
    cuda_ok(cudaStreamWaitEvent(g->side.stream(), g->events->ev[i], 0), "cudaStreamWaitEvent");
    g->saved = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::setCurrentCUDAStream(g->side);
  });
}

// The stream current before mm_grad_events_enter is current again.
char *mm_grad_events_leave(MmGradEvents *g) {
  return mm_ffi::guard([&] {
    TORCH_CHECK(g != nullptr, "grad events: null handle");
    TORCH_CHECK(g->saved.has_value(), "grad events: leave without enter");
    c10::cuda::setCurrentCUDAStream(*g->saved);
    g->saved.reset();
  });
}
}
