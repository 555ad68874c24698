"""The fast crop pipeline (OpenCV + torch uint8) against the reference (torchvision / PIL) one.

Both pipelines apply the SAME ``CropParams`` (one sampler), so crop boxes, flips, jitter factors
and orders, grayscale / blur / solarize decisions have identical distributions by construction;
these tests check that, that the sampled decisions follow the recipe, and that applying them
gives the reference's pixels up to rounding, operation by operation and over seeded samples.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage import data as skdata

from dinov2.data import DataAugmentationDINO

OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos():
    """Real photographs at the benchmark's 500x375, and one grayscale."""
    rgb = [Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((500, 375), Image.BICUBIC)
           for name in ("astronaut", "coffee", "chelsea")]
    return rgb + [rgb[1].convert("L")]


def _pair(**kw):
    args = dict(local_crops_number=4, global_crops_size=112, local_crops_size=48, normalize=False)
    args.update(kw)
    return DataAugmentationDINO(**args, pipeline="reference"), DataAugmentationDINO(**args, pipeline="fast")


def _crops(aug, image, seed, channels=3):
    if image.mode == "L":
        aug = DataAugmentationDINO(**{**_kwargs(aug), "mean": (0.5,), "std": (0.2,), "num_channels": 1})
    g = torch.Generator().manual_seed(seed)
    out = aug(image, generator=g)
    return out["global_crops"] + out["local_crops"], g


def _kwargs(aug):
    return dict(global_crops_scale=aug.global_crops_scale, local_crops_scale=aug.local_crops_scale,
                local_crops_number=aug.local_crops_number, global_crops_size=aug.global_crops_size,
                local_crops_size=aug.local_crops_size, flip_p=aug.flip_p, color_jitter_p=aug.color_jitter_p,
                grayscale_p=aug.grayscale_p, blur_p=aug.blur_p, solarize_p=aug.solarize_p, normalize=aug.normalize,
                pipeline=aug.pipeline, rotation_degrees=aug.rotation_degrees)


def _mean_abs_diff(a, b):
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.mark.parametrize("op", ["none", "flip", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
                                "solarize"])
def test_each_operation_matches_the_reference_up_to_rounding(photos, op):
    kw = dict(OFF)
    if op == "flip":
        kw["flip_p"] = 1.0
    elif op in ("brightness", "contrast", "saturation", "hue"):
        strength = {"brightness": (0.4, 0, 0, 0), "contrast": (0, 0.4, 0, 0), "saturation": (0, 0, 0.4, 0),
                    "hue": (0, 0, 0, 0.1)}[op]
        kw.update(color_jitter=strength, color_jitter_p=1.0)
    elif op == "grayscale":
        kw["grayscale_p"] = 1.0
    elif op == "blur":
        kw["blur_p"] = (1.0, 1.0, 1.0)
    elif op == "solarize":
        kw["solarize_p"] = 1.0
    reference, fast = _pair(**kw)
    # A jitter always runs all four ops, hue included (factor 0 too): both pipelines then round-trip through
    # 8-bit HSV, PIL's and OpenCV's, which round differently.
    hsv = kw.get("color_jitter_p", 0) > 0
    for seed, image in enumerate(photos):
        ref, _ = _crops(reference, image, seed)
        out, _ = _crops(fast, image, seed)
        for a, b in zip(ref, out):
            assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
            # Resizing differs by at most a level here and there.
            assert _mean_abs_diff(a, b) < (1.0 if hsv else 0.3), (op, seed)
            assert (a.int() - b.int()).abs().max() <= (12 if hsv else 255 if op == "solarize" else 2), (op, seed)


def test_rotation_matches_the_reference_up_to_rounding(photos):
    # cv2's fixed-point bilinear weights against PIL's floating point ones: a few levels at most, and
    # the same rule at the borders (0 where the source point is outside the crop, edge pixels repeated
    # inside it: a plain constant border would differ by up to ~100 levels along the crop's edges).
    reference, fast = _pair(**OFF, rotation_degrees=180.0)
    for seed, image in enumerate(photos):
        ref, g_ref = _crops(reference, image, seed)
        out, g_fast = _crops(fast, image, seed)
        assert torch.equal(g_ref.get_state(), g_fast.get_state())
        for a, b in zip(ref, out):
            assert _mean_abs_diff(a, b) < 0.8, seed
            assert (a.int() - b.int()).abs().max() <= 6, seed


