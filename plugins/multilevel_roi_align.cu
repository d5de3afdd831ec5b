/*
 * MultiLevelRoIAlign: torchvision's MultiScaleRoIAlign (LevelMapper + RoIAlign on every FPN
 * level) in one CUDA kernel.
 *
 * Semantics follow torchvision exactly: LevelMapper (floor(k0 + log2(sqrt(area) / s0) + 1e-6),
 * clamped to the pyramid; a negative-area RoI maps to no level and stays zero), RoIAlign's
 * sampling grid (sampling_ratio, adaptive when <= 0), its bilinear rule (samples beyond
 * [-1, size] are zero, others clamp to the border), `aligned`'s half-pixel offset and the bin
 * average. Accumulation is float32 for both dtypes. For finite features the results match
 * torchvision to float32 rounding; a non-finite value in a zero-weight tap can turn a bin NaN
 * where torchvision skips that tap.
 *
 * Why it is fast: torchvision runs one kernel per level plus nonzero / index / scatter passes;
 * here one launch maps levels in the kernel. One block takes one RoI and a slice of 64 channels;
 * blocks run RoI-fastest, so the blocks resident together read one channel slice of the pyramid,
 * which stays in L2. The work is a gather from L2, and the maps' layout decides its cost:
 * - NCHW maps (the row layout): a warp's lanes are the RoI's sample taps along x, so one load
 *   reads a map row's whole segment; sample rows and weights are computed once per block; each
 *   lane carries four channels. Bound by L2 -> SM traffic (float32: L2 ~93 % of peak), as each
 *   row segment fetches whole 32-byte sectors of which the RoI uses a part.
 * - Channels-last maps (NHWC, TensorRT's HWC / HWC8): a tap is the slice's channels of one
 *   pixel, contiguous, so every sector fetched is used; warps take output bins, lanes channel
 *   pairs. About 1.7x faster than NCHW at float32 (docs/BENCHMARKS.md).
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>

#include "trtflow_plugins.h"

namespace trtflow {
namespace {

// Launch geometry; trtflow/backend/roi_align_plugin.py repeats kThreads and kChannelsPerBlock.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSM = 4;  // caps registers at 64 (no spills): 32 warps per SM
// Channels-last blocks are issue-bound: 48 registers (no spills) and 40 warps per SM measured
// 3-7 % faster than 64 and 32 on an H100; 40 registers spill. Only sm_80 and sm_90+ have the
// shared memory for a fifth block (Turing also lacks the threads).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ >= 900)
constexpr int kMinBlocksPerSMChannelsLast = 5;
#else
constexpr int kMinBlocksPerSMChannelsLast = 4;
#endif
constexpr int kChannelsPerBlock = 64;
constexpr int kPlanes = 4;  // channels a lane carries at once (loads in flight per sample row)
constexpr int kMaxSamplesPerAxis = 128;  // sample rows / columns a fast path keeps in tables
constexpr int kStagePerWarp = 1024;
constexpr float kLevelMapperEps = 1e-6f;

template <typename T>
struct FeaturePyramid {
  const T* data[TRTFLOW_MAX_LEVELS];
  int height[TRTFLOW_MAX_LEVELS];
  int width[TRTFLOW_MAX_LEVELS];
  int num_levels;
  int first_level;
};

struct PoolerParams {
  int num_rois;
  int batch;
  int channels;
  int pixel_stride;  // channels-last maps: elements from one pixel to the next (>= channels)
  int out_h;
  int out_w;
  int sampling_ratio;
  int aligned;
  int canonical_scale;
  int canonical_level;
};

/* Where and how densely one RoI is sampled. level < 0 means the RoI pools to zeros. */
struct RoiPlan {
  int batch;
  int level;
  float start_y;
  float start_x;
  float bin_h;
  float bin_w;
  int grid_h;
  int grid_w;
};

/* One bilinear axis of a sample: the two neighbouring pixels and their weights. */
struct AxisTaps {
  bool valid;
  int low;
  int high;
  float w_low;
  float w_high;
};

/*
 * torchvision LevelMapper. A NaN level (negative area) is cast to an int64 that matches no level
 * in torchvision, so that RoI stays zero; one level means no mapping at all.
 */
__host__ __device__ inline int map_level(const float* roi, int num_levels, int first_level,
                                         int canonical_scale, int canonical_level) {
  if (num_levels == 1) return 0;
  const float area = (roi[3] - roi[1]) * (roi[4] - roi[2]);
  const float scale = sqrtf(area);
  float level = floorf(static_cast<float>(canonical_level) +
                       log2f(scale / static_cast<float>(canonical_scale)) + kLevelMapperEps);
  if (level != level) return -1;
  const float last_level = static_cast<float>(first_level + num_levels - 1);
  level = fminf(fmaxf(level, static_cast<float>(first_level)), last_level);
  return static_cast<int>(level) - first_level;
}

