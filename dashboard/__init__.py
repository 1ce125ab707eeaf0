"""The Streamlit app of `rayad dashboard`, installed as the package rayad._bundled.dashboard."""
