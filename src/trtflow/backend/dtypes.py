"""TensorRT data types and their other spellings, in one place: by `DataType` name (as plans, network records and
the network API spell them) the torch dtype (the buffers the plan runner allocates, the values the network
executor computes) and the numpy dtype (the constants the head network adds); the head dtype's spellings; the
engine inspector's words."""

import ml_dtypes
import numpy as np
import torch

from trtflow.precisions import PRECISIONS

# DataType name -> (torch dtype, numpy dtype); numpy has no bfloat16
_DTYPES = {
    "FLOAT": (torch.float32, np.float32),
    "HALF": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, None),
    "INT8": (torch.int8, np.int8),
    "FP8": (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),  # E4M3, as TensorRT's FP8
    "UINT8": (torch.uint8, np.uint8),
    "INT32": (torch.int32, np.int32),
    "INT64": (torch.int64, np.int64),
    "BOOL": (torch.bool, np.bool_),
}
TORCH_DTYPES = {name: torch_dtype for name, (torch_dtype, _) in _DTYPES.items()}
NUMPY_DTYPES = {name: numpy_dtype for name, (_, numpy_dtype) in _DTYPES.items() if numpy_dtype is not None}

# The head dtype as trtflow.common.head.head_dtype and the executors spell it (trtflow.precisions' dtype names) ->
# DataType name; add_head also takes the name of a precision that is not quantized (fp32, fp16), whose head computes in
# that precision's own dtype. A quantized precision's name is no head dtype (its head is float).
_HEAD_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF"}
HEAD_DTYPES = {
    **_HEAD_DTYPE_NAMES,
    **{name: _HEAD_DTYPE_NAMES[row.head_dtype] for name, row in PRECISIONS.items() if not row.calibrated},
}

# The engine inspector's words: TensorRT 10 "Format/Datatype" ("Row major linear FP32", "Channel major FP16 format
# ..."); TensorRT 11 "Datatype" ("Float", "Half", "Int8"). Matched without case.
INSPECTOR_WORDS = {
    "fp32": "FLOAT",
    "float": "FLOAT",
    "fp16": "HALF",
    "half": "HALF",
    "bf16": "BF16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "fp8": "FP8",
    "int4": "INT4",
    "fp4": "FP4",
}
