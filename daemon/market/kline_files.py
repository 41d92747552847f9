"""Reading candle files (Binance kline CSV / CSV.gz / zip, Parquet) with a strict check.

A bad file gets a report of everything wrong with it and is refused; nothing is silently dropped,
sorted or repaired. The only normalisation is the documented one: Binance's archive writes spot
timestamps in microseconds from 2025 on, and those are converted to milliseconds.
"""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from storage.intervals import format_ms, grid_offset_ms, interval_ms

# Binance kline file layout (12 columns; the last, "ignore", is dropped on read).
KLINE_FILE_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
)

REQUIRED_VALUES = ("open_time", "open", "high", "low", "close", "volume")
# Binance publishes milliseconds; anything above this is microseconds (year 2286 in ms). kronos_model.data
# has the same rule for the model's files: the two packages never import each other.
_MICROSECOND_THRESHOLD = 10**13
_NAME_PATTERN = re.compile(r"^([A-Z0-9]{3,})[-_](\d+[smhdwM])(?:[-_.]|$)")
_INTERVAL_PATTERN = re.compile(r"[-_](\d+[smhdwM])(?:[-_.]|$)")
_EXAMPLES = 5
# The largest monthly 1s file Binance publishes unpacks to about 200 MB.
MAX_MEMBER_BYTES = 1 << 30


class BadKlineFile(ValueError):
    """The file is not a clean Binance kline table; the message lists every problem found."""


@dataclass
class FileCheck:
    path: Path
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    off_grid_rows: int = 0
    converted_microseconds: int = 0

    def report(self) -> str:
        lines = [f"{self.path}: {self.rows} rows"]
        lines += [f"  problem: {problem}" for problem in self.problems]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def infer_symbol_interval(path: Path) -> tuple[str | None, str | None]:
    """`BTCUSDT_1h.parquet`, `BTCUSDT-1h-2024-01.zip` → ("BTCUSDT", "1h"); `candles_1h.csv` → (None, "1h")."""
    match = _NAME_PATTERN.match(path.name)
    if match:
        return match.group(1), match.group(2)
    interval = _INTERVAL_PATTERN.search(path.name)
    return None, interval.group(1) if interval else None


def _read_csv_bytes(data: bytes, source: str) -> pl.DataFrame:
    text_start = data.lstrip()[:1]
    has_header = not text_start.isdigit()
    if has_header:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
        frame = frame.rename({name: name.strip().lower() for name in frame.columns})
    else:
        frame = pl.read_csv(io.BytesIO(data), has_header=False, infer_schema=False)
        if frame.width not in (11, 12):
            raise BadKlineFile(
                f"{source}: a headerless kline CSV must have 12 columns (Binance layout), found {frame.width}"
            )
        frame = frame.rename(dict(zip(frame.columns, [*KLINE_FILE_COLUMNS, "ignore"][: frame.width], strict=True)))
    return frame


def _read_raw(path: Path) -> pl.DataFrame:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as archive:
                content, source = _read_zip_member(archive, str(path))
        except (zipfile.BadZipFile, EOFError) as exc:
            raise BadKlineFile(f"{path}: not a readable zip ({exc})") from None
        return _read_csv_bytes(content, source)
    if name.endswith(".csv.gz") or name.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            return _read_csv_bytes(handle.read(), str(path))
    if name.endswith(".csv"):
        return _read_csv_bytes(path.read_bytes(), str(path))
    raise BadKlineFile(f"{path}: unsupported file type; expected .csv, .csv.gz, .zip (Binance archive) or .parquet")


