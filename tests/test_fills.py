"""Fill values and widened input convs, against values written out by hand."""
from __future__ import annotations

import torch

from lib_rebasin.checkpoint import TensorInfo
from lib_rebasin.fills import FillSource, WidenedSource, widened_shape
from lib_rebasin.layout import POSITION_IDS, UNET, UNET_INPUT
from lib_rebasin.matching import StateDictSource


def test_fill_values():
    source = FillSource({POSITION_IDS: TensorInfo((1, 77), torch.int64),
                         "layer.weight": TensorInfo((3, 2), torch.float16)})
    assert torch.equal(source.get(POSITION_IDS), torch.arange(77).reshape(1, 77))
    assert source.get("layer.weight").dtype == torch.float16 and not source.get("layer.weight").any()


def test_only_the_unet_input_channels_may_differ():
    assert widened_shape(UNET_INPUT, [(320, 9, 3, 3), (320, 4, 3, 3)]) == (320, 9, 3, 3)
    assert widened_shape(UNET_INPUT, [(320, 4, 3, 3), (320, 4, 3, 3)]) == (320, 4, 3, 3)
    assert widened_shape(UNET_INPUT, [(320, 9, 3, 3), (384, 4, 3, 3)]) is None  # rows differ: other model
    assert widened_shape(UNET + "out.2.weight", [(4, 320, 3, 3), (9, 320, 3, 3)]) is None


def test_a_normal_input_conv_is_widened_with_the_inpainting_channels():
    g = torch.Generator().manual_seed(0)
    inpaint = torch.randn(8, 9, 3, 3, generator=g).to(torch.float32)
    normal = torch.randn(8, 4, 3, 3, generator=g).to(torch.float16)
    widened = WidenedSource(StateDictSource({UNET_INPUT: normal, "other": normal[0]}),
                            {UNET_INPUT: StateDictSource({UNET_INPUT: inpaint})}, {UNET_INPUT: (8, 9, 3, 3)})
    out = widened.get(UNET_INPUT)
    assert out.shape == (8, 9, 3, 3) and out.dtype == torch.float32
    assert torch.equal(out[:, :4], normal.float()) and torch.equal(out[:, 4:], inpaint[:, 4:])
    assert widened.shapes[UNET_INPUT] == (8, 9, 3, 3) and torch.equal(widened.get("other"), normal[0])
    same = WidenedSource(StateDictSource({UNET_INPUT: inpaint}), {UNET_INPUT: StateDictSource({UNET_INPUT: normal})},
                         {UNET_INPUT: (8, 9, 3, 3)})
    assert same.get(UNET_INPUT) is inpaint  # already wide: read as it is
