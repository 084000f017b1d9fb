"""report.md of ``steer-fast reproduce``, from results.json alone (the numbers: ``summary.py``;
the paper's: ``published.py``; the plots: ``plots.py``).

Every trained method's learning rate is its validation-best at the selection seed; its reported
accuracy is the mean test accuracy over the seeds run at that rate, beside its binomial and seed
standard errors. A difference is called one only beyond 2 standard errors of the difference;
methods are listed in a fixed order, never ranked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .methods import METHOD_NAMES, METHODS
from .published import (
    CLAIMS,
    PAPER_SETUP,
    PAPER_TRAINABLE_PERCENT,
    PUBLISHED_LISTOPS,
    PUBLISHED_SOURCE,
    published_difference,
)
from .selection import grid_sizes, sweep_runs
from .summary import (
    NOISE_SE,
    Row,
    difference,
    is_noise,
    noise_points,
    plateau,
    reported,
    selection_seed,
    summarize,
)

REFERENCE = "full"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


def rate_text(rate: Any) -> str:
    """A learning rate for the report: "-", "2e-05", or "lora 0.0003 + steering 0.002"."""
    if rate is None:
        return "-"
    if isinstance(rate, dict):
        return f"lora {rate['lora']:g} + steering {rate['steering']:g}"
    return f"{rate:g}"


def _delta_cell(a: Row | None, b: Row | None) -> str:
    if a is None or b is None or a is b:
        return "-"
    delta, se = difference(a, b)
    return f"{_signed(delta)} +- {_points(se)}" + (" (noise)" if is_noise(delta, se) else "")


def verdict(row: Row | None, others: list[Row | None], kind: str) -> str:
    """The measured result next to one claim, in words, without ranking on noise."""
    if row is None or not others or any(o is None for o in others):
        return "not run"
    best = max(others, key=lambda o: o.accuracy)
    delta, se = difference(row, best)
    measured = f"{row.method} - {best.method}: {_signed(delta)} +- {_points(se)} points"
    if is_noise(delta, se):
        if kind == "close":
            return (
                f"{measured}: within noise (2 SE = {_points(NOISE_SE * se)} points): consistent "
                "with the claim, but too few test items or seeds to resolve a 1-point gap"
            )
        return f"{measured}: within noise: does not support the claim (no difference shown)"
    if delta > 0:
        verdict = "above, beyond noise" if kind == "close" else "higher beyond noise: supports it"
        return f"{measured}: {verdict}"
    return f"{measured}: lower beyond noise: contradicts the claim here"


def _accuracy_lines(task: str, rows: list[Row]) -> list[str]:
    reference = reported(rows, REFERENCE)
    lines = [
        f"### {task}",
        "",
        "| method | learning rate | chosen by | seeds | test accuracy +- binomial SE | seed SE "
        f"| vs {REFERENCE} | trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = row.label if row.chosen else f"({row.label})"
        seeds = ", ".join("-" if s is None else str(s) for s in row.seeds)
        seed_se = "1 seed: not measured" if row.seed_stderr is None else _points(row.seed_stderr)
        if row.method == "base":
            seed_se = "-"
        lines.append(
            f"| {name} | {rate_text(row.rate)} | {row.how} | {seeds} | "
            f"{_points(row.accuracy)} +- {_points(row.binomial_stderr)} | {seed_se} | "
            f"{_delta_cell(row, reference)} | {row.trainable_percent:.3g}% |"
        )
    return [*lines, ""]


def _published_lines(results: dict[str, Any], rows: list[Row]) -> list[str]:
    models = list(PUBLISHED_LISTOPS)
    settings = results.get("settings", {})
    lines = [
        "## ListOps beside the published numbers",
        "",
        f"Published: {PUBLISHED_SOURCE}. Ours: `{settings.get('model')}` on generated ListOps "
        f"(at most {settings.get('listops_max_tokens')} tokens). Each column's difference is "
        "to its own full fine-tuning; only ours has a standard error (the post gives none).",
        "",
        "| method | ours | ours vs full | " + " | ".join(f"{m} | vs full" for m in models) + " |",
        "|---|---|---|" + "---|---|" * len(models),
    ]
    full = reported(rows, "full")
    for method in ("full", "lora", "loreft", "steer_silu", "steer_identity", "steer_vector"):
        row = reported(rows, method)
        ours = "-" if row is None else f"{_points(row.accuracy)} +- {_points(row.stderr)}"
        cells = [ours, _delta_cell(row, full) if method != "full" else "-"]
        for model in models:
            table = PUBLISHED_LISTOPS[model]
            value = table.get(method)
            cells.append("-" if value is None else f"{value:.1f}")
            cells.append(
                "-" if value is None or method == "full" else f"{value - table['full']:+.1f}"
            )
        label = method if row is None else row.label
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _claim_lines(table: dict[str, list[Row]], results: dict[str, Any]) -> list[str]:
    lines = [
        "## The paper's claims, as measured here",
        "",
        "Published: the same comparison on ListOps in Table 1 (Llama-3.2-1B / gemma-3-1b), in "
        "points. Measured: per task, the difference +- its standard error, and what it says.",
        "",
        "| the paper | published ListOps | measured here, per task |",
        "|---|---|---|",
    ]
    for claim, method, others, kind in CLAIMS:
        published = [published_difference(m, method, others) for m in PUBLISHED_LISTOPS]
        published_text = " / ".join("-" if p is None else f"{p:+.1f}" for p in published)
        verdicts = [
            f"{task}: " + verdict(reported(rows, method), [reported(rows, o) for o in others], kind)
            for task, rows in table.items()
        ]
        lines.append(f"| {claim} | {published_text} | " + "<br>".join(verdicts) + " |")
    steer = [reported(rows, "steer_silu") for rows in table.values()]
    steer = [row for row in steer if row is not None]
    lines.append(
        f"| post-block steering trains {PAPER_TRAINABLE_PERCENT}% of the parameters "
        "(models of 1B-8B parameters) | - | "
        + (
            f"{steer[0].trainable_percent:.3g}% of this model's "
            f"{results.get('model_parameters', 0):,} (the share grows as the model shrinks: "
            "2 r d per layer)"
            if steer
            else "not run"
        )
        + " |"
    )
    return [*lines, ""]


def _differences_lines(results: dict[str, Any], table: dict[str, list[Row]]) -> list[str]:
    settings = results.get("settings", {})
    runs = results.get("runs", [])
    steps = sorted({r["train"]["steps"] for r in runs if r.get("train")})
    seen = [s * settings.get("batch_size", 0) * settings.get("grad_accum", 0) for s in steps]
    seeds = sorted({len(row.runs) for rows in table.values() for row in rows if row.chosen})
    sizes = sorted(
        {n for t in table for n in grid_sizes(runs, t, selection_seed(results)).values()}
    )
    ours = {
        "models": f"`{settings.get('model')}`, {results.get('model_parameters', 0):,} parameters",
        "data": f"generated ListOps of at most {settings.get('listops_max_tokens')} tokens "
        f"(and the other tasks), {settings.get('train_size')} training examples per task",
        "training": f"{', '.join(map(str, steps)) or '-'} optimizer steps of "
        f"{settings.get('batch_size')} x {settings.get('grad_accum')} "
        f"({', '.join(map(str, seen)) or '-'} examples seen)",
        "rates": f"{', '.join(map(str, sizes)) or '-'} rates per swept method, chosen on "
        f"{settings.get('validation_size')} validation examples",
        "seeds": f"{', '.join(map(str, seeds)) or '-'} per reported row",
    }
    lines = [
        "## What still differs from the paper's setup",
        "",
        "| | the paper | here |",
        "|---|---|---|",
        *(f"| {k} | {PAPER_SETUP[k]} | {ours[k]} |" for k in PAPER_SETUP),
        "",
        "A measured difference speaks for this model, data and training length only: a smaller "
        "model, fewer steps and less data can change which method is ahead, and a difference "
        "within the noise supports no ranking either way.",
        "",
    ]
    return lines


def _sweep_lines(results: dict[str, Any], table: dict[str, list[Row]]) -> list[str]:
    seed = selection_seed(results)
    runs = results.get("runs", [])
    lines = [
        "## Learning-rate sweeps",
        "",
        f"At seed {seed}: each rate's validation accuracy (test accuracy in brackets, not used "
        "for the choice), and the chosen rate.",
        "",
        "| task | method | rates: validation (test) | chosen | rates tried |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for task, rows in table.items():
        for row in rows:
            sweep = sweep_runs(runs, task, row.method, seed)
            if not row.chosen and row.method != "loreft" or not sweep or row.how == "-":
                continue
            cells = ", ".join(
                f"{r['learning_rate']:g}: {_points((r.get('validation') or {}).get('accuracy'))} "
                f"({_points(r['test']['accuracy'])})"
                for r in sweep
            )
            lines.append(
                f"| {task} | {row.method} | {cells} | {rate_text(row.rate)} | {len(sweep)} |"
            )
        sizes = grid_sizes(runs, task, seed)
        if len(set(sizes.values())) > 1:
            notes.append(
                f"- {task}: the sweeps differ in size ("
                + ", ".join(f"{m} {n}" for m, n in sizes.items())
                + " rates): a method with fewer rates was tuned less than the others."
            )
        if any(n < 3 for n in sizes.values()):
            notes.append(
                f"- {task}: a sweep of fewer than 3 rates cannot show a best rate inside it."
            )
    return [*lines, "", *notes, *([""] if notes else [])]


def _curve_lines(results: dict[str, Any]) -> list[str]:
    curves = [r for r in results.get("runs", []) if r.get("validation_curve")]
    if not curves:
        return []
    lines = [
        "## Validation accuracy during training",
        "",
        "| task | method | seed | learning rate | validation accuracy by step | levelled off? |",
        "|---|---|---|---|---|---|",
    ]
    for run in curves:
        curve = run["validation_curve"]
        points = ", ".join(f"{p['step']}: {_points(p['accuracy'])}" for p in curve)
        lines.append(
            f"| {run['task']} | {run['method']} | {run['seed']} | "
            f"{rate_text(run['learning_rate'])} | {points} | {plateau(curve)} |"
        )
    return [*lines, ""]


def _cost_lines(results: dict[str, Any], table: dict[str, list[Row]]) -> list[str]:
    settings = results.get("settings", {})
    lines = [
        "## Cost",
        "",
        "Seconds per optimizer step (median; effective batch "
        f"{settings.get('batch_size')} x {settings.get('grad_accum')}) and peak memory of one "
        "step.",
        "",
        "| task | method | s/step | peak memory |",
        "|---|---|---|---|",
    ]
    for task, rows in table.items():
        for row in rows:
            seconds = row.train_median("seconds_per_step")
            memory = _bytes(row.train_median("peak_memory_bytes"))
            lines.append(
                f"| {task} | {row.label} | {'-' if seconds is None else f'{seconds:.2f}'} "
                f"| {memory} |"
            )
    return [*lines, ""]


def _notes(table: dict[str, list[Row]]) -> list[str]:
    notes = []
    for task, rows in table.items():
        for row in rows:
            projections = {
                tuple((r.get("train") or {}).get("projection_steps") or []) for r in row.runs
            }
            if row.method == "joint_orth" and projections:
                steps = sorted(projections)[0]
                acting = [s for s in steps if s > 0]
                notes.append(
                    f"- {task} {row.label}: the constraint projected at steps "
                    f"{', '.join(map(str, steps)) or '-'}; {len(acting)} of them after step 0 "
                    "(at step 0 LoRA's B is zero and a projection changes nothing)"
                    + (
                        ": it never acted, so this row trains as joint_plain does."
                        if not acting
                        else "."
                    )
                )
        single = [r.label for r in rows if r.chosen and r.method != "base" and len(r.runs) == 1]
        if single:
            notes.append(
                f"- {task}: one seed for {', '.join(single)}: their standard error is the binomial "
                "one alone, without the training noise."
            )
        losers = [r.label for r in rows if not r.chosen and r.how != "the paper's joint rate"]
        if losers:
            notes.append(
                f"- {task}: {', '.join(losers)} lost the validation choice of its family; shown "
                "in brackets, not reported."
            )
    return ["## Notes", "", *notes, ""] if notes else []


def _setup_lines(results: dict[str, Any]) -> list[str]:
    settings = results.get("settings", {})
    env = results.get("environment", {})
    versions, machine = env.get("versions", {}), env.get("machine", {})
    runs = results.get("runs", [])
    lines = [
        f"Model `{settings.get('model')}` ({results.get('model_parameters', 0):,} parameters, "
        "fp32), " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model") + ".",
        f"Runs: {len(runs)}, {sum(r.get('seconds', 0) for r in runs) / 3600:.1f} hours.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} cores, "
        f"{machine.get('torch_threads')} torch threads"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + ".",
        "",
        *(f"    {command}" for command in results.get("commands", [])),
        "",
        "| task | train | validation | test |",
        "|---|---|---|---|",
        *(
            f"| {t} | {v['train']} | {v['validation']} | {v['test']} |"
            for t, v in results.get("tasks", {}).items()
        ),
    ]
    return lines


def build_report(results: dict[str, Any]) -> str:
    """The markdown report of a results dict (results.json, format 2)."""
    table = summarize(results)
    lines = ["# steer-fast reproduce", "", *_setup_lines(results)]
    n_items = sorted({row.n for rows in table.values() for row in rows})
    lines += [
        "",
        "## How to read the numbers",
        "",
        "Every trained method's learning rate is its best on the validation split at seed "
        f"{selection_seed(results)}; its accuracy is the mean test accuracy over the seeds run at "
        "that rate, in points (%), +- the binomial standard error sqrt(p(1-p)/n) over the n "
        "test items, beside the standard error over seeds (sd / sqrt(seeds)). A difference "
        "between two methods has the standard error sqrt(SE_a^2 + SE_b^2), each SE combining "
        f"both; differences within {NOISE_SE:g} standard errors of the difference are noise"
        + (
            f" (with {n_items[0]} test items and one seed, about "
            f"{noise_points(n_items[0]):.0f} points near 50% accuracy)"
            if n_items
            else ""
        )
        + ". Methods are listed in a fixed order; they are not ranked, and a difference marked "
        "(noise) says nothing about which method is better.",
        "",
    ]
    if not table:
        return "\n".join(lines + ["No runs yet.", ""])
    lines += ["## Accuracy", ""]
    for task, rows in table.items():
        lines += _accuracy_lines(task, rows)
    if "listops" in table:
        lines += _published_lines(results, table["listops"])
    lines += _claim_lines(table, results)
    lines += _differences_lines(results, table)
    lines += _sweep_lines(results, table)
    lines += _curve_lines(results)
    lines += _cost_lines(results, table)
    lines += _notes(table)
    skipped = results.get("skipped") or {}
    if skipped:
        lines += [
            "## Skipped",
            "",
            *(f"- {name}: {reason}" for name, reason in skipped.items()),
            "",
        ]
    methods = [
        m for m in METHOD_NAMES if any(r.method == m for rows in table.values() for r in rows)
    ]
    lines += ["## Methods", ""]
    lines += [
        f"- `{m}`: {METHODS[m].description}; learning rate schedule {METHODS[m].schedule}, "
        f"warmup ratio {METHODS[m].warmup_ratio:g}"
        for m in methods
    ]
    lines += ["", "Plots: [accuracy.png](accuracy.png), [loss.png](loss.png).", ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write report.md and the plots into ``out``; returns the files."""
    from .plots import write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(build_report(results), encoding="utf-8")
    return [path, *write_plots(results, out)]
