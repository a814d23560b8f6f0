"""PNG renderings of a stage's DVC plots, logged beside them as MLflow artifacts."""

from __future__ import annotations

from pathlib import Path


def render_plot(path: Path, x: str | None, ys: list[str], name: str, out_dir: Path) -> Path | None:
    if not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    ys = [y for y in ys if y in df.columns]
    if not ys or (x is not None and x not in df.columns) or df.empty:
        return None
    scatter = name.startswith("scatter")  # DVC's scatter, scatter_jitter, our .dvc/plots/scatter_labelled
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for y in ys:
        d = df[[c for c in (x, y) if c]].dropna()
        xs = d[x] if x else d.index
        if scatter:
            ax.scatter(xs, d[y], label=y)
            labels = [c for c in df.columns if df[c].dtype == object]
            for i in d.index if labels else []:
                ax.annotate(str(df.at[i, labels[0]]), (xs[i], d.at[i, y]), fontsize=8)
        else:
            ax.plot(xs, d[y], label=y)
    ax.set_xlabel(x or "row")
    ax.set_title(f"{path.name}" if scatter or name == "linear" else f"{name} ({path.name})")
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend()
    stem = f"{path.stem}_{'_'.join(ys)}"
    out = out_dir / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
