"""Why the median path jumps away from the last close at step 1: the tokenizer's reconstruction error of the
last look-back candle, measured on real candles, and what anchoring (`KronosPredictor.forecast(anchor=True)`)
does to the step-1 forecast.

For `--origins` origins `--stride` candles apart (the most recent ones of the file, or up to --end), each model
forecasts one step (`--samples` paths; step 1 needs nothing more) with and without anchoring, and the script
prints, in basis points of the last close:
- the reconstruction offset of the last candle's close (observed - tokenizer's reconstruction), mean |.|;
- the step-1 jump of the median path (median - last close), mean |.|, and its correlation with the offset
  (near 1: the jump is the offset);
- the step-1 MAE of the median against the random walk's (the last close), with and without anchoring.

    python benchmarks/anchoring_check.py --data daemon/assets/data/BTCUSDT_1h.parquet \\
        --model daemon/assets/checkpoints/tiny-random --model runs/finetune-demo/best
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from kronos_model.data import read_candles
from kronos_model.evaluation.models import load_model
from kronos_model.evaluation.walkforward import CLOSE, Settings, plan_origins, series_from_frame
from kronos_model.predictor import FEATURE_COLUMNS, KronosPredictor, reconstruction_offset

BASIS_POINTS = 1e4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", action="append", required=True, help="checkpoint dir (repeatable)")
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--origins", type=int, default=300)
    parser.add_argument("--stride", type=int, default=24)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--end", help="latest origin (UTC), e.g. 2022-12-31 to stay before a training period")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    series = series_from_frame(read_candles(args.data))
    end = np.datetime64(args.end, "ms") if args.end else None
    settings = Settings(lookback=args.lookback, horizon=1, origins=args.origins, samples=args.samples,
                        stride=args.stride, end=end)
    positions = plan_origins(series, args.lookback, settings, []).positions
    last = series.values[positions, CLOSE]
    actual = series.values[positions + 1, CLOSE]
    print(f"{series.symbol}: {len(positions)} origins {series.times[positions[0]]} .. {series.times[positions[-1]]}, "
          f"look-back {args.lookback}, {args.samples} paths; random-walk step-1 MAE "
          f"{np.abs(actual - last).mean() / last.mean() * BASIS_POINTS:.1f} bp")
    for location in args.model:
        source = load_model(location)
        predictor = KronosPredictor(source.model, source.tokenizer, device="cpu")
        frames = [series.values[p - args.lookback + 1 : p + 1] for p in positions]
        x_times = [series.times[p - args.lookback + 1 : p + 1] for p in positions]
        y_times = [series.times[p + 1 : p + 2] for p in positions]
        medians, offsets = {}, []
        for anchor in (False, True):
            step1 = []
            for first in range(0, len(positions), 64):
                chunk = slice(first, first + 64)
                batch = [pd.DataFrame(f, columns=list(FEATURE_COLUMNS)) for f in frames[chunk]]
                forecasts = predictor.forecast_batch(batch, x_times[chunk], y_times[chunk], 1,
                                                     sample_count=args.samples, seed=first, anchor=anchor)
                step1 += [np.median(f.close_paths[:, 0]) for f in forecasts]
                if not anchor:
                    prepared = [predictor._prepare(b, x, y, 1, "") for b, x, y in
                                zip(batch, x_times[chunk], y_times[chunk], strict=True)]
                    normed = torch.from_numpy(np.stack([p.normed for p in prepared])).float()
                    offset = reconstruction_offset(predictor.tokenizer, normed, predictor.max_context, 1)[:, CLOSE]
                    offsets += list(offset * np.array([p.std[CLOSE] + 1e-5 for p in prepared]))
            medians[anchor] = np.array(step1)
        offset_bp = np.array(offsets) / last * BASIS_POINTS
        jump_bp = (medians[False] - last) / last * BASIS_POINTS
        random_walk = np.abs(actual - last).mean()
        print(f"  {source.name}: reconstruction offset |close| {np.abs(offset_bp).mean():.1f} bp; step-1 jump of the "
              f"median |.| {np.abs(jump_bp).mean():.1f} bp (anchored "
              f"{np.abs((medians[True] - last) / last * BASIS_POINTS).mean():.1f} bp), corr(jump, -offset) "
              f"{np.corrcoef(jump_bp, -offset_bp)[0, 1]:.2f}; step-1 MAE / random walk "
              f"{np.abs(medians[False] - actual).mean() / random_walk:.3f} -> anchored "
              f"{np.abs(medians[True] - actual).mean() / random_walk:.3f}")


if __name__ == "__main__":
    main()
