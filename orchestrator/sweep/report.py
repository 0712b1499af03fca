"""`vis4mer report NAME`: plots of a sweep, from MLflow alone (no Ray needed).

Two PNGs, saved locally and logged to the sweep's parent run (artifact folder `report/`):

* `<name>_final_metric.png`: each trial's final metric against the state size, the depth and the
  pooling schedule (one point per trial; hollow points are trials the scheduler stopped early);
* `<name>_learning_curves.png`: the metric per epoch of every trial, coloured by depth;
* `<name>_seeds.png`, when the sweep searches `train.seed`: each configuration's trials over seeds
  (one dot a seed) and their mean +- std, ranked by the mean.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from vis4mer.datasets.storage import check_local_target
from vis4mer.orchestrator.sweep.lookup import sweep_runs, trial_params
from vis4mer.orchestrator.sweep.seeds import group_by_config, searches_seeds
from vis4mer.orchestrator.train.config import ConfigError
from vis4mer.orchestrator.train.tracking import Tag


@dataclass
class TrialCurve:
    trial_id: str
    params: dict  # the flattened config MLflow holds for the child run
    final: float
    sampled: dict = field(default_factory=dict)  # the trial's sampled search-space parameters
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return int(self.params.get("model.n_layers", "0"))

    @property
    def d_state(self) -> int:
        return int(self.params.get("model.d_state", "0"))

    @property
    def schedule(self) -> str:
        """The pooling schedule as the sweep names it: factors and types per stage."""
        if self.depth == 0:
            return "none (depth 0)"
        pool, kind = self.params.get("model.pool", "None"), self.params.get("model.pool_type", "None")
        pool = "default" if pool == "None" else pool.replace(" ", "")
        kind = kind.replace(" ", "").replace("'", "")  # "['max', 'avg']" -> "[max,avg]"
        return pool if kind == "None" else f"{pool} {kind}"


def collect(tracking_uri: str, experiment: str | None, sweep: str, metric: str | None = None):
    client, parent, children, default_metric = sweep_runs(tracking_uri, experiment, sweep)
    metric = metric or default_metric
    if not metric:
        raise ConfigError("no metric recorded for this sweep: pass --metric")
    curves = []
    for r in children:
        if metric not in r.data.metrics:
            continue
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        curves.append(TrialCurve(r.data.tags.get(Tag.TRIAL_ID, r.info.run_id), dict(r.data.params),
                                 r.data.metrics[metric], trial_params(r),
                                 [m.step for m in history], [m.value for m in history]))
    if not curves:
        raise ConfigError(f"sweep {sweep!r}: no trial reported {metric!r} yet")
    curves.sort(key=lambda c: c.trial_id)
    return client, parent, metric, curves


def _categorical(ax, labels: list[str], values: list[float], stopped: list[bool], colours: list):
    order = sorted(set(labels), key=lambda s: (len(s), s))
    xs = [order.index(label) for label in labels]
    # a small, deterministic spread so that repeats at one setting stay visible
    jitter = [((i * 37) % 11 - 5) * 0.02 for i in range(len(xs))]
    for x, j, y, s, c in zip(xs, jitter, values, stopped, colours):
        ax.scatter(x + j, y, s=36, facecolors="none" if s else c, edgecolors=c, linewidths=1.5)
    ax.set_xticks(range(len(order)), order, rotation=20 if max(map(len, order)) > 6 else 0, fontsize=8)


def _seed_spread(plt, sweep: str, metric: str, curves: list[TrialCurve], path: str) -> str:
    """One column a configuration: its seeds' final metric as dots, mean +- std as a bar."""
    from vis4mer.datasets.tasks import metric_mode

    groups = sorted(group_by_config(curves, lambda c: c.sampled, lambda c: c.final), key=lambda g: g.mean,
                    reverse=metric_mode(metric) == "max")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4.5))
    for x, g in enumerate(groups):
        ax.scatter([x] * g.count, g.values, s=20, color="tab:blue", alpha=0.6)
        ax.errorbar(x + 0.15, g.mean, yerr=g.std, fmt="o", color="black", capsize=4)
    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(g.params.items()))[:40] for g in groups]
    ax.set_xticks(range(len(groups)), [f"#{i + 1} ({g.count})" for i, g in enumerate(groups)], fontsize=8)
    ax.set_ylabel(f"final {metric}")
    ax.set_xlabel("configuration, ranked by mean over seeds (number of seeds)")
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {sweep}: spread over seeds (dots: seeds; black: mean +- std)", fontsize=10)
    for i, label in enumerate(labels):
        ax.annotate(label, (i, min(groups[i].values)), textcoords="offset points", xytext=(0, -14), ha="center",
                    fontsize=6, rotation=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_report(tracking_uri: str, experiment: str | None, sweep: str, out_dir: str, metric: str | None = None,
                log_to_parent: bool = True) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_local_target(out_dir, f"--out {out_dir}")  # a folder that can be made and written, before any work
    client, parent, metric, curves = collect(tracking_uri, experiment, sweep, metric)
    os.makedirs(out_dir, exist_ok=True)
    max_epoch = max(max(c.steps, default=0) for c in curves)
    stopped = [max(c.steps, default=0) < max_epoch for c in curves]
    depths = sorted({c.depth for c in curves})
    cmap = plt.get_cmap("viridis", max(2, len(depths)))
    colour = {d: cmap(i) for i, d in enumerate(depths)}
    colours = [colour[c.depth] for c in curves]
    finals = [c.final for c in curves]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (title, labels) in zip(axes, [("state size (model.d_state)", [str(c.d_state) for c in curves]),
                                          ("depth (model.n_layers)", [str(c.depth) for c in curves]),
                                          ("pooling schedule", [c.schedule for c in curves])]):
        _categorical(ax, labels, finals, stopped, colours)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"final {metric}")
    fig.suptitle(f"sweep {sweep}: {len(curves)} trials (hollow: stopped early; colour: depth)")
    fig.tight_layout()
    final_png = os.path.join(out_dir, f"{sweep}_final_metric.png")
    fig.savefig(final_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in curves:
        ax.plot(c.steps, c.values, marker="o", ms=3, color=colour[c.depth], alpha=0.8,
                label=f"{c.trial_id} depth {c.depth} d_state {c.d_state} {c.schedule}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {sweep}: learning curves")
    if len(curves) <= 16:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    curves_png = os.path.join(out_dir, f"{sweep}_learning_curves.png")
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    paths = [final_png, curves_png]
    if searches_seeds([c.sampled for c in curves]):
        paths.append(_seed_spread(plt, sweep, metric, curves, os.path.join(out_dir, f"{sweep}_seeds.png")))
    if log_to_parent:
        for p in paths:
            client.log_artifact(parent.info.run_id, p, "report")
        rows = [{"trial_id": c.trial_id, f"final_{metric}": c.final, "epochs": max(c.steps, default=0),
                 "d_state": c.d_state, "depth": c.depth, "pooling": c.schedule} for c in curves]
        client.log_text(parent.info.run_id, json.dumps(rows, indent=2), "report/trials.json")
    return paths
