"""`python -m kronos_model.finetune --config FILE [key=value ...]`; also what `torchrun` and the daemon launch.

Exit codes: 0 done, 2 bad config or data, 3 diverged (non-finite loss), 130 interrupted (resume by rerunning).
"""

from __future__ import annotations

import argparse
import logging
import sys

import structlog

from kronos_model.finetune import Interrupted, Trainer, TrainingDiverged, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronos_model.finetune", description=__doc__)
    parser.add_argument("--config", help="YAML fine-tuning config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    parser.add_argument("--skip-tokenizer", action="store_true", help="keep the base tokenizer (skip stage 1)")
    parser.add_argument("--skip-predictor", action="store_true", help="train the tokenizer only (skip stage 2)")
    args = parser.parse_args(argv)
    args.overrides += [f"skip_{stage}=true" for stage in ("tokenizer", "predictor")
                       if getattr(args, f"skip_{stage}")]
    if not structlog.is_configured():
        structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper("iso"),
                                        structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        config = load_config(args.config, args.overrides)
        metrics = Trainer(config).run()
    except Interrupted as exc:
        print(f"fine-tuning interrupted: {exc}", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"fine-tuning diverged: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"fine-tuning: error: {exc}", file=sys.stderr)
        return 2
    print(f"fine-tuning done: {metrics}; checkpoints in {config.output_dir}/best and /last", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
