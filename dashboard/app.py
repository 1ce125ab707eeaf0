"""rayad dashboard: browse experiments, trials, metrics and heatmaps.

Start it with `rayad dashboard --runs DIR` (which runs `streamlit run dashboard/app.py` with RAYAD_RUNS
set). The app only reads the results store.
"""

import streamlit as st

import loaders

st.set_page_config(page_title="rayad", page_icon=":material/troubleshoot:", layout="wide")

PAGES = [
    st.Page("app_pages/experiments.py", title="Experiments", icon=":material/table_view:", default=True),
    st.Page("app_pages/search.py", title="Search", icon=":material/tune:"),
    st.Page("app_pages/model.py", title="Model", icon=":material/monitoring:"),
    st.Page("app_pages/gallery.py", title="Gallery", icon=":material/photo_library:"),
    st.Page("app_pages/try_it.py", title="Try it", icon=":material/upload:"),
]

page = st.navigation(PAGES)
with st.sidebar:
    st.selectbox("Experiment", list(loaders.experiments()), key="experiment", placeholder="no experiments yet")
    st.caption(f"Runs directory: {loaders.runs_dir_code()}")
page.run()
