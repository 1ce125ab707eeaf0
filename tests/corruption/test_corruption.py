"""Structured corruption: masks, fill sources, blending, noise, baselines, determinism and devices."""

from __future__ import annotations

import pytest
import torch

from rayad.config import CorruptionConfig
from rayad.corruption import FILLS, SHAPES, Corruptor
from rayad.corruption.masks import random_masks
from rayad.errors import ConfigError
from rayad.filters import bicubic_matrix, fractal_noise, size_randint, smooth_noise, upsample_bicubic

H, W = 48, 64  # deliberately not square
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(batch: int = 4, h: int = H, w: int = W, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.rand((batch, 3, h, w), generator=gen(seed)).to(device)


def corrupt(x: torch.Tensor, seed: int = 0, **cfg):
    return Corruptor(CorruptionConfig(**cfg))(x, gen(seed, x.device.type))


def test_registries_list_the_documented_names():
    assert set(FILLS) == {"patch", "texture", "distort", "shift"}
    assert set(SHAPES) == {"stroke", "ellipse", "blob"}


# ----------------------------------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("shapes", [("stroke",), ("ellipse",), ("blob",), ("stroke", "ellipse", "blob")])
def test_random_masks_area_within_bounds(shapes):
    tolerance = 1 / (H * W)  # the area is rounded to whole pixels
    bounds = [(0.005, 0.08), (0.1, 0.3), (0.0, 0.02), (0.5, 0.5)]
    all_areas = []
    for seed in range(8):
        area_min, area_max = bounds[seed % len(bounds)]
        max_shapes = 1 + seed % 4
        hard, owner = random_masks(6, H, W, shapes, max_shapes, area_min, area_max, gen(seed))
        assert hard.shape == (6, H, W) and hard.dtype == torch.bool
        assert owner.shape == (6, H, W) and owner.dtype == torch.long
        assert int(owner.min()) >= 0 and int(owner.max()) < max_shapes
        areas = hard.float().mean(dim=(1, 2))
        assert torch.all(areas >= area_min - tolerance), (seed, areas)
        assert torch.all(areas <= area_max + tolerance), (seed, areas)
        assert torch.all(hard.flatten(1).any(dim=1))  # never empty, even with area_min 0
        if area_min == 0.005:
            all_areas.append(areas)
    assert torch.cat(all_areas).unique().numel() > 3  # the area is drawn, not fixed


def test_random_masks_single_slot_owns_everything():
    _, owner = random_masks(3, H, W, ("ellipse", "blob"), 1, 0.05, 0.1, gen(0))
    assert torch.all(owner == 0)


def test_random_masks_with_kinds_no_slot_shows():
    """One slot among three kinds: two kinds render nothing at each draw."""
    for seed in range(6):
        hard, owner = random_masks(1, H, W, ("stroke", "ellipse", "blob"), 1, 0.01, 0.05, gen(seed))
        assert hard.any() and torch.all(owner == 0)


def test_random_masks_several_shapes_get_distinct_owners():
    hard, owner = random_masks(16, H, W, ("ellipse",), 4, 0.2, 0.3, gen(3))
    owners_in_mask = [owner[i][hard[i]].unique().numel() for i in range(16)]
    assert max(owners_in_mask) > 1  # some images combine several shapes, each owning part of the mask


def test_random_masks_deterministic():
    a = random_masks(4, H, W, ("stroke", "ellipse", "blob"), 3, 0.01, 0.1, gen(5))
    b = random_masks(4, H, W, ("stroke", "ellipse", "blob"), 3, 0.01, 0.1, gen(5))
    c = random_masks(4, H, W, ("stroke", "ellipse", "blob"), 3, 0.01, 0.1, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("device", DEVICES)
def test_random_masks_equal_their_definition(device):
    """Every slot draws every kind; the union of the shown slots' fields is cut at its k-th largest value. A
    CPU renders a kind only in the slots that show it (a GPU renders all): the same masks, to the last bit."""
    shapes, batch, slots = ("stroke", "ellipse", "blob"), 6, 3
    for seed in range(3):
        g = gen(seed, device)
        kinds = torch.randint(len(shapes), (batch, slots), generator=g, device=device)
        n_shapes = torch.randint(1, slots + 1, (batch, 1), generator=g, device=device)
        fields = torch.full((batch, slots, H, W), -float("inf"), device=device)
        for k, name in enumerate(shapes):
            field = SHAPES[name].render(SHAPES[name].draw(batch * slots, g, device), H, W).view(batch, slots, H, W)
            fields = torch.where((kinds == k).view(batch, slots, 1, 1), field, fields)
        fields[torch.arange(slots, device=device).view(1, -1).expand(batch, -1) >= n_shapes] = -float("inf")
        union, owner = fields.max(dim=1)
        area = 0.01 + (0.1 - 0.01) * torch.rand(batch, generator=g, device=device)
        k = (area * H * W).round().clamp(min=1).long()
        threshold = union.flatten(1).sort(dim=1, descending=True).values.gather(1, (k - 1).view(-1, 1))
        hard, got_owner = random_masks(batch, H, W, shapes, slots, 0.01, 0.1, gen(seed, device), device)
        assert torch.equal(hard, union >= threshold.view(-1, 1, 1)) and torch.equal(got_owner, owner)


def test_sizes_are_drawn_from_the_cpu_generator_itself():
    """On a CPU a size draw is the generator's next draw (the stream a GPU cannot share without a sync)."""
    for seed in range(4):
        assert size_randint(2, 9, gen(seed), salt=seed) == int(torch.randint(2, 9, (1,), generator=gen(seed)))


@pytest.mark.parametrize("cells, size", [(2, (H, W)), (5, (128, 128)), (64, (128, 96)), (3, (1, 7))])
def test_upsample_bicubic_is_torchs_bicubic_interpolation(cells, size):
    grid = torch.rand(2, 3, cells + 1, cells + 1, generator=gen(cells))
    expected = torch.nn.functional.interpolate(grid, size=size, mode="bicubic", align_corners=True)
    torch.testing.assert_close(upsample_bicubic(grid, *size), expected, atol=3e-6, rtol=0)
    assert torch.allclose(bicubic_matrix(cells + 1, size[1]).sum(dim=1), torch.ones(size[1]))  # weights sum to 1


def test_bicubic_matrix_is_built_once_per_sizes_and_device():
    first = bicubic_matrix(5, 40)
    assert bicubic_matrix(5, 40, "cpu") is first and bicubic_matrix(5, 41) is not first
    torch.testing.assert_close(first, bicubic_matrix.__wrapped__(5, 40, torch.device("cpu")), atol=0, rtol=0)


def test_fractal_noise_is_the_sum_of_its_octaves():
    shape, octaves, base = (2, 3, H, W), 4, 3
    g = gen(7)
    expected = sum(smooth_noise(shape, base * 2**o, g) * 0.5**o for o in range(octaves)) / (2 - 0.5 ** (octaves - 1))
    torch.testing.assert_close(fractal_noise(shape, gen(7), octaves=octaves, base_cells=base), expected,
                               atol=3e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Structured corruption: blending


@pytest.mark.parametrize("edge_sigma", [0.0, 1.5])
def test_structured_changes_only_inside_the_mask(edge_sigma):
    x = images()
    for seed in range(3):
        out = corrupt(x, seed, kind="structured", p_corrupt=1.0, edge_sigma=edge_sigma, noise_std=0.0)
        assert out.inputs.shape == x.shape and out.targets.shape == x.shape
        assert out.mask.shape == (x.shape[0], 1, H, W)
        assert out.inputs.dtype == x.dtype and out.mask.dtype == x.dtype
        assert torch.equal(out.targets, x)
        assert float(out.mask.min()) >= 0.0 and float(out.mask.max()) <= 1.0
        untouched = (out.mask == 0).expand_as(x)
        assert untouched.any()
        assert torch.equal(out.inputs[untouched], x[untouched])
        assert torch.equal(out.targets[untouched], x[untouched])
        for i in range(x.shape[0]):  # p_corrupt=1: every image has a mask and changed pixels inside it
            inside = (out.mask[i] > 0).expand_as(x[i])
            assert inside.any()
            assert (out.inputs[i][inside] != x[i][inside]).float().mean() > 0.5


def test_hard_edges_have_one_blend_strength_per_image():
    x = images(8)
    out = corrupt(x, 1, p_corrupt=1.0, edge_sigma=0.0, blend_min=0.6)
    for i in range(8):
        values = out.mask[i].unique()
        assert values.numel() == 2 and values[0] == 0  # hard mask times one strength
        assert 0.6 <= float(values[1]) <= 1.0
    assert out.mask.amax(dim=(1, 2, 3)).unique().numel() > 1  # the strength is drawn per image


def test_soft_edges_blend_gradually():
    x = images(4)
    hard = corrupt(x, 2, p_corrupt=1.0, edge_sigma=0.0, blend_min=1.0)
    soft = corrupt(x, 2, p_corrupt=1.0, edge_sigma=2.0, blend_min=1.0)
    assert hard.mask.unique().numel() == 2
    partial = (soft.mask > 0) & (soft.mask < 0.99)
    assert int(partial.sum()) > 4  # a feathered border with intermediate weights
    assert (soft.mask > 0).sum() > (hard.mask > 0).sum()  # the blur spreads the mask outwards


def test_mask_in_unit_range_with_large_sigma_on_small_images():
    x = images(4, 16, 16)
    out = corrupt(x, 0, p_corrupt=1.0, edge_sigma=6.0, blend_min=1.0, area_min=0.3, area_max=0.6)
    assert out.mask.shape == (4, 1, 16, 16)
    assert float(out.mask.min()) >= 0.0 and float(out.mask.max()) <= 1.0
    assert torch.all(out.mask.amax(dim=(1, 2, 3)) > 0)
    untouched = (out.mask == 0).expand_as(x)
    assert torch.equal(out.inputs[untouched], x[untouched])


def test_p_corrupt_zero_changes_nothing():
    x = images(6)
    out = corrupt(x, 0, p_corrupt=0.0)
    assert torch.equal(out.inputs, x) and torch.equal(out.targets, x)
    assert torch.equal(out.mask, torch.zeros(6, 1, H, W))


def test_p_corrupt_one_corrupts_every_image():
    x = images(16, 24, 24)
    out = corrupt(x, 0, p_corrupt=1.0)
    assert torch.all(out.mask.amax(dim=(1, 2, 3)) > 0)
    assert torch.all((out.inputs != x).flatten(1).any(dim=1))


def test_p_corrupt_is_a_per_image_probability():
    x = images(64, 16, 16)
    out = corrupt(x, 0, p_corrupt=0.5)
    corrupted = out.mask.amax(dim=(1, 2, 3)) > 0
    changed = (out.inputs != x).flatten(1).any(dim=1)
    assert torch.equal(corrupted, changed)
    assert 16 <= int(corrupted.sum()) <= 48


# ----------------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_output_different_seed_different_output():
    x = images()
    torch.manual_seed(123)
    a = corrupt(x, 7, noise_std=0.02)
    torch.manual_seed(456)  # the global RNG must not matter
    b = corrupt(x, 7, noise_std=0.02)
    c = corrupt(x, 8, noise_std=0.02)
    for name in ("inputs", "targets", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.inputs, c.inputs)
    assert not torch.equal(a.mask, c.mask)


def test_gaussian_kind_is_deterministic():
    x = images(2)
    a = corrupt(x, 3, kind="gaussian")
    b = corrupt(x, 3, kind="gaussian")
    c = corrupt(x, 4, kind="gaussian")
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, c.inputs)


# ----------------------------------------------------------------------------------------------------------------------
# Fill sources


@pytest.mark.parametrize("name", sorted(FILLS))
def test_each_fill_source_changes_the_masked_pixels(name):
    x = images()
    out = corrupt(x, 0, fill_sources={name: 1.0}, p_corrupt=1.0, edge_sigma=0.0, blend_min=1.0)
    inside = (out.mask > 0).expand_as(x)
    outside = ~inside
    assert inside.any() and outside.any()
    assert torch.equal(out.inputs[outside], x[outside])
    assert (out.inputs[inside] != x[inside]).float().mean() > 0.9
    assert torch.isfinite(out.inputs).all()


@pytest.mark.parametrize("name", sorted(FILLS))
@pytest.mark.parametrize("shape", [(3, 3, H, W), (2, 3, 32, 32), (1, 1, 20, 20)])
def test_fill_returns_the_input_shape(name, shape):
    x = torch.rand(shape, generator=gen(1))
    fill = FILLS[name](x, gen(0))
    assert fill.shape == x.shape
    assert fill.dtype == x.dtype and fill.device == x.device
    assert torch.isfinite(fill).all()
    assert torch.equal(fill, FILLS[name](x, gen(0)))  # deterministic given the generator
    if shape[0] > 1 or name != "patch":  # a batch of one can only patch from itself
        assert not torch.equal(fill, x)


def test_patch_takes_content_from_another_image():
    x = torch.stack([torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.8)])
    for seed in range(3):
        out = corrupt(x, seed, fill_sources={"patch": 1.0}, p_corrupt=1.0, edge_sigma=0.0, blend_min=1.0)
        for i, other in [(0, 0.8), (1, 0.2)]:
            inside = (out.mask[i] > 0).expand_as(x[i])
            assert inside.any()
            assert torch.allclose(out.inputs[i][inside], torch.tensor(other), atol=1e-6)
            assert torch.equal(out.inputs[i][~inside], x[i][~inside])


@pytest.mark.parametrize("h, w", [(32, 32), (H, W)])
def test_patch_is_another_image_rotated_mirrored_and_rolled(h, w):
    """The one-gather patch fill equals its definition, applied image by image with torch's own ops."""
    x = torch.rand(5, 3, h, w, generator=gen(2))
    for seed in range(3):
        g = gen(seed)
        offsets = torch.randint(1, 5, (5,), generator=g)
        rot, flip, dy, dx = (torch.randint(n, (5,), generator=g).tolist() for n in (4, 2, h, w))
        expected = []
        for i in range(5):
            img = x[(i + int(offsets[i])) % 5]
            img = torch.rot90(img, rot[i], dims=(1, 2)) if h == w else img
            img = img.flip(-1) if flip[i] else img
            expected.append(torch.roll(img, shifts=(dy[i], dx[i]), dims=(1, 2)))
        assert torch.equal(FILLS["patch"](x, gen(seed)), torch.stack(expected))


def test_patch_never_uses_the_image_itself_in_a_larger_batch():
    values = torch.tensor([0.1, 0.4, 0.7, 0.9])
    x = values.view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    out = corrupt(x, 5, fill_sources={"patch": 1.0, "texture": 0.0}, p_corrupt=1.0, edge_sigma=0.0,
                  blend_min=1.0)
    for i in range(4):
        inside = (out.mask[i] > 0).expand_as(x[i])
        got = out.inputs[i][inside]
        assert got.numel() > 0
        # Every corrupted pixel comes from one of the other images (a zero-weight source is never used).
        distances = (got.view(-1, 1) - values.view(1, -1)).abs()
        assert torch.all(distances.min(dim=1).values < 1e-6)
        assert not torch.any((got - values[i]).abs() < 1e-6)


def test_shift_fill_is_a_per_channel_affine_map_of_the_image():
    x = images(3)
    fill = FILLS["shift"](x, gen(0))
    for i in range(3):
        for ch in range(3):
            a, b = x[i, ch].flatten(), fill[i, ch].flatten()
            design = torch.stack([a, torch.ones_like(a)], dim=1)
            coef = torch.linalg.lstsq(design, b.unsqueeze(1)).solution.squeeze(1)
            assert torch.allclose(design @ coef, b, atol=1e-5)
            assert 0.4 < float(coef[0]) < 1.8 and abs(float(coef[1])) <= 0.25 + 1e-5


def test_distort_fill_resamples_the_image_itself():
    x = images(3)
    fill = FILLS["distort"](x, gen(0))
    # Bilinear resampling with reflection: convex combinations of each image's own values.
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    assert torch.all(fill >= lo - 1e-6) and torch.all(fill <= hi + 1e-6)
    smooth = torch.full_like(x, 0.5) + torch.linspace(0, 0.3, W).view(1, 1, 1, W)
    # A smooth displacement of a smooth image stays close to it (a small elastic warp, not new content).
    assert (FILLS["distort"](smooth, gen(0)) - smooth).abs().max() < 0.2


def test_texture_fill_is_independent_of_the_image():
    a = FILLS["texture"](torch.zeros(2, 3, 32, 32), gen(4))
    b = FILLS["texture"](torch.ones(2, 3, 32, 32), gen(4))
    assert torch.equal(a, b)
    assert a.std() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Identity-anchored noise


def test_noise_is_shared_by_inputs_and_targets():
    x = images(4)
    std = 0.05
    out = corrupt(x, 0, p_corrupt=1.0, noise_std=std)
    outside = (out.mask == 0).expand_as(x)
    assert outside.any()
    assert torch.equal(out.inputs[outside], out.targets[outside])
    noise = out.targets - x
    assert not torch.equal(out.targets, x)
    assert 0.8 * std < float(noise.std()) < 1.2 * std
    assert abs(float(noise.mean())) < 0.1 * std


def test_noise_cancels_inside_the_mask_too():
    # Constant images patched from each other with full strength: inputs - targets = fill - clean exactly,
    # whatever the noise, because the same noise is added to both.
    x = torch.stack([torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.8)])
    out = corrupt(x, 1, fill_sources={"patch": 1.0}, p_corrupt=1.0, edge_sigma=0.0, blend_min=1.0, noise_std=0.1)
    diff = out.inputs - out.targets
    for i, expected in [(0, 0.6), (1, -0.6)]:
        inside = (out.mask[i] > 0).expand_as(x[i])
        assert torch.allclose(diff[i][inside], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(diff[i][~inside], torch.tensor(0.0), atol=0)
    assert (out.targets - x).abs().max() > 0.1


def test_noise_without_corruption_keeps_inputs_equal_to_targets():
    x = images(2)
    out = corrupt(x, 0, p_corrupt=0.0, noise_std=0.1)
    assert torch.equal(out.inputs, out.targets)
    assert not torch.equal(out.targets, x)
    assert torch.equal(out.mask, torch.zeros_like(out.mask))


# ----------------------------------------------------------------------------------------------------------------------
# Ablation baselines


def test_gaussian_kind_noises_the_input_only():
    x = images(4)
    out = corrupt(x, 0, kind="gaussian", gaussian_std=0.1)
    assert torch.equal(out.targets, x)
    assert torch.equal(out.mask, torch.zeros(4, 1, H, W))
    noise = out.inputs - x
    assert (noise != 0).float().mean() > 0.99
    assert 0.09 < float(noise.std()) < 0.11
    assert abs(float(noise.mean())) < 0.01


def test_none_kind_is_identity():
    x = images(3)
    out = corrupt(x, 0, kind="none", noise_std=0.1)
    assert torch.equal(out.inputs, x) and torch.equal(out.targets, x)
    assert out.mask.shape == (3, 1, H, W) and not out.mask.any()


# ----------------------------------------------------------------------------------------------------------------------
# Configuration errors


def test_unknown_fill_source_raises_config_error_naming_valid_ones():
    with pytest.raises(ConfigError) as info:
        Corruptor(CorruptionConfig(fill_sources={"patch": 1.0, "sparkles": 1.0}))
    message = str(info.value)
    assert "sparkles" in message
    assert all(name in message for name in FILLS)


def test_unknown_shape_raises_config_error_naming_valid_ones():
    with pytest.raises(ConfigError) as info:
        Corruptor(CorruptionConfig(shapes=("ellipse", "square")))
    message = str(info.value)
    assert "square" in message
    assert all(name in message for name in SHAPES)


@pytest.mark.parametrize("kwargs", [{"fill_sources": {"patch": 0.0}}, {"fill_sources": {"patch": -1.0}},
                                    {"fill_sources": {}}, {"shapes": ()}, {"p_corrupt": 1.5},
                                    {"area_min": 0.2, "area_max": 0.1}])
def test_invalid_corruption_config_raises(kwargs):
    with pytest.raises(ConfigError):
        CorruptionConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Devices




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["structured", "gaussian", "none"])
def test_runs_on_the_tensor_device(device, kind):
    x = images(3, device=device)
    out = corrupt(x, 0, kind=kind, p_corrupt=1.0, noise_std=0.01 if kind == "structured" else 0.0)
    for t in out:
        assert t.device.type == device
    untouched = (out.mask == 0).expand_as(x)
    if kind == "gaussian":
        assert torch.equal(out.targets, x) and not torch.equal(out.inputs, x)
    else:
        assert torch.equal(out.inputs[untouched], out.targets[untouched])
    if kind == "structured":
        assert torch.all(out.mask.amax(dim=(1, 2, 3)) > 0)
        again = corrupt(x, 0, kind=kind, p_corrupt=1.0, noise_std=0.01)
        assert torch.equal(out.inputs, again.inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FILLS))
def test_fills_run_on_the_tensor_device(device, name):
    x = images(2, 32, 32, device=device)
    fill = FILLS[name](x, gen(0, device))
    assert fill.device.type == device and fill.shape == x.shape
