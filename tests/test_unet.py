import math

import pytest
import torch
import torch.nn.functional as F

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
    # each of the 18 block convolutions drops its bias (out) and gains a scale and a shift
    # (2 out): + out per convolution, 2 x (16+32+64+128) + 2 x 256 + 2 x (128+64+32+16) = 1472
    assert count_parameters(net) == 2_158_833 + 1472
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 40)])
def test_sides_not_multiple_of_16_are_refused(shape):
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(3)(torch.randn(*shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="in_channels"):
        UNet(3)(torch.randn(1, 1, 32, 32))


def test_keras_initialisations():
    torch.manual_seed(0)
    net = UNet(3, init="he_normal")
    conv = net.encoders[1][0]  # 16 -> 32 channels, fan_in 16 * 9
    assert conv.weight.std().item() == pytest.approx((2 / 144) ** 0.5, rel=0.05)
    assert conv.bias.abs().max().item() == 0.0
    assert count_parameters(UNet(3, init="glorot_uniform")) == 2_158_833
    with pytest.raises(ValueError, match="unknown init"):
        UNet(3, init="orthogonal")


def test_soft_dice_loss_per_channel():
    from cellseg.module import segmentation_loss, soft_dice_loss

    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1
    target[:, 1, 2, 2:6] = 1
    perfect = target * 40 - 20
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    wrong_contours = perfect.clone()
    wrong_contours[:, 1] = -20  # a thin channel missed entirely costs about half the loss
    # contour Dice = eps / (8 + eps) = 1 / 9 with eps = 1; foreground Dice = 1
    assert soft_dice_loss(wrong_contours, target).item() == pytest.approx((1 - 1 / 9) / 2)
    assert segmentation_loss("dice_bce", perfect, target).item() < 0.01
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss("focal", perfect, target)


def test_dice_bce_is_bce_plus_one_minus_soft_dice_by_hand():
    from cellseg.module import segmentation_loss

    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere: BCE = ln 2 per pixel
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # soft Dice with eps = 1: (2 x 0.5 x 2 + 1) / (2 + 2 + 1) = 3/5
    assert segmentation_loss("bce", logits, target).item() == pytest.approx(math.log(2))
    assert segmentation_loss("dice_bce", logits, target).item() == pytest.approx(
        math.log(2) + 1 - 3 / 5
    )
    # a weight map weighs each pixel's cross-entropy in the contour channel, not the foreground:
    # ln 2 x (4 foreground pixels + 1 + 4 + 1 + 1 contour pixels) / 8
    weight = torch.tensor([[[1.0, 4.0], [1.0, 1.0]]])
    two = logits.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1)
    assert segmentation_loss("bce", *two, weight).item() == pytest.approx(math.log(2) * 11 / 8)


def test_dice_leaves_the_centre_offsets_out():
    """Channels 3 and 4 (centre offsets, 0.5 in the background) are no masks: cross-entropy
    only."""
    from cellseg.module import segmentation_loss, soft_dice_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 8, 8), torch.rand(2, 5, 8, 8)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    expected = bce + soft_dice_loss(logits[:, :3], target[:, :3])
    assert segmentation_loss("dice_bce", logits, target).item() == pytest.approx(expected.item())
    assert expected.item() != pytest.approx((bce + soft_dice_loss(logits, target)).item())


def test_folded_batch_norm_gives_the_same_logits_without_batch_norm():
    """Prediction folds each batch norm into its convolution: the same function (to float
    rounding) with no batch norm left; a network still training is refused."""
    from torch import nn

    from cellseg.unet import fold_batch_norm

    torch.manual_seed(0)
    net = UNet(3, out_channels=3, batch_norm=True)
    for m in net.modules():  # statistics and affine away from the identity they start at
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    x = torch.randn(2, 3, 64, 48)
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norm(net)
    with torch.no_grad():
        expected = net.eval()(x)
        folded = fold_batch_norm(net)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        weights = sum(p.numel() for p in folded.parameters())  # the convolutions' biases back
        assert weights == count_parameters(UNet(3, out_channels=3))
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
