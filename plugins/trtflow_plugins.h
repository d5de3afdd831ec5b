/*
 * trtflow custom-plugin library: the C ABI of libtrtflow_plugins.so.
 *
 * Everything crossing this boundary is a plain C type so that ctypes (trtflow.common.plugins), a
 * TensorRT IPluginV3 enqueue and a C++ program can all call it. Bump TRTFLOW_PLUGINS_ABI_VERSION
 * whenever a signature or a meaning changes: loaders refuse a library whose version differs.
 */
#ifndef TRTFLOW_PLUGINS_H
#define TRTFLOW_PLUGINS_H

#ifdef __cplusplus
extern "C" {
#endif

#define TRTFLOW_PLUGINS_ABI_VERSION 2

/* Most FPN levels one MultiLevelRoIAlign call pools from (p2..p6). */
#define TRTFLOW_MAX_LEVELS 5

/* Feature / output element types. RoIs are always float32. */
#define TRTFLOW_DTYPE_FLOAT32 0
#define TRTFLOW_DTYPE_FLOAT16 1

/*
 * Memory layout of the feature maps (the output is always NCHW).
 * NCHW: (batch, channels, height, width) contiguous.
 * NHWC: channels last, (batch, height, width, channels) contiguous: torch.channels_last,
 *       TensorRT's HWC.
 * NHWC8: channels last with channels padded to a multiple of 8: TensorRT's HWC8.
 * The channels-last kernel reads channel pairs with one load: an even channel count (or pixel
 * stride) and maps aligned to two elements take it, others a slower per-element path.
 */
#define TRTFLOW_LAYOUT_NCHW 0
#define TRTFLOW_LAYOUT_NHWC 1
#define TRTFLOW_LAYOUT_NHWC8 2

/* Argument errors are negative; positive return values are cudaError_t codes. */
#define TRTFLOW_OK 0
#define TRTFLOW_ERROR_NUM_LEVELS (-1)
#define TRTFLOW_ERROR_SHAPE (-2)
#define TRTFLOW_ERROR_DTYPE (-3)
#define TRTFLOW_ERROR_NULL_POINTER (-4)
#define TRTFLOW_ERROR_OUTPUT_SIZE (-5)
#define TRTFLOW_ERROR_LEVEL_RANGE (-6)
#define TRTFLOW_ERROR_LAYOUT (-7)

int trtflow_plugins_abi_version(void);

/* Message for any return code of this library (argument errors and CUDA errors alike). */
const char* trtflow_plugins_error_string(int code);

/*
 * torchvision MultiScaleRoIAlign on the GPU, all levels in one launch.
 *
 * features[l]   device pointer, (batch, channels, heights[l], widths[l]) in `layout`, dtype
 * rois          device pointer, (num_rois, 5) float32: batch index, x1, y1, x2, y2 in input pixels
 * output        device pointer, (num_rois, channels, out_h, out_w) contiguous, dtype
 * first_level   k of the first level: its spatial scale is 2^-k, level l has 2^-(k+l)
 * canonical_*   torchvision LevelMapper's canonical scale (224) and level (k0 = 4)
 * stream        cudaStream_t
 * Runs asynchronously on `stream`; returns 0, a negative argument error, or a cudaError_t.
 */
int trtflow_multilevel_roi_align(const void* const* features, int num_levels, const int* heights,
                                 const int* widths, int batch, int channels, const float* rois,
                                 int num_rois, void* output, int out_h, int out_w,
                                 int sampling_ratio, int aligned, int first_level,
                                 int canonical_scale, int canonical_level, int layout, int dtype,
                                 void* stream);

/*
 * The same operation on host memory (float32 only), built from the kernel's own sampling code:
 * the reference that CPU-only CI checks against torchvision.
 */
int trtflow_multilevel_roi_align_host(const float* const* features, int num_levels,
                                      const int* heights, const int* widths, int batch,
                                      int channels, const float* rois, int num_rois,
                                      float* output, int out_h, int out_w, int sampling_ratio,
                                      int aligned, int first_level, int canonical_scale,
                                      int canonical_level, int layout);

#ifdef __cplusplus
}
#endif

#endif /* TRTFLOW_PLUGINS_H */