__host__ __device__ inline RoiPlan plan_roi(const float* roi, int num_levels, int first_level,
                                            const PoolerParams& p) {
  RoiPlan plan;
  plan.batch = static_cast<int>(roi[0]);
  plan.level = map_level(roi, num_levels, first_level, p.canonical_scale, p.canonical_level);
  // torchvision reads out of bounds here; an index outside the batch pools to zeros instead.
  if (plan.batch < 0 || plan.batch >= p.batch) plan.level = -1;
  // Level scales are exact powers of two, as torchvision's _infer_scale makes them.
  const float scale = ldexpf(1.0f, -(first_level + (plan.level < 0 ? 0 : plan.level)));
  const float offset = p.aligned ? 0.5f : 0.0f;
  plan.start_x = roi[1] * scale - offset;
  plan.start_y = roi[2] * scale - offset;
  float roi_w = (roi[3] * scale - offset) - plan.start_x;
  float roi_h = (roi[4] * scale - offset) - plan.start_y;
  if (!p.aligned) {
    roi_w = fmaxf(roi_w, 1.0f);
    roi_h = fmaxf(roi_h, 1.0f);
  }
  plan.bin_h = roi_h / static_cast<float>(p.out_h);
  plan.bin_w = roi_w / static_cast<float>(p.out_w);
  plan.grid_h = p.sampling_ratio > 0 ? p.sampling_ratio
                                     : static_cast<int>(ceilf(roi_h / static_cast<float>(p.out_h)));
  plan.grid_w = p.sampling_ratio > 0 ? p.sampling_ratio
                                     : static_cast<int>(ceilf(roi_w / static_cast<float>(p.out_w)));
  return plan;
}

/* Sample position `index` of bin `bin` along one axis, in torchvision's operation order. */
__host__ __device__ inline float sample_coordinate(float start, int bin, float bin_size, int index,
                                                   int grid) {
  return start + static_cast<float>(bin) * bin_size +
         static_cast<float>(index + .5f) * bin_size / static_cast<float>(grid);
}

__host__ __device__ inline AxisTaps axis_taps(float v, int size) {
  AxisTaps t;
  // Every comparison with NaN is false, so NaN coordinates count as outside, as in torchvision.
  t.valid = v >= -1.0f && v <= static_cast<float>(size);
  if (!t.valid) {
    t.low = t.high = 0;
    t.w_low = t.w_high = 0.0f;
    return t;
  }
  if (v <= 0.0f) v = 0.0f;
  t.low = static_cast<int>(v);
  if (t.low >= size - 1) {
    t.low = t.high = size - 1;
    v = static_cast<float>(t.low);
  } else {
    t.high = t.low + 1;
  }
  t.w_high = v - static_cast<float>(t.low);
  t.w_low = 1.0f - t.w_high;
  return t;
}

template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) {
  return v;
}
template <>
__device__ inline __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

__host__ __device__ inline float load_feature(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}
__device__ inline float load_feature(const __half* p) { return __half2float(__ldg(p)); }

/*
 * The pointer as a value the compiler cannot re-derive: otherwise it folds the lane's column
 * into a 64-bit index and spends five integer instructions per load instead of one IMAD.WIDE.
 */
template <typename T>
__device__ inline const T* opaque_pointer(const T* p) {
  asm("" : "+l"(p));
  return p;
}

/*
 * One output element the way torchvision computes it: the average of the bin's bilinear
 * samples. `plane` points at the channel's pixel (0, 0); pixel (y, x) is at
 * y * row_stride + x * pixel_stride (NCHW: width, 1; NHWC: width * pixel_stride, pixel_stride).
 * Serves the device's general path and the host reference.
 */
template <typename T>
__host__ __device__ inline float bin_average(const T* plane, int height, int width, size_t row_stride,
                                             int pixel_stride, const RoiPlan& plan, int ph, int pw) {
  float sum = 0.0f;
  for (int iy = 0; iy < plan.grid_h; ++iy) {
    const AxisTaps ty = axis_taps(sample_coordinate(plan.start_y, ph, plan.bin_h, iy, plan.grid_h),
                                  height);
    for (int ix = 0; ix < plan.grid_w; ++ix) {
      const AxisTaps tx = axis_taps(
          sample_coordinate(plan.start_x, pw, plan.bin_w, ix, plan.grid_w), width);
      if (!ty.valid || !tx.valid) continue;
      const float w1 = ty.w_low * tx.w_low, w2 = ty.w_low * tx.w_high;
      const float w3 = ty.w_high * tx.w_low, w4 = ty.w_high * tx.w_high;
      const T* low = plane + ty.low * row_stride;
      const T* high = plane + ty.high * row_stride;
      sum += w1 * load_feature(low + tx.low * pixel_stride) +
             w2 * load_feature(low + tx.high * pixel_stride) +
             w3 * load_feature(high + tx.low * pixel_stride) +
             w4 * load_feature(high + tx.high * pixel_stride);
    }
  }
  const int count = plan.grid_h * plan.grid_w;
  return sum / static_cast<float>(count > 1 ? count : 1);
}

