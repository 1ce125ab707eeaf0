"""Widgets shared by several pages."""

from __future__ import annotations

import numpy as np
import streamlit as st


def threshold_slider(experiment: str, scores: np.ndarray, calibrated: float, page: str) -> float:
    """A threshold slider whose value is shared by every page (per experiment); starts at the calibrated one."""
    shared, key = f"threshold:{experiment}", f"threshold_slider:{page}:{experiment}"
    low, high = float(min(scores.min(), calibrated)), float(max(scores.max(), calibrated))
    st.session_state[key] = float(np.clip(st.session_state.get(shared, calibrated), low, high))

    def remember():
        st.session_state[shared] = st.session_state[key]

    return st.slider("Threshold (images scoring at or above it are called defective)", low, high,
                     step=(high - low) / 500 or None, format="%.6f", key=key, on_change=remember,
                     help=f"The calibrated threshold is {calibrated:.6f}.")
