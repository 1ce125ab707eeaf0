"""Upload an image and score it: through the Serve endpoint when the dashboard was given one, otherwise with
the experiment's best model loaded here."""

import base64
import http.client
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import streamlit as st
from PIL import Image

from rayad.artifact import model_version
from rayad.data.images import IMAGE_SUFFIXES, PILLOW_MAX_PIXELS, load_image
from rayad.errors import DataError
from rayad.layout import BEST, WEIGHTS
from rayad.results import StoreError
from rayad.visualize import heatmap_image

import loaders

REQUEST_TIMEOUT_S = 30
PREDICTION = ("score", "label", "threshold", "heatmap_png", "mask_png")  # the README's /v1/predict?heatmap=true


class NotServed(Exception):
    """The Serve endpoint does not serve this experiment's best model."""


class ForeignReply(Exception):
    """The Serve endpoint answered, but not as rayad's Serve API does."""


exp = loaders.selected_experiment()
experiment = loaders.or_stop(loaders.experiment, str(exp), loaders.experiment_versions(exp))
url = loaders.serve_url()
st.title(f"Try it: {loaders.text(exp.name)}")
loaders.stop_without_best(exp)
st.caption(f"Scored by the Serve endpoint {url}" if url else "Scored here with the experiment's best model "
           "(start the dashboard with `--serve-url` to use a Serve deployment).")
upload = st.file_uploader("Image", type=[s.lstrip(".") for s in IMAGE_SUFFIXES],
                          key=f"upload:{exp}")  # another experiment starts without this one's upload


def call_serve(path: str, content: bytes | None = None) -> dict:
    """GET (or POST `content` to) the Serve endpoint's `path`, with the API key when one is set."""
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", data=content, method="GET" if content is None
                                     else "POST", headers={"Content-Type": "application/octet-stream"})
    if os.environ.get("RAYAD_API_KEY"):
        request.add_header("X-API-Key", os.environ["RAYAD_API_KEY"])
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        body = response.read()
    try:
        reply = json.loads(body)
    except ValueError:
        raise ForeignReply(f"{path} answered {len(body)} bytes that are not JSON: {one_line(body[:60])}") from None
    if not isinstance(reply, dict):
        raise ForeignReply(f"{path} answered JSON that is not an object")
    return reply


def one_line(body: bytes) -> str:
    """A reply's text as one line of code (an HTML page has many, and its tags would vanish as Markdown)."""
    return loaders.code(" ".join(body.decode(errors="replace").split()))


def served_name() -> str:
    """The name the endpoint serves this experiment's best model under, found by its version (the weights'
    hash): the category alone may name another experiment's model, or none (two of one category are served
    under their folders' names)."""
    try:
        version = model_version(exp / BEST)
    except OSError as e:
        raise StoreError(f"{exp / BEST / WEIGHTS}: cannot read ({e.strerror})") from None
    models = call_serve("/v1/models").get("models")
    if not (isinstance(models, list) and all(isinstance(m, dict) for m in models)):
        raise ForeignReply("/v1/models answered no list of models")
    names = [m.get("name") for m in models if m.get("version") == version]
    if not names:
        raise NotServed(f"The Serve endpoint {url} does not serve this experiment's best model (version "
                        f"{version}); serve it with {loaders.code(f'rayad serve --run {exp}')}, or the folder "
                        "holding it")
    return experiment["category"] if experiment["category"] in names else names[0]


def score_remote(content: bytes) -> dict:
    """POST /v1/predict?heatmap=true to this experiment's model, as documented in the README's Serve API."""
    query = urllib.parse.urlencode({"model": served_name(), "heatmap": "true"})
    out = call_serve(f"/v1/predict?{query}", content)
    missing = [key for key in PREDICTION if key not in out]
    if missing:
        raise ForeignReply(f"/v1/predict answered no {', '.join(missing)}")
    try:
        return {"score": float(out["score"]), "label": bool(out["label"]), "threshold": float(out["threshold"]),
                "heatmap": png(out["heatmap_png"]), "mask": png(out["mask_png"])}
    except (TypeError, ValueError, OSError) as e:  # not numbers, not base64, not a PNG
        raise ForeignReply(f"/v1/predict answered a malformed prediction ({e})") from None


def png(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))))


def score_local(content: bytes, name: str) -> dict:
    """Scored as `rayad predict` scores a file: the same decoding, pixel limit and messages."""
    model = loaders.predictor(str(exp), loaders.best_versions(exp))
    out, errors = model.predict_files([content], names=[name])
    if errors[0]:
        raise DataError(errors[0])
    return {"score": float(out.scores[0]), "label": bool(out.labels[0]), "threshold": model.threshold,
            "heatmap": np.asarray(heatmap_image(out.maps[0], model.pixel_threshold)),
            "mask": out.masks()[0].astype(np.uint8) * 255}


if upload is not None:
    content = upload.getvalue()
    try:
        result = score_remote(content) if url else score_local(content, upload.name)
    except StoreError as e:  # the best model's files are broken
        st.error(f"Experiment {loaders.code(exp)}: {e}", icon=":material/error:")
        st.stop()
    except DataError as e:
        st.error(f"Not a usable image: {e}")
        st.stop()
    except NotServed as e:
        st.error(str(e))
        st.stop()
    except urllib.error.HTTPError as e:
        st.error(f"The Serve endpoint answered {e.code}: {one_line(e.read())}")
        st.stop()
    except (urllib.error.URLError, TimeoutError) as e:
        st.error(f"Cannot reach the Serve endpoint {url}: {e}")
        st.stop()
    except (ForeignReply, http.client.HTTPException, ConnectionError) as e:  # e.g. closed without an answer
        st.error(f"The Serve endpoint {url} answered something that is not rayad's API ({e})")
        st.stop()
    cols = st.columns(3)
    cols[0].metric("Score", f"{result['score']:.6f}")
    cols[1].metric("Label", "defective" if result["label"] else "good")
    cols[2].metric("Threshold", f"{result['threshold']:.6f}")
    cols = st.columns(3)
    # the pixels the model scored, beside its maps (the upload itself may be a file no browser shows: 16-bit)
    shown = load_image(content, result["heatmap"].shape[0], PILLOW_MAX_PIXELS)  # the scorer read it within its limit
    cols[0].image(shown, caption="input, as the model sees it")
    cols[1].image(result["heatmap"], caption="anomaly heatmap")
    cols[2].image(result["mask"], caption="predicted mask")
