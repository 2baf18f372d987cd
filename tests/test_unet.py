import pytest
import torch

from cellseg.unet import UNet, count_parameters


@pytest.mark.parametrize(("in_channels", "expected"), [(3, 2_158_833), (1, 2_158_545)])
def test_parameter_count_matches_the_study(in_channels, expected):
    assert count_parameters(UNet(in_channels)) == expected


@pytest.mark.parametrize(("h", "w"), [(64, 64), (16, 48), (128, 96)])
def test_output_has_input_size_and_one_channel(h, w):
    out = UNet(3)(torch.randn(2, 3, h, w))
    assert out.shape == (2, 1, h, w)


def test_batch_norm_option_adds_parameters_and_runs():
    net = UNet(3, batch_norm=True)
    assert count_parameters(net) != 2_158_833
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 40)])
def test_sides_not_multiple_of_16_are_refused(shape):
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(3)(torch.randn(*shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="in_channels"):
        UNet(3)(torch.randn(1, 1, 32, 32))
