"""Small tensor filters and noise shared by corruption and scoring."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius 4 sigma (as scipy.ndimage.gaussian_filter)."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    sigma = max(sigma, torch.finfo(dtype).tiny)  # a sigma that is 0 in `dtype` gave 0/0 at the centre
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; sigma <= 0 returns x."""
    if sigma <= 0:
        return x
    if _in_graph():
        return _blur_channels(x, sigma)  # traced and exported graphs keep the batch apart: its size varies there
    # Every image's channels as the channels of one image: oneDNN's depthwise kernel runs 3-7x faster on a CPU
    # and gives each channel the same bits however many there are, so a map is the same alone or in any batch.
    # A lone channel is doubled, as it would take another kernel.
    planes = x.reshape(1, -1, *x.shape[-2:])
    n = planes.shape[1]
    return _blur_channels(planes.expand(1, max(n, 2), -1, -1), sigma)[:, :n].reshape(x.shape)


def _in_graph() -> bool:
    """Whether torch.compile or a trace (an export) is recording this call as a graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _blur_channels(x: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = gaussian_kernel1d(sigma, x.device, x.dtype)
    radius = kernel.numel() // 2
    channels = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    if pad_h < radius or pad_w < radius:  # image smaller than the kernel: fall back to replicate padding
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    elif differentiated_deterministically():
        x = _reflect_pad(x, radius)
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def differentiated_deterministically() -> bool:
    """Whether this pass will be differentiated under `torch.use_deterministic_algorithms` (`train.deterministic`),
    where some CUDA backwards (bilinear interpolation, reflection padding) have no deterministic kernel and throw."""
    return torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()


def _reflect_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """`F.pad(x, (r, r, r, r), mode="reflect")` by copies alone, whose backward is deterministic on CUDA."""
    x = torch.cat([x[..., 1:r + 1, :].flip(-2), x, x[..., -r - 1:-1, :].flip(-2)], dim=-2)
    return torch.cat([x[..., 1:r + 1].flip(-1), x, x[..., -r - 1:-1].flip(-1)], dim=-1)


def size_randint(low: int, high: int, gen: torch.Generator, salt: int) -> int:
    """A random int in [low, high) that sets a tensor's size. On a CPU it is drawn from `gen`. Reading a GPU
    draw back would stall the device until its queue drains, so on a GPU it comes from a CPU generator seeded
    with `gen`'s seed plus `salt` (one salt per call site keeps the sites' draws independent)."""
    if gen.device.type != "cpu":
        gen = torch.Generator().manual_seed(gen.initial_seed() + salt)
    return int(torch.randint(low, high, (1,), generator=gen))


def smooth_noise(shape: tuple[int, int, int, int], cells: int, generator: torch.Generator,
                 device=None) -> torch.Tensor:
    """Perlin-style value noise: a random `cells` x `cells` grid upsampled bicubically to (B, C, H, W)."""
    b, c, h, w = shape
    grid = torch.rand((b, c, cells + 1, cells + 1), generator=generator, device=device)
    return upsample_bicubic(grid, h, w)


def upsample_bicubic(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`F.interpolate(grid, (h, w), mode="bicubic", align_corners=True)` as two small matrix products.

    Equal to it within 3e-6, and 5x faster on a CPU (docs/benchmarks.md, "The corruption's speed")."""
    rows = bicubic_matrix(grid.shape[-2], h, grid.device)
    cols = bicubic_matrix(grid.shape[-1], w, grid.device)
    return rows @ grid @ cols.T


def _cached_matrix(build):
    """`build(n_in, n_out, device)`, cached per sizes and device: an interpolation matrix takes a few dozen
    small ops to build, which a GPU would launch one by one at every step. Read it, never write to it."""
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def matrix(n_in: int, n_out: int, device=None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        if _in_graph():
            return build(n_in, n_out, device)  # a graph must not cache its fake tensors
        return cached(n_in, n_out, device)

    return matrix


@_cached_matrix
def bicubic_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of torch's bicubic interpolation (Keys' cubic, A = -0.75, align_corners=True,
    borders clamped): row i holds the four taps that output i takes from the input."""
    a = -0.75
    src = torch.arange(n_out, device=device) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    base = src.floor()
    t = src - base

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    taps = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    index = (base.long().view(-1, 1) + torch.arange(-1, 3, device=device)).clamp(0, n_in - 1)
    return torch.zeros(n_out, n_in, device=device).scatter_add_(1, index, taps)


@_cached_matrix
def bilinear_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of torch's bilinear interpolation to a given size (align_corners=False): output
    i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped to the input's extent."""
    src = ((torch.arange(n_out, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().clamp(max=n_in - 1)
    t = src - low
    index = torch.stack([low, (low + 1).clamp(max=n_in - 1)], dim=1).long()
    return torch.zeros(n_out, n_in, device=device).scatter_add_(1, index, torch.stack([1 - t, t], dim=1))


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)`; the same weights as two matrix products
    in a pass `differentiated_deterministically`."""
    if differentiated_deterministically():
        rows = bilinear_matrix(x.shape[-2], size[0], x.device).to(x.dtype)
        cols = bilinear_matrix(x.shape[-1], size[1], x.device).to(x.dtype)
        return rows @ x @ cols.T
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fractal_noise(shape: tuple[int, int, int, int], generator: torch.Generator, device=None,
                  octaves: int = 4, base_cells: int = 4) -> torch.Tensor:
    """Sum of `octaves` smooth noises at doubling frequency and halving amplitude, scaled to about [0, 1].

    The octaves' row upsamplings, each scaled by its amplitude, are concatenated so that one matrix
    product sums them: no full-size intermediate per octave."""
    b, c, h, w = shape
    rows, partial = [], []
    for octave in range(octaves):
        cells = base_cells * 2**octave
        grid = torch.rand((b, c, cells + 1, cells + 1), generator=generator, device=device)
        amplitude = 0.5**octave / (2 - 0.5 ** (octaves - 1))
        rows.append(bicubic_matrix(cells + 1, h, device) * amplitude)
        partial.append(grid @ bicubic_matrix(cells + 1, w, device).T)
    return torch.cat(rows, dim=1) @ torch.cat(partial, dim=2)
