"""Every experiment under the runs directory, with trial counts and the best model's metrics."""

import pandas as pd
import streamlit as st

import loaders

REFRESH_S = 5

st.title("Experiments")
found, left_out = loaders.found()
paths = list(found.values())
for name, why in left_out.items():  # an unreadable folder, or one Streamlit cannot name: the others still show
    st.warning(f"Folder {loaders.code(name)} is left out: {why}", icon=":material/warning:")
if not paths:
    st.info(f"No experiments under {loaders.runs_dir_code()} yet. Start one with "
            "`rayad tune` or `rayad demo`.")
    st.stop()


def rows() -> list[dict]:
    return [loaders.overview(str(p), loaders.experiment_versions(p)) for p in paths]


COLUMNS = {
    "experiment": st.column_config.TextColumn("Experiment"),
    "category": st.column_config.TextColumn("Category"),
    "status": st.column_config.TextColumn("Status"),
    "trials completed": st.column_config.NumberColumn("Done", help="Trials that ran their whole budget"),
    "trials running": st.column_config.NumberColumn("Running"),
    "trials stopped early": st.column_config.NumberColumn("Stopped", help="Stopped early by ASHA"),
    "trials error": st.column_config.NumberColumn("Failed"),
    "trials interrupted": st.column_config.NumberColumn("Interrupted", help="Left running by a stopped search"),
    "best_validation": st.column_config.NumberColumn("Best validation", format="%.4f"),
    "test image_auroc": st.column_config.NumberColumn("Test image AUROC", format="%.4f"),
    "test pixel_auroc": st.column_config.NumberColumn("Test pixel AUROC", format="%.4f"),
    "test aupro": st.column_config.NumberColumn("Test AUPRO", format="%.4f"),
    "test f1_max": st.column_config.NumberColumn("Test F1-max", format="%.4f"),
    "started": st.column_config.DatetimeColumn("Started (UTC)", format="YYYY-MM-DD HH:mm"),
    "objective": st.column_config.TextColumn("Objective"),
    "dataset": st.column_config.TextColumn("Dataset"),
}


@st.fragment(run_every=REFRESH_S if any(r.get("status") == "running" for r in rows()) else None)
def experiments_table() -> None:
    table = pd.DataFrame(rows())
    healthy = table[table["problem"].isna()]
    if not healthy.empty:
        st.dataframe(healthy, hide_index=True, column_order=[c for c in COLUMNS if c in healthy],
                     column_config=COLUMNS)
    for row in table[table["problem"].notna()].itertuples():
        st.warning(f"Experiment {loaders.code(row.experiment)} ({loaders.code(row.path)}) cannot be shown: "
                   f"{row.problem}",
                   icon=":material/warning:")
    if "status" in table and (table["status"] == "running").any():
        st.caption(f"A search is running: this table refreshes every {REFRESH_S} s.")


experiments_table()
st.caption("Pick an experiment in the sidebar to see its search, its best model and its test images.")