def _to_numbers(frame: pl.DataFrame, check: FileCheck) -> pl.DataFrame:
    """Cast every column to its number type; cells that are not numbers become problems, not nulls."""
    casts = []
    for column in KLINE_FILE_COLUMNS:
        if column not in frame.columns:
            casts.append(pl.lit(None, dtype=pl.Float64).alias(column))
            continue
        as_text = pl.col(column).cast(pl.String).str.strip_chars()
        as_text = pl.when(as_text == "").then(None).otherwise(as_text)
        casts.append(as_text.cast(pl.Float64, strict=False).alias(column))
        bad = frame.with_row_index("row").filter(
            pl.col(column).is_not_null()
            & (pl.col(column).cast(pl.String).str.strip_chars() != "")
            & pl.col(column).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False).is_null()
        )
        if bad.height:
            examples = ", ".join(f"row {r + 2}: {v!r}" for r, v in bad.select("row", column).head(_EXAMPLES).rows())
            check.problems.append(f"{bad.height} cells in {column} are not numbers ({examples})")
    return frame.select(casts)


def read_kline_file(
    path: str | Path,
    *,
    symbol: str | None = None,
    interval: str | None = None,
    allow_off_grid: bool = False,
) -> tuple[pl.DataFrame, FileCheck]:
    """Read and check a kline file; returns a candle batch (source 'import') and the check.

    Raises BadKlineFile listing every problem when the file is not clean.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    inferred_symbol, inferred_interval = infer_symbol_interval(path)
    symbol = (symbol or inferred_symbol or "").upper()
    interval = interval or inferred_interval
    if not symbol or not interval:
        raise ValueError(
            f"{path.name}: cannot tell the symbol and interval from the file name; pass --symbol and --interval"
        )
    return check_kline_table(_read_raw(path), path, symbol, interval, allow_off_grid=allow_off_grid)


def _read_zip_member(archive: zipfile.ZipFile, source: str) -> tuple[bytes, str]:
    members = [m for m in archive.infolist() if m.filename.lower().endswith(".csv")]
    if len(members) != 1:
        names = [m.filename for m in members] or "none"
        raise BadKlineFile(f"{source}: expected one .csv inside the zip, found {names}")
    if members[0].file_size > MAX_MEMBER_BYTES:
        raise BadKlineFile(f"{source}: {members[0].filename} unpacks to {members[0].file_size} bytes, more than "
                           f"any kline file ({MAX_MEMBER_BYTES})")
    return archive.read(members[0]), f"{source}:{members[0].filename}"


def read_archive_zip(data: bytes, name: str, symbol: str, interval: str) -> tuple[pl.DataFrame, FileCheck]:
    """A data.binance.vision zip (already checksum-verified) → candle batch with source 'archive'.

    Any bytes in: a candle batch out, or BadKlineFile saying what is wrong (a truncated or corrupt zip,
    a CSV that is not a kline table); never another exception."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            content, source = _read_zip_member(archive, name)
        raw = _read_csv_bytes(content, source)
        frame, check = check_kline_table(raw, Path(name), symbol, interval, allow_off_grid=True)
    except BadKlineFile:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError,
            ValueError, pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
        raise BadKlineFile(f"{name}: not a readable kline archive ({type(exc).__name__}: {str(exc)[:200]})") from None
    return frame.with_columns(pl.lit("archive").alias("source")), check


