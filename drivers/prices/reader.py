"""A price CSV as real tools write it: compression, encoding, delimiter, header names, numbers.

What is accepted (docs/prices.md lists it for users):

- plain text, `.gz`, or a `.zip` holding one CSV (ERCOT and CAISO OASIS deliver zips);
  an Excel workbook is refused with a hint to save it as CSV;
- UTF-8 with or without a byte-order mark, UTF-16 with a mark (Excel's "Unicode text"),
  else Windows-1252 (older European Excel exports);
- CRLF, LF or CR line ends; blank lines anywhere;
- `,` `;` tab or `|` between fields, taken from the header line, or from an Excel
  `sep=;` first line;
- header names matched ignoring case, surrounding spaces and every character that is not
  a letter or digit, so `Interval Start`, `interval_start` and `INTERVALSTART` are one name;
- numbers with a decimal point, or a decimal comma where the file is not comma-separated,
  thousands separators only beside a decimal separator (`1.234,56`, `1,234.56`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import math
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from drivers.prices.series import PriceFileError

DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 1 << 16
_QUOTED = re.compile(r'"[^"]*"')
_SEP_LINE = re.compile(r"^sep=(.)\s*$", re.IGNORECASE)
_SPACES = str.maketrans("", "", " \u00a0\u202f")


def normalise(name: str) -> str:
    """A header name as lower-case letters and digits ("Interval Start" -> "intervalstart")."""
    return re.sub(r"[^0-9a-z]", "", name.strip().lower())


@dataclass(frozen=True, slots=True)
class Row:
    """One data line: its line number in the file (1-based) and its cells."""

    line: int
    cells: list[str]

    def get(self, index: int) -> str:
        """The cell at `index` without surrounding spaces; "" past the end of a short row."""
        return self.cells[index].strip() if index < len(self.cells) else ""


@dataclass
class Table:
    """The header of a price file and an iterator over its data rows."""

    path: Path
    columns: list[str]
    header_line: int
    delimiter: str
    _rows: Iterator[Row] = field(repr=False)

    @property
    def keys(self) -> list[str]:
        """The columns' normalised names (`normalise`), as layouts look them up."""
        return [normalise(c) for c in self.columns]

    def col(self, *keys: str) -> int | None:
        """Index of the first column whose normalised name is one of `keys` (tried in order)."""
        names = self.keys
        for key in keys:
            if key in names:
                return names.index(key)
        return None

    def found(self) -> str:
        """The columns as written, for error messages."""
        return ", ".join(repr(c) for c in self.columns if c) or "none"

    def where(self, line: int | None = None) -> str:
        """The file, or a line of it, for messages: "prices.csv:12"."""
        return f"{self.path}:{line}" if line is not None else str(self.path)

    def rows(self) -> Iterator[Row]:
        """The data rows, read as iterated (once).

        The iteration raises PriceFileError for bytes or CSV it cannot read.
        """
        return self._rows


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    """How to open the file's CSV bytes (again): plain, gzip, or the one CSV in a zip."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PriceFileError(f"{path}: cannot open: {e.strerror}") from None
    if magic[:2] == b"\x1f\x8b":
        return lambda: cast(IO[bytes], gzip.open(path, "rb"))
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise PriceFileError(f"{path}: damaged zip file ({e})") from None
        if any(n.startswith("xl/") for n in names):
            raise PriceFileError(f"{path}: an Excel workbook, not CSV: save the sheet as CSV "
                                 "(UTF-8) and load that")
        members = [n for n in names if n.lower().endswith((".csv", ".txt"))]
        if len(members) != 1:
            raise PriceFileError(f"{path}: a zip needs exactly one .csv inside; found "
                                 f"{', '.join(names) or 'nothing'}")
        member = members[0]

        def open_member() -> IO[bytes]:
            # In memory: a zip holds one report (a day or a month), and this closes the zip.
            with zipfile.ZipFile(path) as z:
                return io.BytesIO(z.read(member))

        return open_member
    return lambda: path.open("rb")


def _encoding(head: bytes) -> str:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _delimiter(header: str) -> str:
    bare = _QUOTED.sub("", header)
    counts = {d: bare.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _data_rows(reader: Iterator[list[str]], line_of: Callable[[], int]) -> Iterator[Row]:
    for cells in reader:
        if any(c.strip() for c in cells):
            yield Row(line_of(), cells)


@contextmanager
def open_table(path: Path | str) -> Iterator[Table]:
    """Open a price file for reading; the table's rows stream from the file.

    Raises:
        PriceFileError: the file cannot be opened or decoded, or has no header line.
    """
    path = Path(path)
    opener = _opener(path)
    try:
        with opener() as raw:
            head = raw.read(_SNIFF_BYTES)
    except (OSError, EOFError) as e:  # a damaged .gz
        raise PriceFileError(f"{path}: cannot read: {e}") from None
    encoding = _encoding(head)
    with opener() as raw, io.TextIOWrapper(raw, encoding=encoding, newline="") as text:
        lines = iter(text)
        skipped = 0
        delimiter: str | None = None
        header = ""
        try:
            for header in lines:
                skipped += 1
                sep = _SEP_LINE.match(header.strip("\ufeff"))
                if sep:
                    delimiter = sep.group(1)
                    if delimiter not in DELIMITERS:
                        raise PriceFileError(f"{path}:{skipped}: sep={delimiter}: fields must be "
                                             "separated by , ; tab or |")
                elif header.strip().strip("\ufeff"):
                    break
            else:
                raise PriceFileError(f"{path}: empty file")
        except UnicodeDecodeError:
            raise PriceFileError(f"{path}: not text in a known encoding (UTF-8, UTF-16, "
                                 "Windows-1252)") from None
        except (OSError, EOFError) as e:
            raise PriceFileError(f"{path}: cannot read: {e}") from None
        delimiter = delimiter or _delimiter(header)
        reader = csv.reader(itertools.chain([header], lines), delimiter=delimiter)
        offset = skipped - 1
        try:
            columns = [c.strip().strip("\ufeff").strip() for c in next(reader)]
        except csv.Error as e:
            raise PriceFileError(f"{path}:{skipped}: not CSV: {e}") from None

        def line_of() -> int:
            return reader.line_num + offset

        header_line = line_of()
        rows = _data_rows(reader, line_of)
        table = Table(path, columns, header_line, delimiter, _guard(rows, path, line_of))
        yield table


def _guard(rows: Iterator[Row], path: Path, line_of: Callable[[], int]) -> Iterator[Row]:
    """The rows, with decoding and CSV syntax faults turned into PriceFileError."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise PriceFileError(f"{path}:{line_of() + 1}: bytes that are not text in the file's "
                             "encoding; save it as UTF-8") from None
    except csv.Error as e:
        raise PriceFileError(f"{path}:{line_of()}: not CSV: {e}") from None
    except (OSError, EOFError) as e:  # a damaged .gz or zip member
        raise PriceFileError(f"{path}:{line_of() + 1}: cannot read: {e}") from None


