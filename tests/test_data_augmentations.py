"""Multi-crop augmentation against torchvision's classic (v1) transforms."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from dinov2.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DataAugmentationDINO, normalize_crops

OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rgb():
    rs = np.random.RandomState(0)
    smooth = np.kron(rs.randint(0, 255, (8, 8, 3)), np.ones((5, 5, 1))).astype(np.uint8)
    return Image.fromarray(smooth)  # 40x40, with structure so blur / flips change it


def _reference(img, size, *extra):
    # The official pipeline's operations, applied with torchvision's v1 transforms.
    ops = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), *extra,
           T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(ops)(img)


def _aug(**kw):
    args = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=2,
                global_crops_size=24, local_crops_size=12)
    args.update(OFF)
    args.update(kw)
    return DataAugmentationDINO(**args)


def test_output_structure():
    aug = DataAugmentationDINO(local_crops_number=3, global_crops_size=32, local_crops_size=16)
    out = aug(Image.new("RGB", (50, 40), (10, 200, 30)), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [t.shape for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    assert out["offsets"] == () and out["global_crops"][0].dtype == torch.float32


def test_full_crop_without_random_ops_equals_resize_totensor_normalize(rgb):
    out = _aug()(rgb, generator=torch.Generator().manual_seed(0))
    ref = _reference(rgb, 24)
    assert torch.equal(out["global_crops"][0], ref) and torch.equal(out["global_crops"][1], ref)
    assert torch.equal(out["local_crops"][0], _reference(rgb, 12))


def test_flip(rgb):
    out = _aug(flip_p=1.0)(rgb, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["global_crops"][0], _reference(rgb, 24, T.RandomHorizontalFlip(p=1.0)))


def test_rotation_is_torchvision_rotate_of_the_crop(rgb):
    aug = _aug(rotation_degrees=40.0, global_crops_scale=(0.5, 1.0))
    g = torch.Generator().manual_seed(3)
    params = [aug.sample_crop_params(g, 40, 40, scale=(0.5, 1.0), blur_p=0.0, solarize_p=0.0) for _ in range(4)]
    for p in params:
        assert p.angle != 0.0
        top, left, h, w = p.box
        crop = F.resized_crop(rgb, top, left, h, w, [24, 24], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        rotation = T.RandomRotation((p.angle, p.angle), interpolation=T.InterpolationMode.BILINEAR, fill=0)
        expected = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(T.ToTensor()(rotation(crop)))
        assert torch.equal(aug.apply_crop(rgb, p, 24), expected)


def test_rotation_angles_are_uniform_and_off_by_default():
    g = torch.Generator().manual_seed(0)
    rotating = DataAugmentationDINO(rotation_degrees=15.0)
    angles = [rotating.sample_crop_params(g, 300, 400, scale=(0.32, 1.0), blur_p=0.5, solarize_p=0.2).angle
              for _ in range(2000)]
    assert stats.kstest(angles, stats.uniform(-15.0, 30.0).cdf).pvalue > 0.001
    plain = DataAugmentationDINO()
    assert all(plain.sample_crop_params(g, 300, 400, scale=(0.32, 1.0), blur_p=0.5, solarize_p=0.2).angle == 0.0
               for _ in range(50))
    with pytest.raises(ValueError, match=r"rotation_degrees must be in \[0, 180\], got 200"):
        DataAugmentationDINO(rotation_degrees=200)


def test_without_rotation_the_random_stream_is_the_one_before_the_option():
    # Values drawn by the code before crops.rotation_degrees existed (commit b5635b6), seed 0: runs that
    # leave rotation off must crop exactly as before, so no angle may be drawn then.
    aug = DataAugmentationDINO()
    g = torch.Generator().manual_seed(0)
    params = [aug.sample_crop_params(g, 300, 400, scale=(0.32, 1.0), blur_p=0.5, solarize_p=0.2) for _ in range(3)]
    assert [p.box for p in params] == [(17, 72, 260, 303), (47, 11, 235, 261), (20, 133, 208, 266)]
    assert [p.blur_sigma for p in params] == pytest.approx([1.0851913690567017, 0.3862915635108948, None])
    assert [p.jitter.order for p in params] == [(3, 2, 0, 1), (1, 2, 3, 0), (0, 2, 3, 1)]
    assert torch.rand(1, generator=g).item() == pytest.approx(0.6984410881996155)


def test_solarize_only_on_second_global_crop(rgb):
    out = _aug(solarize_p=1.0)(rgb, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["global_crops"][0], _reference(rgb, 24))
    assert torch.equal(out["global_crops"][1], _reference(rgb, 24, T.RandomSolarize(128, p=1.0)))
    assert torch.equal(out["local_crops"][0], _reference(rgb, 12))


def test_blur_probabilities_are_per_crop_kind(rgb):
    out = _aug(blur_p=(1.0, 0.0, 0.0), blur_sigma=(1.0, 1.0))(rgb, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["global_crops"][0], _reference(rgb, 24, T.GaussianBlur(9, sigma=1.0)))
    assert torch.equal(out["global_crops"][1], _reference(rgb, 24))
    out = _aug(blur_p=(0.0, 0.0, 1.0), blur_sigma=(1.0, 1.0))(rgb, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["global_crops"][0], _reference(rgb, 24))
    assert torch.equal(out["local_crops"][1], _reference(rgb, 12, T.GaussianBlur(9, sigma=1.0)))


def test_grayscale_makes_channels_equal(rgb):
    out = _aug(grayscale_p=1.0)(rgb, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    pixels = out["global_crops"][0] * std + mean
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[1], pixels[2], atol=1e-6)


def test_random_decisions_follow_their_probabilities():
    aug = DataAugmentationDINO()
    g = torch.Generator().manual_seed(0)
    n = 3000
    params = [aug.sample_crop_params(g, 300, 400, scale=(0.32, 1.0), blur_p=0.1, solarize_p=0.2) for _ in range(n)]
    freq = lambda pred: sum(map(pred, params)) / n  # noqa: E731
    assert freq(lambda p: p.flip) == pytest.approx(0.5, abs=0.035)
    assert freq(lambda p: p.jitter is not None) == pytest.approx(0.8, abs=0.03)
    assert freq(lambda p: p.grayscale) == pytest.approx(0.2, abs=0.03)
    assert freq(lambda p: p.blur_sigma is not None) == pytest.approx(0.1, abs=0.02)
    assert freq(lambda p: p.solarize) == pytest.approx(0.2, abs=0.03)
    for p in params:
        top, left, h, w = p.box
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.3 <= h * w / (300 * 400) <= 1.0  # scale range, up to rounding
        if p.jitter is not None:
            b, c, s, hue = p.jitter.factors
            assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= hue <= 0.1
            assert sorted(p.jitter.order) == [0, 1, 2, 3]
        if p.blur_sigma is not None:
            assert 0.1 <= p.blur_sigma <= 2.0


def test_deterministic_under_generator_and_global_rng_untouched(rgb):
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=24, local_crops_size=12)
    state = torch.get_rng_state()
    a = aug(rgb, generator=torch.Generator().manual_seed(11))
    b = aug(rgb, generator=torch.Generator().manual_seed(11))
    c = aug(rgb, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state)
    for k in ("global_crops", "local_crops"):
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_multiband_float_tensor_normalises_per_channel():
    c = 5
    values = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    image = values[:, None, None].expand(c, 30, 20).clone()  # constant per band
    mean, std = (0.2, 0.2, 0.4, 0.4, 0.5), (0.1, 0.2, 0.3, 0.4, 0.5)
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8, mean=mean, std=std,
                               num_channels=c, color_jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0,
                               blur_p=(1.0, 1.0, 1.0))
    out = aug(image, generator=torch.Generator().manual_seed(0))
    expected = ((values - torch.tensor(mean)) / torch.tensor(std))[:, None, None]
    for crop, size in [(out["global_crops"][0], 16), (out["local_crops"][1], 8)]:
        assert crop.shape == (c, size, size)
        # Crops, flips and blur of a constant band are that constant.
        assert torch.allclose(crop, expected.expand(c, size, size), atol=1e-5)


def test_uint8_tensor_is_scaled_like_totensor():
    image = torch.full((4, 10, 10), 51, dtype=torch.uint8)
    aug = DataAugmentationDINO(local_crops_number=0, global_crops_size=8, mean=(0,) * 4, std=(1,) * 4,
                               num_channels=4, color_jitter_p=0, grayscale_p=0, solarize_p=0)
    out = aug(image, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["global_crops"][0], torch.full((4, 8, 8), 0.2))
    assert out["local_crops"] == []


def test_colour_ops_rejected_for_multiband_and_channel_checks():
    with pytest.raises(ValueError, match="color_jitter_p=0"):
        DataAugmentationDINO(mean=(0.5,) * 4, std=(0.5,) * 4, num_channels=4)
    with pytest.raises(ValueError, match="one value per channel"):
        DataAugmentationDINO(num_channels=1)
    aug = DataAugmentationDINO(global_crops_size=8, local_crops_size=4, local_crops_number=1)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        aug(torch.rand(4, 10, 10), generator=torch.Generator())
    with pytest.raises(TypeError, match="uint8 or floating"):
        aug(torch.zeros(3, 10, 10, dtype=torch.int32), generator=torch.Generator())


def test_grayscale_single_channel_path(rgb):
    aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=16, local_crops_size=8,
                               mean=(0.5,), std=(0.25,), num_channels=1)
    out = aug(rgb, generator=torch.Generator().manual_seed(0))  # RGB input is converted to "L"
    assert out["global_crops"][0].shape == (1, 16, 16) and out["local_crops"][0].shape == (1, 8, 8)
    out = aug(torch.rand(1, 20, 20), generator=torch.Generator().manual_seed(0))
    assert out["global_crops"][1].shape == (1, 16, 16)


@pytest.mark.parametrize("kind", ["pil", "uint8", "float"])
def test_unnormalised_crops_normalised_later_equal_the_normalised_crops(rgb, kind):
    """normalize=False ships uint8 crops (float ones for float input); normalize_crops, applied later to the
    batch, gives bitwise today's ToTensor + Normalize crops."""
    image = {"pil": rgb, "uint8": F.pil_to_tensor(rgb), "float": F.pil_to_tensor(rgb).float() / 255}[kind]
    kw = dict(local_crops_number=2, global_crops_size=24, local_crops_size=12, blur_p=(1.0, 0.5, 0.5), solarize_p=0.5)
    normalised = DataAugmentationDINO(**kw)(image, generator=torch.Generator().manual_seed(3))
    raw = DataAugmentationDINO(**kw, normalize=False)(image, generator=torch.Generator().manual_seed(3))
    for key in ("global_crops", "local_crops"):
        batch = torch.stack(raw[key])
        assert batch.dtype == (torch.float32 if kind == "float" else torch.uint8)
        assert torch.equal(normalize_crops(batch, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), torch.stack(normalised[key]))


def test_normalize_crops_matches_torchvision_and_leaves_its_input_alone():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.stack([T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(T.ToTensor()(F.to_pil_image(i)))
                             for i in x])
    assert torch.equal(normalize_crops(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), reference)
    floats = x.float()
    normalize_crops(floats, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0))
    assert torch.equal(floats, x.float())  # a float input is copied, not normalised in place
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize_crops(x, (0.5,), (0.5,))
    with pytest.raises(TypeError, match="uint8 or floating"):
        normalize_crops(x.int(), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_crops_on_the_device_matches_the_cpu():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_device = normalize_crops(x.pin_memory().to("cuda", non_blocking=True), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(on_device.cpu(), normalize_crops(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                               rtol=1e-6, atol=1e-6)
