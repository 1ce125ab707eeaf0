"""Cached readers for the pages. Each takes the versions (mtimes) of the files it reads, so the cache
refreshes when a running search rewrites them; pages read the store's files only through here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from rayad import layout, results
from rayad.layout import BEST, EXPERIMENT, HISTORY, STUDY, TEST_METRICS, TRIALS, WEIGHTS

CACHE_TTL_S = 3600
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>~$])")  # what would turn a name's text into emphasis, links or maths
NO_BEST = {"running": "No best model yet: the search is still running.",
           "interrupted": "No best model: the search was stopped before it chose one.",
           "failed": "No best model: the search failed before it chose one."}


def runs_dir() -> Path:
    return Path(os.environ.get("RAYAD_RUNS", "runs"))


def serve_url() -> str | None:
    return os.environ.get("RAYAD_SERVE_URL") or None


def version(exp: Path, *names: str) -> tuple[float, ...]:
    return tuple(results.file_version(exp / name) for name in names)


def text(name: str) -> str:
    """A name as Markdown that shows it as it is (a folder named *x* not in italics)."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", name)


def code(value) -> str:
    """`value` as a Markdown code span, whatever backticks it holds."""
    value = str(value)
    fence = "`" * (max(map(len, re.findall("`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""  # CommonMark strips one space each side
    return f"{fence}{pad}{value}{pad}{fence}"


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (which Streamlit cannot send) as \\x escapes."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


def runs_dir_code() -> str:
    """The runs directory as a Markdown code span."""
    return code(printable(str(runs_dir())))


def found() -> tuple[dict[str, Path], dict[str, str]]:
    """The experiments under the runs directory by the name the sidebar shows (their path below it, or the
    folder's own name when the runs directory is one experiment), and the folders left out, with why."""
    runs = runs_dir()
    paths, unreadable = layout.scan_experiments(runs)
    shown = {str(p.relative_to(runs)) if p != runs else p.name: p for p in paths}
    left_out = {printable(str(p.relative_to(runs)) if p != runs else str(p)): f"cannot be read ({why})"
                for p, why in unreadable.items()}
    for name in [name for name in shown if printable(name) != name]:
        del shown[name]
        left_out[printable(name)] = "its name is not valid UTF-8, which the dashboard cannot show; rename it"
    return shown, left_out


def experiments() -> dict[str, Path]:
    return found()[0]


def selected_experiment() -> Path:
    """The experiment picked in the sidebar; stops the page with a hint when there is none."""
    path = experiments().get(st.session_state.get("experiment"))
    if path is None:
        st.info(f"No experiment found under {runs_dir_code()}. Run `rayad tune` or `rayad demo`, "
                "then reload.")
        st.stop()
    return path


def stop_without_best(exp: Path) -> None:
    """Say in one plain line that a running, stopped or failed search has no best model (rather than that its
    files are missing), and stop the page."""
    status = or_stop(experiment, str(exp), experiment_versions(exp)).get("status")
    if status in NO_BEST and not all(best_versions(exp)):
        st.info(NO_BEST[status], icon=":material/hourglass_top:" if status == "running" else None)
        st.stop()


def or_stop(read, *args):
    """Call a reader; on a broken store file, show the problem on this experiment and stop the page."""
    try:
        return read(*args)
    except results.StoreError as e:
        st.error(f"Experiment {code(args[0])}: {e}", icon=":material/error:")
        st.stop()


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=1024)
def overview(exp: str, versions: tuple[float, ...]) -> dict:
    return results.overview(Path(exp))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def experiment(exp: str, versions: tuple[float, ...]) -> dict:
    return results.read_experiment(Path(exp))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def trials(exp: str, versions: tuple[float, ...]) -> pd.DataFrame:
    return results.trial_table(results.read_table(Path(exp) / TRIALS))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def history(exp: str, versions: tuple[float, ...]) -> pd.DataFrame:
    return results.read_table(Path(exp) / HISTORY)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="Computing hyperparameter importance…", max_entries=64)
def importances(exp: str, study_name: str, versions: tuple[float, ...]) -> dict[str, float]:
    return results.param_importances(Path(exp), study_name)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def test_results(exp: str, versions: tuple[float, ...]) -> results.TestResults:
    return results.read_test_results(Path(exp))


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def predictor(exp: str, versions: tuple[float, ...]):
    """The experiment's best model (StoreError when its files are broken; errors are not cached)."""
    return results.load_model(Path(exp), device="cpu")


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=2048)
def scored_image(exp: str, versions: tuple[float, ...], path: str, mask_path: str | None) -> dict:
    """Input, reconstruction, anomaly map and ground-truth mask of one test image, at the model's size;
    DataError naming the file when the image or its mask is missing or unreadable."""
    from rayad.data.images import load_image, load_mask

    model = predictor(exp, versions)
    limit = model.config.data.max_pixels  # as evaluate read them
    image = load_image(path, model.image_size, limit)
    out = model.predict_arrays(image[None], reconstructions=True)
    mask = load_mask(mask_path, model.image_size, max_pixels=limit) if mask_path else np.zeros(image.shape[:2], bool)
    return {"image": image, "reconstruction": out.reconstructions[0], "map": out.maps[0], "mask": mask}


def experiment_versions(exp: Path) -> tuple[float, ...]:
    return version(exp, EXPERIMENT, TRIALS)


def best_versions(exp: Path) -> tuple[float, ...]:
    return version(exp, f"{BEST}/{WEIGHTS}", f"{BEST}/{TEST_METRICS}")


def study_versions(exp: Path) -> tuple[float, ...]:
    return version(exp, STUDY, TRIALS)