def check_kline_table(
    raw: pl.DataFrame, path: Path, symbol: str, interval: str, *, allow_off_grid: bool
) -> tuple[pl.DataFrame, FileCheck]:
    """Check a raw kline table and turn it into a candle batch; raises BadKlineFile on problems."""
    step = interval_ms(interval)
    check = FileCheck(path)
    check.rows = raw.height
    unknown = sorted(set(raw.columns) - set(KLINE_FILE_COLUMNS) - {"ignore"})
    missing = [c for c in REQUIRED_VALUES if c not in raw.columns]
    if unknown or missing:
        raise BadKlineFile(
            f"{path}: wrong columns (missing {missing}, unexpected {unknown}); expected Binance kline columns "
            f"{', '.join(KLINE_FILE_COLUMNS)}"
        )
    frame = _to_numbers(raw, check)
    for column in REQUIRED_VALUES:
        text = raw[column].cast(pl.String).str.strip_chars()
        empty = int((text.is_null() | (text == "") | (text.str.to_lowercase() == "nan")).sum())
        if empty:
            check.problems.append(f"{empty} rows have no value (empty or NaN) in required column {column}")
    for column in ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote", "close_time"):
        empty = frame.filter(pl.col(column).is_null()).height
        if empty and column in raw.columns:
            check.notes.append(f"{empty} rows have no {column} (stored as NULL)")
    if check.problems:
        raise BadKlineFile(check.report())

    for column in ("open_time", "close_time"):
        micro = pl.col(column) > _MICROSECOND_THRESHOLD
        converted = frame.filter(micro).height
        if converted:
            frame = frame.with_columns(
                pl.when(micro).then(pl.col(column) / 1000).otherwise(pl.col(column)).alias(column)
            )
            check.converted_microseconds = max(check.converted_microseconds, converted)
    if check.converted_microseconds:
        check.notes.append(
            f"{check.converted_microseconds} rows had microsecond times (archive 2025+); converted to ms"
        )

    frame = frame.with_columns(
        pl.col("open_time").cast(pl.Int64),
        pl.col("close_time").fill_null(pl.col("open_time") + step - 1).cast(pl.Int64),
        pl.col("trades").cast(pl.Int64),
    )
    _check_order_and_values(frame, interval, step, allow_off_grid, check)
    if check.problems:
        raise BadKlineFile(check.report())
    candles = frame.with_columns(
        pl.lit(symbol).alias("symbol"),
        pl.lit(interval).alias("interval"),
        pl.lit(True).alias("is_closed"),
        pl.lit("import").alias("source"),
    )
    return candles, check


def _examples(frame: pl.DataFrame) -> str:
    return ", ".join(
        f"row {row + 2} ({format_ms(t)})" for row, t in frame.select("row", "open_time").head(_EXAMPLES).rows()
    )


def _check_order_and_values(
    frame: pl.DataFrame, interval: str, step: int, allow_off_grid: bool, check: FileCheck
) -> None:
    indexed = frame.with_row_index("row")
    unsorted = indexed.filter(pl.col("open_time") < pl.col("open_time").shift(1))
    if unsorted.height:
        check.problems.append(f"{unsorted.height} rows are earlier than the row before them: {_examples(unsorted)}")
    duplicated = indexed.filter(pl.col("open_time").is_duplicated())
    if duplicated.height:
        check.problems.append(f"{duplicated.height} rows share an open_time with another row: {_examples(duplicated)}")
    off_grid = indexed.filter((pl.col("open_time") - grid_offset_ms(interval)) % step != 0)
    check.off_grid_rows = off_grid.height
    if off_grid.height:
        message = f"{off_grid.height} rows are off the {interval} grid: {_examples(off_grid)}"
        if allow_off_grid:
            check.notes.append(message + " (kept as published: --allow-off-grid)")
        else:
            check.problems.append(
                message + ". Binance itself published such rows after its February 2018 restart; "
                "pass --allow-off-grid to keep them as published"
            )
    violations = indexed.filter(
        (pl.col("low") > pl.min_horizontal("open", "close"))
        | (pl.col("high") < pl.max_horizontal("open", "close"))
        | (pl.col("low") > pl.col("high"))
    )
    if violations.height:
        check.problems.append(f"{violations.height} rows break low <= open, close <= high: {_examples(violations)}")
    non_positive = indexed.filter(pl.min_horizontal("open", "high", "low", "close") <= 0)
    if non_positive.height:
        check.problems.append(f"{non_positive.height} rows have a price <= 0: {_examples(non_positive)}")
    negative = indexed.filter(pl.col("volume") < 0)
    if negative.height:
        check.problems.append(f"{negative.height} rows have a negative volume: {_examples(negative)}")
    backwards = indexed.filter(pl.col("close_time") < pl.col("open_time"))
    if backwards.height:
        check.problems.append(f"{backwards.height} rows close before they open: {_examples(backwards)}")
