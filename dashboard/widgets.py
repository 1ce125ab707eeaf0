"""Widgets shared by several pages."""

from __future__ import annotations

import numpy as np
import streamlit as st


def threshold_slider(experiment: str, scores: np.ndarray, calibrated: float, page: str) -> float:
    """A threshold slider whose value is shared by every page (per experiment); starts at the calibrated one.
    Its stops are the calibrated threshold and the test images' scores, so that each step changes one image's
    outcome (an even grid was coarser than the good images' spread, and missed the calibrated value)."""
    shared, key = f"threshold:{experiment}", f"threshold_slider:{page}:{experiment}"
    stops = np.unique(np.r_[scores, calibrated]).tolist()
    wanted = st.session_state.get(shared, calibrated)
    st.session_state[key] = wanted if wanted in stops else calibrated

    def remember():
        st.session_state[shared] = st.session_state[key]

    return st.select_slider("Threshold (images scoring at or above it are called defective)", stops,
                            format_func=lambda value: f"{value:.6f}", key=key, on_change=remember,
                            help=f"The calibrated threshold is {calibrated:.6f}; each step moves to the next "
                                 "test image's score.")