__host__ __device__ inline int next_power_of_two(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

/* Whether a RoI's sampling grid fits the row layout of the fast path. */
__device__ inline bool fits_row_layout(const RoiPlan& plan, const PoolerParams& p) {
  const int taps = 2 * p.out_w * plan.grid_w;
  if (plan.grid_h <= 0 || plan.grid_w <= 0 || taps > 32) return false;
  if ((plan.grid_w & (plan.grid_w - 1)) != 0) return false;
  return p.out_h * plan.grid_h <= kMaxSamplesPerAxis && kPlanes * p.out_h * 32 <= kStagePerWarp;
}

template <typename T>
__device__ void zero_fill(T* out, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) out[i] = from_float<T>(0.0f);
}

/*
 * One sample row (column) of the RoI: its low and high map rows (columns) as element offsets,
 * and their weights.
 */
struct alignas(16) SampleOffsets {
  unsigned offset_low;
  unsigned offset_high;
  float w_low;
  float w_high;
};

/*
 * Sample i of one axis (bin i / grid, sample i % grid) with its pixels `stride` elements apart.
 * A sample outside the map reads its clamped pixels with weight 0: loads stay in bounds.
 */
__device__ inline SampleOffsets sample_offsets(float start, float bin_size, int grid, int i, int size,
                                               unsigned stride) {
  const int bin = i / grid;
  const AxisTaps t = axis_taps(sample_coordinate(start, bin, bin_size, i - bin * grid, grid), size);
  return {t.low * stride, t.high * stride, t.w_low, t.w_high};
}

struct RowLayoutScratch {
  SampleOffsets rows[kMaxSamplesPerAxis];
  float tap_weight[32];
  int2 bin_taps[8 * 16];  // per output bin (out_h <= 8, out_w <= 16): its first tap in a staged plane, in a row
  float stage[kWarps][kStagePerWarp];
};

/*
 * Row layout. Lane (j, t) handles tap t -- the low or the high pixel of one sample column --
 * of kPlanes channels of the warp's channel group j, so one load instruction reads a map
 * row's whole segment for the RoI. Each lane sums its tap down the bin's sample rows (weights
 * shared by all channels, in shared memory) and stages the sums; the output bins then add
 * their 2 gw taps with the horizontal weights and are written contiguously. kGridH / kGridW
 * fix the sampling grid at compile time (0: read it from the plan) so that the common
 * sampling_ratio 2 runs fully unrolled.
 */
template <typename T, int kGridH, int kGridW>
__device__ void pool_rows(const T* batch_base, int height, int width, const RoiPlan& plan,
                          const PoolerParams& p, int c_begin, int c_end, T* out_roi,
                          RowLayoutScratch& scratch) {
  const int gh = kGridH > 0 ? kGridH : plan.grid_h;
  const int gw = kGridW > 0 ? kGridW : plan.grid_w;
  const int group = 2 * gw;  // taps per bin
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int taps = group * p.out_w;
  const int lanes_per_group = next_power_of_two(taps);
  const int channels_per_warp = kPlanes * (32 / lanes_per_group);
  const int t = lane & (lanes_per_group - 1);
  const int j = lane / lanes_per_group;
  const int pw = t / group;
  const AxisTaps tx =
      axis_taps(sample_coordinate(plan.start_x, pw, plan.bin_w, (t >> 1) - pw * gw, gw), width);
  const bool tap_valid = t < taps && tx.valid;
  const int x = tap_valid ? ((t & 1) ? tx.high : tx.low) : 0;
  const int out_hw = p.out_h * p.out_w;

  if (threadIdx.x < p.out_h * gh) {
    scratch.rows[threadIdx.x] = sample_offsets(plan.start_y, plan.bin_h, gh, threadIdx.x, height, width);
  }
  if (threadIdx.x < 32) {
    scratch.tap_weight[threadIdx.x] = tap_valid ? ((t & 1) ? tx.w_high : tx.w_low) : 0.0f;
  }
  if (threadIdx.x < out_hw) {
    const int ph = threadIdx.x / p.out_w, bin_w = threadIdx.x - ph * p.out_w;
    scratch.bin_taps[threadIdx.x] = make_int2(ph * lanes_per_group + bin_w * group, bin_w * group);
  }
  __syncthreads();

  const float inv_count = 1.0f / static_cast<float>(gh * gw);
  const int staged_plane = p.out_h * lanes_per_group;
  const size_t plane_size = static_cast<size_t>(height) * width;
  float* warp_stage = scratch.stage[warp];

  for (int c_first = c_begin + warp * channels_per_warp; c_first < c_end;
       c_first += kWarps * channels_per_warp) {
    const T* pixel[kPlanes];
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) {
      // Lanes past the last channel read a valid plane and write nothing.
      const int c = c_first + j * kPlanes + k;
      pixel[k] = opaque_pointer(batch_base + static_cast<size_t>(c < c_end ? c : c_first) * plane_size + x);
    }
    for (int ph = 0; ph < p.out_h; ++ph) {
      float acc[kPlanes] = {};
#pragma unroll
      for (int iy = 0; iy < (kGridH > 0 ? kGridH : gh); ++iy) {
        const SampleOffsets row = scratch.rows[ph * gh + iy];
#pragma unroll
        for (int k = 0; k < kPlanes; ++k) {
          acc[k] += row.w_low * load_feature(pixel[k] + row.offset_low);
          acc[k] += row.w_high * load_feature(pixel[k] + row.offset_high);
        }
      }
#pragma unroll
      for (int k = 0; k < kPlanes; ++k) {
        warp_stage[(j * kPlanes + k) * staged_plane + ph * lanes_per_group + t] = acc[k];
      }
    }
    __syncwarp();
    const int n_channels = min(channels_per_warp, c_end - c_first);
    T* dst = out_roi + static_cast<size_t>(c_first) * out_hw;
    int o = lane / out_hw, bin = lane - o * out_hw;
    for (int i = lane; i < n_channels * out_hw; i += 32) {
      const int2 bt = scratch.bin_taps[bin];
      const float* staged = warp_stage + o * staged_plane + bt.x;
      const float* weight = scratch.tap_weight + bt.y;
      float v;
      if (kGridW == 2) {
        const float4 s4 = *reinterpret_cast<const float4*>(staged);
        const float4 w4 = *reinterpret_cast<const float4*>(weight);
        v = w4.x * s4.x + w4.y * s4.y + w4.z * s4.z + w4.w * s4.w;
      } else {
        v = 0.0f;
        for (int r = 0; r < group; ++r) v += weight[r] * staged[r];
      }
      dst[i] = from_float<T>(v * inv_count);
      for (bin += 32; bin >= out_hw; bin -= out_hw) ++o;
    }
    __syncwarp();
  }
}