class NumberReader:
    """Prices as text to floats, holding one decimal separator for the whole file.

    The first price written with a separator fixes it; a later price that uses the other
    one is an error naming both lines, since "4.857" may be 4.857 or 4,857.

    Args:
        delimiter: The file's field delimiter: in a comma-separated file a number with a
            comma alone is refused (thousands or decimal separator, no telling).
    """

    def __init__(self, delimiter: str) -> None:
        self.delimiter = delimiter
        self.decimal: str | None = None
        self.first: tuple[int, str] | None = None

    def read(self, text: str, line: int, column: str, where: str) -> float:
        """`text` as a finite float.

        Raises:
            PriceFileError: empty, not a number, not finite, or a separator that disagrees
                with the file's.
        """
        s = text.strip().translate(_SPACES)
        if not s:
            raise PriceFileError(f"{where}:{line}: no value in column {column!r}")
        comma, point = "," in s, "." in s
        decimal = (("," if s.rfind(",") > s.rfind(".") else ".") if comma and point else
                   "," if comma else "." if point else None)
        if decimal is not None:
            if decimal == "," and not point and self.delimiter == ",":
                raise PriceFileError(
                    f"{where}:{line}: {text.strip()!r} in column {column!r}: a comma in a "
                    "comma-separated file may be a thousands or a decimal separator; write "
                    "the number without it")
            if self.decimal is None:
                self.decimal, self.first = decimal, (line, text.strip())
            elif decimal != self.decimal:
                assert self.first is not None
                raise PriceFileError(
                    f"{where}:{line}: {text.strip()!r} uses {decimal!r} as decimal separator "
                    f"but line {self.first[0]} ({self.first[1]!r}) uses {self.decimal!r}")
            s = s.replace("." if decimal == "," else ",", "").replace(",", ".")
        try:
            value = float(s)
        except ValueError:
            raise PriceFileError(f"{where}:{line}: unparseable row: {text.strip()!r} in column "
                                 f"{column!r} is not a number") from None
        if not math.isfinite(value):
            raise PriceFileError(f"{where}:{line}: price is not a number: {text.strip()!r}")
        return value
