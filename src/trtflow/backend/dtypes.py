"""TensorRT data types (by `DataType` name, as plans and network records spell them) as torch dtypes: the
buffers the plan runner allocates and the values the network executor computes."""

import torch

TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}