/*
 * Any grid (large adaptive grids, large outputs) and either layout: one thread per output
 * element. Channel c's pixel (y, x) is at c * channel_stride + y * row_stride + x * pixel_stride.
 */
template <typename T>
__device__ void pool_elements(const T* batch_base, int height, int width, size_t channel_stride,
                              size_t row_stride, int pixel_stride, const RoiPlan& plan,
                              const PoolerParams& p, int c_begin, int c_end, T* out_roi) {
  const int out_hw = p.out_h * p.out_w;
  const int total = (c_end - c_begin) * out_hw;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int c = c_begin + e / out_hw;
    const int bin = e % out_hw;
    const T* plane = batch_base + static_cast<size_t>(c) * channel_stride;
    const float v = bin_average(plane, height, width, row_stride, pixel_stride, plan, bin / p.out_w,
                                bin % p.out_w);
    out_roi[static_cast<size_t>(c) * out_hw + bin] = from_float<T>(v);
  }
}

/* Two neighbouring channels of one channels-last pixel, as float32. */
__device__ inline float2 load_channel_pair(const float* p) {
  return __ldg(reinterpret_cast<const float2*>(p));
}
__device__ inline float2 load_channel_pair(const __half* p) {
  return __half22float2(__ldg(reinterpret_cast<const __half2*>(p)));
}

constexpr int kMaxChannelsLastBins = 64;

struct ChannelsLastScratch {
  SampleOffsets rows[kMaxSamplesPerAxis];
  SampleOffsets cols[kMaxSamplesPerAxis];
  float stage[kChannelsPerBlock * kMaxChannelsLastBins];  // the slice's output, (C, out_h, out_w)
};

/*
 * Whether a RoI's sampling grid fits the channels-last layout of the fast path, and its channel
 * pairs are aligned for one vector load (a torch view may start anywhere).
 */
template <typename T>
__device__ inline bool fits_channels_last(const RoiPlan& plan, const PoolerParams& p, const T* batch_base) {
  return reinterpret_cast<size_t>(batch_base) % (2 * sizeof(T)) == 0 && plan.grid_h > 0 &&
         plan.grid_w > 0 && p.out_h * plan.grid_h <= kMaxSamplesPerAxis &&
         p.out_w * plan.grid_w <= kMaxSamplesPerAxis && p.out_h * p.out_w <= kMaxChannelsLastBins &&
         p.channels % 2 == 0 && p.pixel_stride % 2 == 0;
}

/*
 * Channels-last layout. A tap is the slice's channels of one pixel, contiguous, so lane l
 * reads channels 2l, 2l + 1 of it and one load instruction reads whole sectors: every byte
 * fetched is used, where NCHW rows waste the rest of their sectors. Warps take whole output
 * bins; the taps that neighbouring samples share hit L1. The slice's output is staged in
 * shared memory and written contiguously.
 */
