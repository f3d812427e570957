"""Named pooling cases shared by the pooling tests (and the benchmarks' smoke mode)."""
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LAYOUTS = [False, True]
LAYOUT_IDS = ["nchw", "nhwc"]

# (input shape, torch.nn.functional.max_pool2d keyword arguments)
MAX_POOL_CASES = {
    "vgg_2x2_s2": ((2, 8, 8, 8), dict(kernel_size=2, stride=2)),
    "alexnet_3x3_s2_overlap": ((2, 5, 13, 13), dict(kernel_size=3, stride=2)),
    "odd_size_ceil_mode": ((2, 3, 9, 10), dict(kernel_size=2, stride=2, ceil_mode=True)),
    "overlap_ceil_mode_pad": ((1, 4, 10, 7), dict(kernel_size=3, stride=2, padding=1,
                                                  ceil_mode=True)),
    "pad_1_stride_1": ((2, 3, 6, 6), dict(kernel_size=3, stride=1, padding=1)),
    "dilation_2": ((1, 6, 11, 9), dict(kernel_size=3, stride=2, padding=1, dilation=2)),
    "non_square": ((2, 3, 9, 11), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0))),
    "stride_3_no_divide": ((1, 3, 11, 10), dict(kernel_size=3, stride=3)),
    "wide_channels": ((1, 70, 5, 4), dict(kernel_size=2, stride=1)),
}

# (input shape, torch.nn.functional.avg_pool2d keyword arguments)
AVG_POOL_CASES = {
    "lenet_2x2_s2": ((2, 6, 8, 8), dict(kernel_size=2, stride=2)),
    "overlap_3x3_s2": ((2, 5, 9, 9), dict(kernel_size=3, stride=2)),
    "pad_count_include": ((2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1)),
    "pad_count_exclude": ((2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1,
                                             count_include_pad=False)),
    "ceil_mode_include": ((1, 4, 9, 10), dict(kernel_size=2, stride=2, padding=1,
                                              ceil_mode=True)),
    "ceil_mode_exclude": ((1, 4, 9, 10), dict(kernel_size=3, stride=2, padding=1,
                                              ceil_mode=True, count_include_pad=False)),
    "divisor_override": ((2, 3, 8, 8), dict(kernel_size=3, stride=2, padding=1,
                                            divisor_override=5)),
    "non_square": ((1, 3, 9, 11), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1))),
    "wide_channels": ((1, 70, 5, 4), dict(kernel_size=2, stride=1)),
}

# (input shape, output_size)
ADAPTIVE_CASES = {
    "alexnet_13_to_6": ((2, 4, 13, 13), (6, 6)),
    "divisible_8_to_4": ((2, 3, 8, 8), (4, 4)),
    "global_to_1": ((2, 5, 7, 5), (1, 1)),
    "non_square_9x7_to_4x3": ((1, 3, 9, 7), (4, 3)),
    "upsample_3_to_5": ((1, 3, 3, 4), (5, 7)),
    "keep_width_none": ((1, 3, 10, 6), (4, None)),
}


def layout_variants(cases: dict) -> list:
    """pytest params (case, dtype, channels_last), with ids ``case-dtype-layout``: every case
    in both layouts (dense channels_last and strided take different paths in the kernels),
    the dtype rotating through DTYPES over the cases and layouts, so that each dtype meets
    both layouts; the kernels only load and store it (their sums are fp32)."""
    return [pytest.param(case, DTYPES[k % len(DTYPES)], channels_last,
                         id=f"{name}-{DTYPE_IDS[k % len(DTYPES)]}-{LAYOUT_IDS[j]}")
            for i, (name, case) in enumerate(cases.items())
            for j, channels_last in enumerate(LAYOUTS) for k in [2 * i + j]]
