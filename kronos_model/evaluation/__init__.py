"""Walk-forward evaluation of Kronos against baselines: metrics, baselines, backtest, engine, report and plots.

Entry points: `walkforward.run_walk_forward` (forecasts on common origins), `report.build_report` and
`report.write_report` (scores, report.json / report.md / PNGs). Does not import `daemon` or `storage`.
"""