template <typename T, int kGridH, int kGridW>
__device__ void pool_channels_last(const T* batch_base, int height, int width, const RoiPlan& plan,
                                   const PoolerParams& p, int c_begin, int c_end, T* out_roi,
                                   ChannelsLastScratch& scratch) {
  const int gh = kGridH > 0 ? kGridH : plan.grid_h;
  const int gw = kGridW > 0 ? kGridW : plan.grid_w;
  const unsigned row_stride = static_cast<unsigned>(width) * p.pixel_stride;
  for (int i = threadIdx.x; i < p.out_h * gh; i += blockDim.x) {
    scratch.rows[i] = sample_offsets(plan.start_y, plan.bin_h, gh, i, height, row_stride);
  }
  for (int i = threadIdx.x; i < p.out_w * gw; i += blockDim.x) {
    scratch.cols[i] = sample_offsets(plan.start_x, plan.bin_w, gw, i, width, p.pixel_stride);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int out_hw = p.out_h * p.out_w;
  const int pair = c_begin + 2 * lane;
  // Lanes past the last channel read the slice's first pair and write nothing.
  const T* pixel = batch_base + (pair < c_end ? pair : c_begin);
  const float inv_count = 1.0f / static_cast<float>(gh * gw);
  for (int bin = threadIdx.x >> 5; bin < out_hw; bin += kWarps) {
    const int ph = bin / p.out_w, pw = bin - ph * p.out_w;
    float2 acc = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int iy = 0; iy < (kGridH > 0 ? kGridH : gh); ++iy) {
      const SampleOffsets row = scratch.rows[ph * gh + iy];
#pragma unroll
      for (int ix = 0; ix < (kGridW > 0 ? kGridW : gw); ++ix) {
        const SampleOffsets col = scratch.cols[pw * gw + ix];
        const float2 ll = load_channel_pair(pixel + row.offset_low + col.offset_low);
        const float2 lh = load_channel_pair(pixel + row.offset_low + col.offset_high);
        const float2 hl = load_channel_pair(pixel + row.offset_high + col.offset_low);
        const float2 hh = load_channel_pair(pixel + row.offset_high + col.offset_high);
        const float w1 = row.w_low * col.w_low, w2 = row.w_low * col.w_high;
        const float w3 = row.w_high * col.w_low, w4 = row.w_high * col.w_high;
        acc.x += w1 * ll.x + w2 * lh.x + w3 * hl.x + w4 * hh.x;
        acc.y += w1 * ll.y + w2 * lh.y + w3 * hl.y + w4 * hh.y;
      }
    }
    if (pair < c_end) {
      scratch.stage[(2 * lane) * out_hw + bin] = acc.x * inv_count;
      scratch.stage[(2 * lane + 1) * out_hw + bin] = acc.y * inv_count;
    }
  }
  __syncthreads();
  T* dst = out_roi + static_cast<size_t>(c_begin) * out_hw;
  for (int i = threadIdx.x; i < (c_end - c_begin) * out_hw; i += blockDim.x) {
    dst[i] = from_float<T>(scratch.stage[i]);
  }
}

/* NCHW maps: the row layout where the RoI's grid fits it, else one thread per element. */
template <typename T>
__device__ void pool_nchw(const T* batch_base, int height, int width, const RoiPlan& plan,
                          const PoolerParams& p, int c_begin, int c_end, T* out_roi) {
  __shared__ RowLayoutScratch scratch;
  if (plan.grid_h == 2 && plan.grid_w == 2 && fits_row_layout(plan, p)) {
    pool_rows<T, 2, 2>(batch_base, height, width, plan, p, c_begin, c_end, out_roi, scratch);
  } else if (fits_row_layout(plan, p)) {
    pool_rows<T, 0, 0>(batch_base, height, width, plan, p, c_begin, c_end, out_roi, scratch);
  } else {
    pool_elements(batch_base, height, width, static_cast<size_t>(height) * width, width, 1, plan, p,
                  c_begin, c_end, out_roi);
  }
}

/* Channels-last maps: the channels-last layout where the RoI's grid fits it. */
template <typename T>
__device__ void pool_nhwc(const T* batch_base, int height, int width, const RoiPlan& plan,
                          const PoolerParams& p, int c_begin, int c_end, T* out_roi) {
  __shared__ ChannelsLastScratch scratch;
  if (plan.grid_h == 2 && plan.grid_w == 2 && fits_channels_last(plan, p, batch_base)) {
    pool_channels_last<T, 2, 2>(batch_base, height, width, plan, p, c_begin, c_end, out_roi, scratch);
  } else if (fits_channels_last(plan, p, batch_base)) {
    pool_channels_last<T, 0, 0>(batch_base, height, width, plan, p, c_begin, c_end, out_roi, scratch);
  } else {
    pool_elements(batch_base, height, width, 1, static_cast<size_t>(width) * p.pixel_stride,
                  p.pixel_stride, plan, p, c_begin, c_end, out_roi);
  }
}

