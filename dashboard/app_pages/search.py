"""The search of one experiment: trials, optimisation history, parameters, importance, learning curves."""

import streamlit as st

from rayad import results
from rayad.layout import HISTORY

import charts
import loaders

LIVE_REFRESH_S = 10
CURVES_DEFAULT = 5
FEW_TRIALS = 20  # PED-ANOVA contrasts the best 10% of the finished trials with all of them

exp = loaders.selected_experiment()
experiment = loaders.or_stop(loaders.experiment, str(exp), loaders.experiment_versions(exp))
metric, mode = results.objective(experiment)
st.title(f"Search: {loaders.text(exp.name)}")
st.caption(f"Category {loaders.code(experiment['category'])} · objective {mode} `{metric}` on the validation split · "
           f"status {experiment.get('status', '?')}")
if experiment.get("status") == "interrupted":
    st.info(f"This search was stopped before its trials ended (those it left running show as interrupted); "
            f"{loaders.code(f'rayad tune --out {exp} --resume')} goes on with it, each trial from its last "
            "checkpoint.")
elif experiment.get("status") == "failed":
    st.warning(f"This search failed: {experiment.get('error') or 'see its log'}", icon=":material/warning:")


@st.fragment(run_every=LIVE_REFRESH_S if experiment.get("status") == "running" else None)
def trials_section() -> None:
    table = loaders.or_stop(loaders.trials, str(exp), loaders.experiment_versions(exp))
    if table.empty:
        st.info("No trial has started yet.")
        return
    params = [p for p in results.searched_params(experiment) if p in table]
    counts = table["status"].value_counts()
    best = results.best_value(table, mode)
    cols = st.columns(2 + len(results.TRIAL_STATUSES))
    cols[0].metric(f"Best {metric}", "-" if best is None else f"{best:.4f}")
    cols[1].metric("Trials", len(table))
    for col, status in zip(cols[2:], results.TRIAL_STATUSES, strict=True):
        col.metric(status.replace("_", " ").capitalize(), int(counts.get(status, 0)))
    shown = ["number", "trial_id", "status", "best_value", "best_step", *params,
             *[c for c in table if c.startswith("final_")], "duration_s", "error"]
    st.dataframe(table, hide_index=True, column_order=[c for c in shown if c in table], column_config={
        "best_value": st.column_config.NumberColumn(f"best {metric}", format="%.4f"),
        "duration_s": st.column_config.NumberColumn("duration (s)", format="%.0f")})
    history = results.optimisation_history(table, mode)
    st.subheader("Optimisation history")
    st.altair_chart(charts.optimisation_history(history, metric), width="stretch")
    st.subheader("Parallel coordinates")  # the page's width: a half column ran the axes' end labels together
    if params and len(history) > 1:
        st.altair_chart(charts.parallel_coordinates(table, params, metric), width="stretch")
    else:
        st.caption("Needs two scored trials and a searched parameter.")


trials_section()

st.subheader("Hyperparameter importance")
try:
    values = loaders.importances(str(exp), experiment["category"], loaders.study_versions(exp))
except results.StoreError as e:  # a missing or corrupt study.db: the rest of the page still shows
    st.error(f"Importance unavailable: {e}", icon=":material/error:")
else:
    if values:
        st.altair_chart(charts.importances(values), width="stretch")
        done = int((loaders.or_stop(loaders.trials, str(exp), loaders.experiment_versions(exp))["status"]
                    == "completed").sum())
        few = f"; with under {FEW_TRIALS}, that best 10% is one or two trials: a hint, not a ranking"
        st.caption(f"How much each parameter matters for reaching the best 10% of the {done} trials that ran their "
                   f"whole budget (Optuna's PED-ANOVA){few if done < FEW_TRIALS else ''}.")
    else:
        st.caption("Needs at least two finished trials.")

st.subheader("Learning curves")
table = loaders.or_stop(loaders.trials, str(exp), loaders.experiment_versions(exp))
history = loaders.or_stop(loaders.history, str(exp), loaders.version(exp, HISTORY))
if history.empty or table.empty:
    st.caption("No evaluations yet.")
else:
    ranked = table.dropna(subset=["best_value"]).sort_values("best_value", ascending=mode == "min")
    default = ranked["trial_id"].head(CURVES_DEFAULT).tolist()
    chosen = st.multiselect("Trials", table["trial_id"].tolist(), default=default,
                            help=f"By default the {CURVES_DEFAULT} best trials.")
    curves = history[history["trial_id"].isin(chosen)].sort_values(["trial_id", "step"])
    st.altair_chart(charts.learning_curves(curves, metric), width="stretch")
