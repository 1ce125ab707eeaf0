"""benchmarks/defect_visibility.py: the oracle scores and the script's output."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "defect_visibility.py"
spec = importlib.util.spec_from_file_location("defect_visibility", SCRIPT)
visibility_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(visibility_module)


def test_whitening_finds_a_small_blob_in_low_pass_noise_where_plain_correlation_does_not():
    rng = np.random.default_rng(0)

    def noise():
        return ndimage.gaussian_filter(rng.normal(size=(64, 64)), 4, mode="wrap") * 10

    power = visibility_module.noise_spectrum([visibility_module.spectrum(noise()) for _ in range(200)])
    yy, xx = np.mgrid[:64, :64]
    blob = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 1.5**2))
    template, amplitude = np.fft.fft2(blob), 0.5 * noise().std()
    for spectrum_, separates in ((power, True), (np.ones_like(power), False)):
        clean = [visibility_module.whitened_match(template, visibility_module.spectrum(noise()), spectrum_)
                 for _ in range(50)]
        painted = [visibility_module.whitened_match(template, visibility_module.spectrum(noise() + amplitude * blob),
                                                    spectrum_) for _ in range(50)]
        assert (min(painted) > max(clean)) is separates  # a flat spectrum is plain correlation


def test_obvious_defects_are_found_by_both_oracles_and_pixel_shares_add_up():
    rows = visibility_module.visibility("brick", ["spot", "dark_region"], n=12, seed=0)
    for kind in ("spot", "dark_region"):
        assert rows[kind]["contrast"] == 1.0 and rows[kind]["whitened"] == 1.0
        assert 0.5 <= rows[kind]["scan"] <= 1.0
    assert rows["spot"]["pixels"] < rows["dark_region"]["pixels"]
    assert abs(rows["spot"]["pixels"] + rows["dark_region"]["pixels"] - 1) < 1e-9


def test_script_prints_the_table_and_the_machine_and_refuses_half_a_model_pair():
    out = subprocess.run([sys.executable, str(SCRIPT), "--images", "6", "--categories", "brick", "--kinds", "hole"],
                         capture_output=True, text=True, check=True).stdout
    assert "| brick | hole | 1.000 |" in out and "ceiling" not in out  # a ceiling needs every kind
    assert "6 crops per kind, seed 7;" in out
    bad = subprocess.run([sys.executable, str(SCRIPT), "--runs", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--runs and --data go together" in bad.stderr