def test_full_recipe_matches_the_reference_and_draws_the_same_decisions(photos):
    reference, fast = _pair(local_crops_number=8, global_crops_size=224, local_crops_size=98)
    diffs = []
    for seed in range(12):
        image = photos[seed % 3]
        ref, g_ref = _crops(reference, image, seed)
        out, g_fast = _crops(fast, image, seed)
        # Identical random streams consumed: the same boxes, flips, factors and coin flips.
        assert torch.equal(g_ref.get_state(), g_fast.get_state())
        diffs += [_mean_abs_diff(a, b) for a, b in zip(ref, out)]
    # Solarize near the threshold can flip a pixel from v to 255 - v; on average a fraction of a level.
    assert np.mean(diffs) < 0.6 and np.max(diffs) < 3.0


def test_sampled_decisions_follow_the_recipe():
    aug = DataAugmentationDINO()
    g = torch.Generator().manual_seed(0)
    n, height, width = 4000, 375, 500
    params = [aug.sample_crop_params(g, height, width, scale=(0.05, 0.32), blur_p=0.5, solarize_p=0.2)
              for _ in range(n)]
    areas = np.array([p.box[2] * p.box[3] / (height * width) for p in params])
    log_aspect = np.log([p.box[3] / p.box[2] for p in params])
    # RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log 3/4, log 4/3), up to integer rounding.
    assert stats.kstest(areas, stats.uniform(0.05, 0.27).cdf).statistic < 0.03
    assert stats.kstest(log_aspect, stats.uniform(np.log(3 / 4), np.log(16 / 9)).cdf).statistic < 0.03
    jitter = [p.jitter for p in params if p.jitter is not None]
    factors = np.array([j.factors for j in jitter])
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert stats.kstest(factors[:, column], stats.uniform(lo, hi - lo).cdf).pvalue > 0.001
    rates = {"jitter": len(jitter) / n, "grayscale": np.mean([p.grayscale for p in params]),
             "blur": np.mean([p.blur_sigma is not None for p in params]), "solarize": np.mean([p.solarize for p in params]),
             "flip": np.mean([p.flip for p in params])}
    for name, expected in [("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5), ("solarize", 0.2), ("flip", 0.5)]:
        assert abs(rates[name] - expected) < 3.5 * np.sqrt(expected * (1 - expected) / n), (name, rates[name])


def test_output_statistics_agree_over_seeded_samples(photos):
    """Two-sample tests on what the model sees: per-crop mean, contrast and colourfulness, and how
    often a crop came out gray, over 60 seeded full-recipe samples of each pipeline."""
    reference, fast = _pair(local_crops_number=2, global_crops_size=64, local_crops_size=32)
    features = {"reference": [], "fast": []}
    for seed in range(60):
        image = photos[seed % 3]
        for name, aug in (("reference", reference), ("fast", fast)):
            for crop in _crops(aug, image, 1000 + seed)[0]:
                x = crop.float()
                features[name].append((x.mean().item(), x.std().item(), (x - x.mean(0)).abs().mean().item(),
                                       float(bool((crop[0] == crop[1]).all() and (crop[1] == crop[2]).all()))))
    ref, out = np.array(features["reference"]), np.array(features["fast"])
    for column in range(3):
        assert stats.ks_2samp(ref[:, column], out[:, column], method="asymp").pvalue > 0.5
    assert ref[:, 3].mean() == pytest.approx(out[:, 3].mean(), abs=0.02)


def test_fast_pipeline_handles_grayscale_uint8_tensors_and_falls_back_for_floats(photos):
    gray = DataAugmentationDINO(local_crops_number=2, global_crops_size=32, local_crops_size=16, mean=(0.5,), std=(0.2,),
                                num_channels=1, normalize=False, pipeline="fast", blur_p=(1.0, 1.0, 1.0))
    out = gray(photos[3], generator=torch.Generator().manual_seed(0))
    assert [c.shape for c in out["global_crops"]] == [(1, 32, 32)] * 2 and out["local_crops"][0].dtype == torch.uint8
    rgb = torch.from_numpy(np.array(photos[0])).permute(2, 0, 1).contiguous()
    reference, fast = _pair(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    a = fast(rgb, generator=torch.Generator().manual_seed(1))["global_crops"][0]
    b = reference(rgb, generator=torch.Generator().manual_seed(1))["global_crops"][0]
    assert _mean_abs_diff(a, b) < 0.6
    floats = rgb.float() / 255
    assert torch.equal(fast(floats, generator=torch.Generator().manual_seed(2))["global_crops"][0],
                       reference(floats, generator=torch.Generator().manual_seed(2))["global_crops"][0])
    with pytest.raises(ValueError, match="pipeline"):
        DataAugmentationDINO(pipeline="turbo")
