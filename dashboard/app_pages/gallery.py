"""Test images of the best model: input, reconstruction, heatmap overlay, ground truth and predicted mask."""

import math

import numpy as np
import streamlit as st

from rayad import results
from rayad.errors import DataError
from rayad.visualize import heatmap_image

import loaders
from widgets import threshold_slider

PER_PAGE = 12
VIEWS = {  # view -> the outcomes shown (None: all)
    "All": None,
    "Misses": ("false negative", "false positive"),
    "False negatives": ("false negative",),
    "False positives": ("false positive",),
}
OVERLAY_ALPHA = 0.5

exp = loaders.selected_experiment()
st.title(f"Gallery: {loaders.text(exp.name)}")
loaders.stop_without_best(exp)
test = loaders.or_stop(loaders.test_results, str(exp), loaders.best_versions(exp))

threshold = threshold_slider(str(exp), test.images["score"].to_numpy(), test.threshold, "gallery")
images = test.images.assign(outcome=results.outcome(test.images, threshold))
left, middle, right = st.columns([2, 2, 1])
view = left.segmented_control("Show", list(VIEWS), default="All", key="gallery_view",
                              help="Worst first: the images furthest on the wrong side of the threshold (false "
                                   "negatives by lowest score, false positives by highest); in All, highest score "
                                   "first.") or "All"
types = middle.multiselect("Defect types", sorted(images["defect_type"].unique()), key="gallery_types",
                           placeholder="all types")
order = right.selectbox("Order", ["worst first", "score high to low", "score low to high"], key="gallery_order")

outcomes = VIEWS[view]
typed = images[images["defect_type"].isin(types)] if types else images
shown = typed if outcomes is None else typed[typed["outcome"].isin(outcomes)]
if order == "worst first" and outcomes is not None:
    wrong_by = np.where(shown["outcome"] == "false negative", threshold - shown["score"], shown["score"] - threshold)
    shown = shown.assign(wrong_by=wrong_by).sort_values("wrong_by", ascending=False, kind="stable")
else:
    shown = shown.sort_values("score", ascending=order == "score low to high", kind="stable")
counts = typed["outcome"].value_counts()  # of the types shown
st.caption(f"{len(shown)} of {len(typed)} images · false negatives {counts.get('false negative', 0)} · "
           f"false positives {counts.get('false positive', 0)} at threshold {threshold:.6f} · predicted masks: "
           f"the map over the calibrated pixel threshold {test.pixel_threshold:.6f}")
if shown.empty:
    st.info("No image matches these filters.")
    st.stop()

pages = math.ceil(len(shown) / PER_PAGE)
page = st.columns(6)[0].number_input(f"Page (of {pages})", 1, pages, 1, key="gallery_page") if pages > 1 else 1
versions = loaders.best_versions(exp)
loaders.or_stop(loaders.predictor, str(exp), versions)  # a broken model: one message instead of every image
header = st.columns(5)
for col, title in zip(header, ["Input", "Reconstruction", "Anomaly heatmap", "Ground truth", "Predicted mask"],
                      strict=True):
    col.markdown(f"**{title}**")
for row in shown.iloc[(page - 1) * PER_PAGE: page * PER_PAGE].itertuples():
    mask_path = row.mask_path if isinstance(row.mask_path, str) else None  # pandas shows a missing path as NaN
    try:
        item = loaders.scored_image(str(exp), versions, row.path, mask_path)
    except DataError as e:  # a test image (or its mask) moved or broken since the search: the others still show
        st.error(f"{row.defect_type} · score {row.score:.6f}: cannot show this image ({e})",
                 icon=":material/broken_image:")
        continue
    heat = np.asarray(heatmap_image(item["map"], test.pixel_threshold), dtype=np.float32)
    overlay = (OVERLAY_ALPHA * heat + (1 - OVERLAY_ALPHA) * item["image"]).astype(np.uint8)
    cols = st.columns(5)
    cols[0].image(item["image"], width="stretch", caption=f"{row.defect_type} · score {row.score:.6f}")
    cols[1].image(item["reconstruction"], width="stretch", caption=row.outcome)
    cols[2].image(overlay, width="stretch")
    cols[3].image(item["mask"].astype(np.uint8) * 255, width="stretch",
                  caption=None if mask_path else "no mask (good image)")
    cols[4].image((item["map"] >= test.pixel_threshold).astype(np.uint8) * 255, width="stretch")
