"""The two-column, header-less TSV that Google ships for Conceptual Captions (3M and 12M)."""

from __future__ import annotations

from pathlib import Path

from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, read_lines, split_fields


def read_pair_tsv(path: Path, opts: PrepOptions, url_index: int, header: tuple[str, str]) -> SourceRows:
    """Read `caption<TAB>url` or `url<TAB>caption` lines; no quoting (captions may contain quotes).

    A first line equal to `header` (as some re-distributions add) is skipped; a blank line is
    skipped and counted; a line that is not valid UTF-8 is skipped and counted (`not_utf8`, with
    its line number among the examples); any other line without exactly two fields is malformed
    input. URLs must be http(s) (`data_prep.records`).
    """
    collector = RowCollector(duplicate_urls=opts.duplicate_urls)  # type: ignore[arg-type]
    for lineno, line in read_lines(path, "--input TSV"):
        if line is None:
            collector.skip_row("not_utf8", f"{path}:{lineno}")
            continue
        if not line.strip():
            collector.skip("blank_line", f"{path}:{lineno}")
            continue
        fields = split_fields(path, lineno, line, expected=2)
        if lineno == 1 and tuple(f.strip().lower() for f in fields) == header:
            continue
        url, caption = fields[url_index], fields[1 - url_index]
        collector.add(url, caption, None, where=f"{path}:{lineno}")
    return collector.result()