/* Block (roi, channel slice): plan the RoI, then pool its channels. */
template <typename T, bool kChannelsLast>
__device__ void multilevel_roi_align_block(const FeaturePyramid<T>& pyramid,
                                           const float* __restrict__ rois, const PoolerParams& p,
                                           T* __restrict__ out) {
  const int roi_index = blockIdx.x;
  if (roi_index >= p.num_rois) return;
  const int c_begin = blockIdx.y * kChannelsPerBlock;
  if (c_begin >= p.channels) return;
  const int c_end = min(c_begin + kChannelsPerBlock, p.channels);
  const int out_hw = p.out_h * p.out_w;
  T* out_roi = out + static_cast<size_t>(roi_index) * p.channels * out_hw;

  __shared__ RoiPlan shared_plan;
  if (threadIdx.x == 0) {
    shared_plan = plan_roi(rois + 5 * static_cast<size_t>(roi_index), pyramid.num_levels,
                           pyramid.first_level, p);
  }
  __syncthreads();
  const RoiPlan plan = shared_plan;
  if (plan.level < 0) {
    zero_fill(out_roi + static_cast<size_t>(c_begin) * out_hw, (c_end - c_begin) * out_hw);
    return;
  }
  // Select the level with constant indices so the pyramid stays in parameter space.
  const T* level_data = pyramid.data[0];
  int height = pyramid.height[0], width = pyramid.width[0];
#pragma unroll
  for (int l = 1; l < TRTFLOW_MAX_LEVELS; ++l) {
    if (l == plan.level) {
      level_data = pyramid.data[l];
      height = pyramid.height[l];
      width = pyramid.width[l];
    }
  }
  const size_t image_size = static_cast<size_t>(height) * width *
                            (kChannelsLast ? p.pixel_stride : p.channels);
  const T* batch_base = level_data + static_cast<size_t>(plan.batch) * image_size;
  if (kChannelsLast) {
    pool_nhwc(batch_base, height, width, plan, p, c_begin, c_end, out_roi);
  } else {
    pool_nchw(batch_base, height, width, plan, p, c_begin, c_end, out_roi);
  }
}

}  // namespace
}  // namespace trtflow

/*
 * Kernel entries, one per (level count, dtype, map layout), with plain parameters in the order
 * TensorRT's ahead-of-time plugins launch PTX kernels: input pointers (levels, then rois),
 * int32 scalars, output pointer. All share one signature; pixel_stride (elements per
 * channels-last pixel, channels or more) is read by the nhwc entries only. The library's
 * launcher calls the same entries.
 */
#define TRTFLOW_FEATURES_1(T) const T* __restrict__ f0
#define TRTFLOW_FEATURES_2(T) TRTFLOW_FEATURES_1(T), const T* __restrict__ f1
#define TRTFLOW_FEATURES_3(T) TRTFLOW_FEATURES_2(T), const T* __restrict__ f2
#define TRTFLOW_FEATURES_4(T) TRTFLOW_FEATURES_3(T), const T* __restrict__ f3
#define TRTFLOW_FEATURES_5(T) TRTFLOW_FEATURES_4(T), const T* __restrict__ f4
#define TRTFLOW_SIZES_1 int h0, int w0
#define TRTFLOW_SIZES_2 TRTFLOW_SIZES_1, int h1, int w1
#define TRTFLOW_SIZES_3 TRTFLOW_SIZES_2, int h2, int w2
#define TRTFLOW_SIZES_4 TRTFLOW_SIZES_3, int h3, int w3
#define TRTFLOW_SIZES_5 TRTFLOW_SIZES_4, int h4, int w4
#define TRTFLOW_SET_LEVEL(l) pyramid.data[l] = f##l, pyramid.height[l] = h##l, pyramid.width[l] = w##l
#define TRTFLOW_SET_LEVELS_1 TRTFLOW_SET_LEVEL(0)
#define TRTFLOW_SET_LEVELS_2 TRTFLOW_SET_LEVELS_1; TRTFLOW_SET_LEVEL(1)
#define TRTFLOW_SET_LEVELS_3 TRTFLOW_SET_LEVELS_2; TRTFLOW_SET_LEVEL(2)
#define TRTFLOW_SET_LEVELS_4 TRTFLOW_SET_LEVELS_3; TRTFLOW_SET_LEVEL(3)
#define TRTFLOW_SET_LEVELS_5 TRTFLOW_SET_LEVELS_4; TRTFLOW_SET_LEVEL(4)

#define TRTFLOW_ENTRY(L, T, SUFFIX, LAYOUT, CHANNELS_LAST)                                       \
  extern "C" __global__ void __launch_bounds__(                                                 \
      trtflow::kThreads,                                                                        \
      CHANNELS_LAST ? trtflow::kMinBlocksPerSMChannelsLast : trtflow::kMinBlocksPerSM)          \
      trtflow_multilevel_roi_align_##L##l_##SUFFIX##_##LAYOUT(                                  \
          TRTFLOW_FEATURES_##L(T), const float* __restrict__ rois, int num_rois, int batch,     \
          int channels, int pixel_stride, TRTFLOW_SIZES_##L, int out_h, int out_w,              \
          int sampling_ratio,                                                                   \
          int aligned, int first_level, int canonical_scale, int canonical_level,               \
          T* __restrict__ out) {                                                                \
    trtflow::FeaturePyramid<T> pyramid = {};                                                    \
    TRTFLOW_SET_LEVELS_##L;                                                                     \
    pyramid.num_levels = L;                                                                     \
    pyramid.first_level = first_level;                                                          \
    const trtflow::PoolerParams p = {num_rois, batch,          channels, pixel_stride,          \
                                     out_h,    out_w,          sampling_ratio, aligned,         \
                                     canonical_scale, canonical_level};                         \
    trtflow::multilevel_roi_align_block<T, CHANNELS_LAST>(pyramid, rois, p, out);               \
  }

#define TRTFLOW_ENTRIES(L)                     \
  TRTFLOW_ENTRY(L, float, f32, nchw, false)    \
  TRTFLOW_ENTRY(L, __half, f16, nchw, false)   \
  TRTFLOW_ENTRY(L, float, f32, nhwc, true)     \
  TRTFLOW_ENTRY(L, __half, f16, nhwc, true)

