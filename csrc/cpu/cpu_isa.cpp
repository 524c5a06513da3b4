// Which x86 level the CPU kernels run at (common.h, CpuIsa): found once from the CPU, capped by the environment
// variable CONVBERT_FAST_CPU_ISA, and visible and settable through two ops (`python -m convbert_fast info` prints it,
// the benchmark records it, the tests run every level this CPU has). And how many threads they run on.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>

#include "common.h"

namespace convbert_fast {
namespace {

constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

CpuIsa best_supported() {
#if CONVBERT_FAST_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// `level` as a CpuIsa the CPU can run; a ValueError naming `source` otherwise.
CpuIsa parse_level(c10::string_view level, const char* source) {
  const CpuIsa best = best_supported();
  for (int i = 0; i < 3; ++i) {
    if (level == kIsaNames[i]) {
      TORCH_CHECK_VALUE(i <= static_cast<int>(best), source, " = ", std::string(level), ": this CPU (or build) runs ",
                        "the kernels at most at ", kIsaNames[static_cast<int>(best)]);
      return static_cast<CpuIsa>(i);
    }
  }
  TORCH_CHECK_VALUE(false, source, " must be avx512, avx2 or baseline, got '", std::string(level), "'");
}

// -1 until the first call reads the environment.
std::atomic<int> current_level{-1};

}  // namespace

CpuIsa cpu_isa() {
  int level = current_level.load(std::memory_order_relaxed);
  if (level < 0) {
    const char* cap = std::getenv("CONVBERT_FAST_CPU_ISA");
    level = static_cast<int>(cap != nullptr && *cap != '\0' ? parse_level(cap, "CONVBERT_FAST_CPU_ISA")
                                                           : best_supported());
    current_level.store(level, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(level);
}

namespace {

std::string cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

// Returns the level in use before; kernels already running finish at the old level.
std::string set_cpu_isa(c10::string_view level) {
  const std::string previous = cpu_isa_name();
  current_level.store(static_cast<int>(parse_level(level, "set_cpu_isa: level")), std::memory_order_relaxed);
  return previous;
}

// The threads a parallel_for of the kernels' kind actually ran on: one task per thread of torch's pool, each marking
// the thread it ran on. Without OpenMP at build time, parallel_for runs the whole range inline, on this thread.
int64_t cpu_threads() {
  const int64_t pool = at::get_num_threads();
  const std::unique_ptr<std::atomic<bool>[]> ran(new std::atomic<bool>[pool]);
  for (int64_t i = 0; i < pool; ++i) ran[i].store(false);
  at::parallel_for(0, pool, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()].store(true); });
  int64_t threads = 0;
  for (int64_t i = 0; i < pool; ++i) threads += ran[i].load();
  return threads;
}

}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa_name);
  m.impl("set_cpu_isa", &set_cpu_isa);
  m.impl("cpu_threads", &cpu_threads);
}

}  // namespace convbert_fast
