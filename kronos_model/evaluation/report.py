"""report.json, report.md and the plots of a walk-forward evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kronos_model.evaluation import plots
from kronos_model.evaluation.backtest import BINANCE_SPOT_FEE
from kronos_model.evaluation.baselines import BASELINE_NAMES
from kronos_model.evaluation.calibrated import CALIBRATED_SUFFIX
from kronos_model.evaluation.models import ModelSource
from kronos_model.evaluation.scoring import (
    SIGNIFICANCE,
    WalkForward,
    backtest,
    buy_and_hold_backtest,
    format_interval,
    format_time,
    score_model,
    to_jsonable,
    verdicts,
)
from kronos_model.evaluation.walkforward import DEFAULT_BURN_IN, OriginPlan, Series, Settings

PLOT_FILES = {"fans": "fans.png", "error_by_horizon": "error_by_horizon.png", "calibration": "calibration.png",
              "equity": "equity.png"}


def build_report(walk: WalkForward, plan: OriginPlan, series: Series, sources: list[ModelSource],
                 settings: Settings, data_source: str, fee: float = BINANCE_SPOT_FEE) -> dict[str, Any]:
    names = [s.name for s in sources] + list(BASELINE_NAMES)
    # each calibrated forecast right after its raw one
    names = [n for name in names for n in (name, name + CALIBRATED_SUFFIX) if n in walk.names]
    scores = {name: score_model(walk, name, fee) for name in names}
    evaluated = [n for name in (s.name for s in sources) for n in (name, name + CALIBRATED_SUFFIX) if n in scores]
    return {
        "symbol": series.symbol,
        "interval": format_interval(series.interval),
        "origins": len(walk.origin_times),
        "horizon": walk.horizon,
        "lookback": settings.lookback,
        "stride": walk.stride,
        "samples": settings.samples,
        "seed": settings.seed,
        "sampling": {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k},
        "period": {"first_origin": format_time(walk.origin_times[0]), "last_origin": format_time(walk.origin_times[-1]),
                   "last_target": format_time(walk.target_times[-1, -1])},
        "data": {"source": data_source, "candles": len(series.times), "first": format_time(series.times[0]),
                 "last": format_time(series.times[-1]), "derived_amounts": series.derived_amounts},
        "candidate_origins": plan.candidates,
        "excluded_recent_origins": plan.excluded_recent,
        "exclusion_scope": "trained symbols" if settings.same_symbol_exclusion else "every symbol",
        "warnings": plan.warnings,
        "fee_per_side": fee,
        "models": scores,
        "buy_and_hold": buy_and_hold_backtest(walk, fee).to_dict(),
        "verdicts": {name: verdicts(scores, name) for name in evaluated},
        "calibration": calibration_summary(walk, settings),
        "model_sources": {s.name: s.describe() for s in sources},
        "origin_times": [format_time(t) for t in walk.origin_times],
        "plots": PLOT_FILES,
    }


def calibration_summary(walk: WalkForward, settings: Settings) -> dict[str, Any] | None:
    """How the --calibrate rows were made: the calibrator, the burn-in (default and used), per model when its
    scored origins were first calibrated. None without --calibrate."""
    if walk.calibration is None:
        return None
    config = walk.calibration["config"]
    period = walk.calibration["burn_in_period"]
    runs = walk.calibration["runs"]
    return {
        "method": config.method, "levels": list(config.levels), "min_history": config.min_history,
        "window": config.window, "burn_in_origins": walk.calibration["burn_in"],
        "default_burn_in_origins": DEFAULT_BURN_IN,
        "burn_in_period": [format_time(t) for t in period] if period else None,
        "models": {name: {"outcomes_before_first_scored": run.outcomes_before_first_scored,
                          "scored_steps_calibrated": float(run.grid.step_calibrated.mean()),
                          "counters": run.counters} for name, run in runs.items()},
    }


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def render_markdown(report: dict[str, Any]) -> str:
    """The report for people: the comparison with the baselines first, then calibration, trading, setup."""
    models = report["models"]
    evaluated = list(report["verdicts"])
    lines = [f"# Walk-forward evaluation: {report['symbol']} {report['interval']}", ""]
    lines += [f"{report['origins']} origins from {report['period']['first_origin']} to "
              f"{report['period']['last_origin']}, {report['horizon']} candles ahead, every model and baseline on "
              f"the same origins. A win is claimed only when the Diebold-Mariano test (Harvey-Leybourne-Newbold) "
              f"gives p < {SIGNIFICANCE}.", "", "## Verdict", ""]
    for name in evaluated:
        lines += [f"- {line}" for line in report["verdicts"][name]]
    lines += ["", "## Point and probabilistic scores (close)", "",
              "| model | MAE | MAE / random walk | DM p (MAE) | MASE | RMSE | MAPE | CRPS | CRPS skill vs vol band "
              "| direction [95 % CI] | IC | rank IC |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in models.items():
        low, high = s["direction_ci"]
        direction = (f"{_percent(s['direction_accuracy'])} [{_percent(low)}, {_percent(high)}]"
                     if s["direction_accuracy"] is not None else "no calls")
        lines.append(f"| {name} | {_number(s['mae'])} | {_number(s['relative_mae'], 3)} | "
                     f"{_number(s['dm_pvalue_vs_random_walk'], 3)} | {_number(s['mase'], 3)} | {_number(s['rmse'])} | "
                     f"{_number(s['mape'], 3)} % | {_number(s['crps'])} | {_number(s['crps_skill_vs_vol_band'], 3)} | "
                     f"{direction} | {_number(s['ic'], 3)} | {_number(s['rank_ic'], 3)} |")
    lines += ["", "## Calibration", "",
              "| model | coverage 50 % | coverage 80 % | coverage 90 % | width 90 % (% of price) | PIT KS | "
              "quantile loss |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in models.items():
        lines.append(f"| {name} | {_percent(s['coverage_50'])} | {_percent(s['coverage_80'])} | "
                     f"{_percent(s['coverage_90'])} | {_number(s['width_90_pct_of_price'], 3)} | "
                     f"{_number(s['pit_ks'], 3)} | {_number(s['quantile_loss'])} |")
    lines += _calibrated_section(report)
    lines += _by_step(report, [name for name in evaluated if not name.endswith(CALIBRATED_SUFFIX)])
    hold = report["buy_and_hold"]
    lines += ["", f"## Long/flat backtest ({100 * report['fee_per_side']:.2f} % fee per side)", "",
              "| strategy | return | Sharpe | max drawdown | hit rate | turnover | time long |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| buy and hold | {_percent(hold['total_return'])} | {_number(hold['sharpe'], 3)} | "
              f"{_percent(hold['max_drawdown'])} | {_percent(hold['hit_rate'])} | {_number(hold['turnover'], 3)} | "
              f"{_percent(hold['long_share'])} |"]
    for name, s in models.items():
        b = s["backtest"]
        lines.append(f"| {name} | {_percent(b['total_return'])} | {_number(b['sharpe'], 3)} | "
                     f"{_percent(b['max_drawdown'])} | {_percent(b['hit_rate'])} | {_number(b['turnover'], 3)} | "
                     f"{_percent(b['long_share'])} |")
    lines += ["", "## Setup", "",
              f"- data: {report['data']['source']} ({report['data']['candles']} candles, {report['data']['first']} "
              f"to {report['data']['last']}); empty amount cells derived as volume x mean price: "
              f"{report['data']['derived_amounts']}",
              f"- look-back {report['lookback']}, horizon {report['horizon']}, stride {report['stride']}, "
              f"{report['samples']} sample paths, seed {report['seed']}, temperature "
              f"{report['sampling']['temperature']}, top_p {report['sampling']['top_p']}, top_k "
              f"{report['sampling']['top_k']}",
              f"- {report['candidate_origins']} possible origins; {report['excluded_recent_origins']} of the most "
              "recent ones were excluded as inside a checkpoint's training/validation period"]
    for name, source in report["model_sources"].items():
        ranges = ", ".join(f"{r['start']} to {r['end']} ({r['reason']})" for r in source["excluded_ranges"])
        lines.append(f"- {name}: {source['location']} (tokenizer {source['tokenizer']})"
                     + (f"; excluded {ranges}" if ranges else ""))
    lines += [f"- warning: {w}" for w in report["warnings"]]
    lines += ["", "## How to read this", "",
              "- Point forecast = per-step median of the sample closes. MASE divides by the mean one-candle change "
              "in each origin's look-back; MAE / random walk is the error relative to 'nothing changes'.",
              "- MAPE of price levels is small for every model and flatters them; the ratios and tests matter.",
              "- CRPS uses the samples' empirical distribution (a point forecast's CRPS is its absolute error); "
              "the vol band is a log-normal around the last close with EWMA (0.94) volatility.",
              "- Direction counts only steps where the forecast and the market moved; the pooled 95 % interval "
              "treats each origin as one observation because the steps of one origin move together.",
              "- IC / rank IC: correlation across origins of predicted and realised return at the last step.",
              "- DM p-values compare per-origin mean losses against the random walk, two-sided.", "",
              "## Plots", ""]
    lines += [f"![{key}]({file})" for key, file in report["plots"].items()]
    return "\n".join(lines) + "\n"


def _calibrated_section(report: dict[str, Any]) -> list[str]:
    """Raw against calibrated, on the same quantile grid, overall and per volatility regime and year."""
    summary = report.get("calibration")
    if not summary:
        return []
    models = report["models"]
    period = summary["burn_in_period"]
    lines = ["", "## Raw vs calibrated (walk-forward, sequential)", "",
             f"Calibrator: {summary['method']}. Burn-in: {summary['burn_in_origins']} origins "
             f"(default {summary['default_burn_in_origins']})"
             + (f" from {period[0]} to {period[1]}" if period else "") + ", forecast and fed to the calibrator but "
             "not scored; each scored origin is calibrated only on outcomes that had closed by its origin. CRPS and "
             f"pinball loss here are on the {len(summary['levels'])}-level quantile grid for both rows.", "",
             "| model | coverage 50 % | coverage 80 % | coverage 90 % | CRPS (grid) | pinball loss | Brier P(up) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    pairs = [name for name in models if name + CALIBRATED_SUFFIX in models]
    for name in pairs:
        for row in (name, name + CALIBRATED_SUFFIX):
            s = models[row]
            lines.append(f"| {row} | {_percent(s['coverage_50'])} | {_percent(s['coverage_80'])} | "
                         f"{_percent(s['coverage_90'])} | {_number(s['crps_grid'])} | {_number(s['pinball_loss'])} | "
                         f"{_number(s['brier_prob_up'], 3)} |")
    lines += ["", "| model | regime | origins | coverage 80 % | coverage 90 % | CRPS (grid) | Brier P(up) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in pairs:
        for row in (name, name + CALIBRATED_SUFFIX):
            for label, entry in models[row].get("by_regime", {}).items():
                lines.append(f"| {row} | {label} | {entry['origins']} | {_percent(entry['coverage_80'])} | "
                             f"{_percent(entry['coverage_90'])} | {_number(entry['crps'])} | "
                             f"{_number(entry['brier_prob_up'], 3)} |")
    return lines


def _by_step(report: dict[str, Any], evaluated: list[str]) -> list[str]:
    """Per horizon step of each evaluated model: where along the horizon it wins or loses."""
    models = report["models"]
    reference, band = models["random_walk"]["per_step"], models["vol_band"]["per_step"]
    lines = ["", "## By horizon step", "",
             "| model | step | MAE / random walk | DM p (MAE) | CRPS / vol band | coverage 90 % | direction |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in evaluated:
        step_scores = models[name]["per_step"]
        for h in range(report["horizon"]):
            mae_ratio = step_scores["mae"][h] / reference["mae"][h] if reference["mae"][h] else None
            crps_ratio = step_scores["crps"][h] / band["crps"][h] if band["crps"][h] else None
            lines.append(f"| {name} | {h + 1} | {_number(mae_ratio, 3)} | "
                         f"{_number(step_scores['dm_pvalue_vs_random_walk'][h], 3)} | {_number(crps_ratio, 3)} | "
                         f"{_percent(step_scores['coverage_90'][h])} | "
                         f"{_percent(step_scores['direction_accuracy'][h])} |")
    return lines


def write_report(report: dict[str, Any], walk: WalkForward, out: Path) -> list[Path]:
    """Write report.json, report.md and the PNGs into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    evaluated = list(report["verdicts"])
    written = [
        plots.fan_chart(walk, evaluated, out / PLOT_FILES["fans"]),
        plots.error_by_horizon(walk, report["models"], out / PLOT_FILES["error_by_horizon"]),
        plots.calibration(walk, report["models"], out / PLOT_FILES["calibration"]),
        plots.equity_curves(walk, {n: backtest(walk, n, report["fee_per_side"]) for n in report["models"]},
                            buy_and_hold_backtest(walk, report["fee_per_side"]), out / PLOT_FILES["equity"]),
    ]
    json_path = out / "report.json"
    json_path.write_text(json.dumps(to_jsonable(report), indent=2))
    markdown_path = out / "report.md"
    markdown_path.write_text(render_markdown(to_jsonable(report)))
    return [json_path, markdown_path, *written]
