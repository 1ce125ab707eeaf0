"""The best model of one experiment on the test split: metrics, curves, score histogram and a live threshold."""

import pandas as pd
import streamlit as st

from rayad import results
from rayad.metrics import METRIC_NAMES

import charts
import loaders
from widgets import threshold_slider

exp = loaders.selected_experiment()
st.title(f"Model: {loaders.text(exp.name)}")
loaders.stop_without_best(exp)
test = loaders.or_stop(loaders.test_results, str(exp), loaders.best_versions(exp))
best = loaders.or_stop(loaders.experiment, str(exp), loaders.experiment_versions(exp)).get("best") or {}
st.caption(f"The best trial ({best.get('trial_id', '?')}) evaluated once on the test split "
           f"({len(test.images)} images).")

cols = st.columns(len(METRIC_NAMES))
for col, name in zip(cols, METRIC_NAMES, strict=True):
    value = test.metrics.get(name)
    col.metric(name.replace("_", " "), "-" if value is None else f"{value:.4f}")
    if ci := results.interval(test.metrics.get(f"{name}_ci")):  # image and pixel AUROC, bootstrapped
        col.caption(f"[{ci[0]:.3f}, {ci[1]:.3f}] 95% CI")
overall = {"defect type": "all", **{k: test.metrics.get(k) for k in (*METRIC_NAMES, "n_images")}}
per_type = [{"defect type": name, **m} for name, m in sorted(test.metrics.get("per_defect", {}).items())]
per_defect = pd.DataFrame([overall, *per_type])
st.dataframe(per_defect, hide_index=True, column_config={
    **{k: st.column_config.NumberColumn(format="%.4f") for k in METRIC_NAMES},
    "n_images": st.column_config.NumberColumn("images", help="A defect type is scored against every good test "
                                              "image, as in the MVTec AD benchmark: its images plus the good ones.")})
defective = int(test.images["label"].sum())
if 0 < defective < len(test.images):  # F1 rewards calling everything defective when most images are
    all_defective_f1 = 2 * defective / (defective + len(test.images))
    st.caption(f"For scale: calling every image defective gives F1 {all_defective_f1:.4f} "
               f"({defective} defective, {len(test.images) - defective} good).")

st.subheader("Curves")
image_curves = results.image_curves(test.images)
pixel_curves = test.metrics.get("pixel_curves")
if image_curves is None:
    st.caption("Curves need both good and defective test images.")
else:
    cols = st.columns(4)
    cols[0].altair_chart(charts.curve(image_curves["roc"], "fpr", "tpr", "Image ROC", diagonal=True))
    cols[1].altair_chart(charts.curve(image_curves["pr"], "recall", "precision", "Image precision-recall"))
    if pixel_curves:
        cols[2].altair_chart(charts.curve(pd.DataFrame(pixel_curves["roc"]), "fpr", "tpr", "Pixel ROC", diagonal=True))
        cols[3].altair_chart(charts.curve(pd.DataFrame(pixel_curves["pr"]), "recall", "precision",
                                          "Pixel precision-recall"))
    else:
        cols[2].caption("No pixel-level curves: the test split has no masks.")

st.subheader("Scores and threshold")
threshold = threshold_slider(str(exp), test.images["score"].to_numpy(), test.threshold, "model")
stats = results.threshold_stats(test.images["score"].to_numpy(), test.images["label"].to_numpy(), threshold)
left, right = st.columns([3, 2])
left.altair_chart(charts.score_histogram(test.images, test.threshold, threshold), width="stretch")
with right:
    cols = st.columns(3)
    cols[0].metric("Precision", f"{stats['precision']:.3f}")
    cols[1].metric("Recall", f"{stats['recall']:.3f}")
    cols[2].metric("F1", f"{stats['f1']:.3f}")
    st.table(pd.DataFrame({"predicted good": [stats["tn"], stats["fn"]],
                           "predicted defective": [stats["fp"], stats["tp"]]}, index=["good", "defective"]))
    st.caption(f"Calibrated threshold {test.threshold:.6f} (dashed); selected {threshold:.6f} (solid).")