TRTFLOW_ENTRIES(1)
TRTFLOW_ENTRIES(2)
TRTFLOW_ENTRIES(3)
TRTFLOW_ENTRIES(4)
TRTFLOW_ENTRIES(5)

/* ---------------------------------------------------------------------------------------- */
/* Host side: argument checks, launch, host reference.                                       */

namespace {

/*
 * Elements from one pixel to the next in a channels-last layout; 0 for an unknown layout.
 * trtflow.backend.roi_align_plugin.pixel_stride repeats it for the ahead-of-time plugin.
 */
int pixel_stride(int layout, int channels) {
  switch (layout) {
    case TRTFLOW_LAYOUT_NCHW:
    case TRTFLOW_LAYOUT_NHWC:
      return channels;
    case TRTFLOW_LAYOUT_NHWC8:
      return (channels + 7) / 8 * 8;
    default:
      return 0;
  }
}

int check_arguments(const void* const* features, int num_levels, const int* heights,
                    const int* widths, int batch, int channels, const float* rois, int num_rois,
                    const void* output, int out_h, int out_w, int first_level, int layout) {
  if (num_levels < 1 || num_levels > TRTFLOW_MAX_LEVELS) return TRTFLOW_ERROR_NUM_LEVELS;
  if (pixel_stride(layout, 1) == 0) return TRTFLOW_ERROR_LAYOUT;
  if (features == nullptr || heights == nullptr || widths == nullptr) return TRTFLOW_ERROR_NULL_POINTER;
  if (batch < 1 || channels < 1 || num_rois < 0) return TRTFLOW_ERROR_SHAPE;
  for (int l = 0; l < num_levels; ++l) {
    if (features[l] == nullptr) return TRTFLOW_ERROR_NULL_POINTER;
    if (heights[l] < 1 || widths[l] < 1) return TRTFLOW_ERROR_SHAPE;
    // The kernel offsets pixels inside one image in 32 bits.
    const size_t image = static_cast<size_t>(heights[l]) * widths[l] *
                         (layout == TRTFLOW_LAYOUT_NCHW ? 1 : pixel_stride(layout, channels));
    if (image > 0xffffffffu) return TRTFLOW_ERROR_SHAPE;
  }
  if (out_h < 1 || out_w < 1) return TRTFLOW_ERROR_OUTPUT_SIZE;
  if (first_level < 0 || first_level + num_levels > 30) return TRTFLOW_ERROR_LEVEL_RANGE;
  if (num_rois > 0 && (rois == nullptr || output == nullptr)) return TRTFLOW_ERROR_NULL_POINTER;
  return TRTFLOW_OK;
}

#define TRTFLOW_PTRS_1(T) static_cast<const T*>(features[0])
#define TRTFLOW_PTRS_2(T) TRTFLOW_PTRS_1(T), static_cast<const T*>(features[1])
#define TRTFLOW_PTRS_3(T) TRTFLOW_PTRS_2(T), static_cast<const T*>(features[2])
#define TRTFLOW_PTRS_4(T) TRTFLOW_PTRS_3(T), static_cast<const T*>(features[3])
#define TRTFLOW_PTRS_5(T) TRTFLOW_PTRS_4(T), static_cast<const T*>(features[4])
#define TRTFLOW_DIMS_1 heights[0], widths[0]
#define TRTFLOW_DIMS_2 TRTFLOW_DIMS_1, heights[1], widths[1]
#define TRTFLOW_DIMS_3 TRTFLOW_DIMS_2, heights[2], widths[2]
#define TRTFLOW_DIMS_4 TRTFLOW_DIMS_3, heights[3], widths[3]
#define TRTFLOW_DIMS_5 TRTFLOW_DIMS_4, heights[4], widths[4]
#define TRTFLOW_LAUNCH(L, T, SUFFIX, LAYOUT)                                                     \
  case L:                                                                                       \
    trtflow_multilevel_roi_align_##L##l_##SUFFIX##_##LAYOUT<<<grid, trtflow::kThreads, 0, s>>>( \
        TRTFLOW_PTRS_##L(T), rois, num_rois, batch, channels, stride, TRTFLOW_DIMS_##L, out_h,  \
        out_w, sampling_ratio, aligned, first_level, canonical_scale, canonical_level,          \
        static_cast<T*>(output));                                                               \
    break;
#define TRTFLOW_LAUNCH_ANY_LEVELS(T, SUFFIX, LAYOUT) \
  switch (num_levels) {                              \
    TRTFLOW_LAUNCH(1, T, SUFFIX, LAYOUT)             \
    TRTFLOW_LAUNCH(2, T, SUFFIX, LAYOUT)             \
    TRTFLOW_LAUNCH(3, T, SUFFIX, LAYOUT)             \
    TRTFLOW_LAUNCH(4, T, SUFFIX, LAYOUT)             \
    TRTFLOW_LAUNCH(5, T, SUFFIX, LAYOUT)             \
  }

}  // namespace

extern "C" int trtflow_plugins_abi_version(void) { return TRTFLOW_PLUGINS_ABI_VERSION; }

extern "C" const char* trtflow_plugins_error_string(int code) {
  switch (code) {
    case TRTFLOW_OK:
      return "success";
    case TRTFLOW_ERROR_NUM_LEVELS:
      return "num_levels must be between 1 and TRTFLOW_MAX_LEVELS (5)";
    case TRTFLOW_ERROR_SHAPE:
      return "batch, channels and every level's height and width must be >= 1, num_rois >= 0, and a "
             "level's plane (NCHW) or image (channels last) must hold fewer than 2^32 elements";
    case TRTFLOW_ERROR_DTYPE:
      return "dtype must be TRTFLOW_DTYPE_FLOAT32 (0) or TRTFLOW_DTYPE_FLOAT16 (1)";
    case TRTFLOW_ERROR_NULL_POINTER:
      return "a feature, rois or output pointer is null";
    case TRTFLOW_ERROR_OUTPUT_SIZE:
      return "out_h and out_w must be >= 1";
    case TRTFLOW_ERROR_LEVEL_RANGE:
      return "first_level must be >= 0 and first_level + num_levels <= 30";
    case TRTFLOW_ERROR_LAYOUT:
      return "layout must be TRTFLOW_LAYOUT_NCHW (0), TRTFLOW_LAYOUT_NHWC (1) or TRTFLOW_LAYOUT_NHWC8 (2)";
    default:
      return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

extern "C" int trtflow_multilevel_roi_align(const void* const* features, int num_levels,
                                            const int* heights, const int* widths, int batch,
                                            int channels, const float* rois, int num_rois,
                                            void* output, int out_h, int out_w,
                                            int sampling_ratio, int aligned, int first_level,
                                            int canonical_scale, int canonical_level, int layout,
                                            int dtype, void* stream) {
  const int status = check_arguments(features, num_levels, heights, widths, batch, channels, rois,
                                     num_rois, output, out_h, out_w, first_level, layout);
  if (status != TRTFLOW_OK) return status;
  if (dtype != TRTFLOW_DTYPE_FLOAT32 && dtype != TRTFLOW_DTYPE_FLOAT16) return TRTFLOW_ERROR_DTYPE;
  if (num_rois == 0) return TRTFLOW_OK;
  const dim3 grid(num_rois, (channels + trtflow::kChannelsPerBlock - 1) / trtflow::kChannelsPerBlock);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int stride = pixel_stride(layout, channels);
  const bool fp32 = dtype == TRTFLOW_DTYPE_FLOAT32;
  if (layout == TRTFLOW_LAYOUT_NCHW) {
    if (fp32) {
      TRTFLOW_LAUNCH_ANY_LEVELS(float, f32, nchw)
    } else {
      TRTFLOW_LAUNCH_ANY_LEVELS(__half, f16, nchw)
    }
  } else if (fp32) {
    TRTFLOW_LAUNCH_ANY_LEVELS(float, f32, nhwc)
  } else {
    TRTFLOW_LAUNCH_ANY_LEVELS(__half, f16, nhwc)
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int trtflow_multilevel_roi_align_host(const float* const* features, int num_levels,
                                                 const int* heights, const int* widths, int batch,
                                                 int channels, const float* rois, int num_rois,
                                                 float* output, int out_h, int out_w,
                                                 int sampling_ratio, int aligned, int first_level,
                                                 int canonical_scale, int canonical_level,
                                                 int layout) {
  const int status =
      check_arguments(reinterpret_cast<const void* const*>(features), num_levels, heights, widths,
                      batch, channels, rois, num_rois, output, out_h, out_w, first_level, layout);
  if (status != TRTFLOW_OK) return status;
  const int stride = pixel_stride(layout, channels);
  const trtflow::PoolerParams p = {num_rois, batch,          channels, stride,         out_h,
                                   out_w,    sampling_ratio, aligned,  canonical_scale, canonical_level};
  const int out_hw = out_h * out_w;
  for (int r = 0; r < num_rois; ++r) {
    const trtflow::RoiPlan plan = trtflow::plan_roi(rois + 5 * static_cast<size_t>(r), num_levels,
                                                    first_level, p);
    float* out_roi = output + static_cast<size_t>(r) * channels * out_hw;
    for (int c = 0; c < channels; ++c) {
      for (int bin = 0; bin < out_hw; ++bin) {
        float v = 0.0f;
        if (plan.level >= 0) {
          const int h = heights[plan.level], w = widths[plan.level];
          const float* image = features[plan.level] + static_cast<size_t>(plan.batch) * h * w * stride;
          v = layout == TRTFLOW_LAYOUT_NCHW
                  ? trtflow::bin_average(image + static_cast<size_t>(c) * h * w, h, w, w, 1, plan,
                                         bin / out_w, bin % out_w)
                  : trtflow::bin_average(image + c, h, w, static_cast<size_t>(w) * stride, stride,
                                         plan, bin / out_w, bin % out_w);
        }
        out_roi[static_cast<size_t>(c) * out_hw + bin] = v;
      }
    }
  }
  return TRTFLOW_OK;
}
