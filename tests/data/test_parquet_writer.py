"""ParquetRowWriter: batches give back exactly the rows written (same as one pandas write), uids are
unique across batches, and a failure leaves no partial file."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from PIL import Image

from vlcal_verl.data.schema import ParquetRowWriter, make_row, read_parquet, write_parquet


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        make_row(
            question=f"how many? {i}",
            answer=str(i),
            images=[Image.new("RGB", (28 + i % 3, 28), (i, 0, 0))],
            data_source="t",
            answer_kind="math",
            index=i,
            uid=f"u{i}",
            category="c" if i % 2 else "",
            unanswerable=i % 5 == 0,
        )
        for i in range(start, start + n)
    ]


def test_batches_read_back_like_one_pandas_write(tmp_path):
    want = rows(23)
    with ParquetRowWriter(tmp_path / "a.parquet", batch_rows=5) as w:
        for r in want:
            w.write(r)
    pd.DataFrame(want).to_parquet(tmp_path / "b.parquet", index=False)
    assert read_parquet(tmp_path / "a.parquet") == read_parquet(tmp_path / "b.parquet")
    assert w.rows == 23
    assert w.sha256 == hashlib.sha256((tmp_path / "a.parquet").read_bytes()).hexdigest()
    assert (
        write_parquet(want, tmp_path / "c.parquet")
        == hashlib.sha256((tmp_path / "c.parquet").read_bytes()).hexdigest()
    )


def test_duplicate_uid_across_batches_fails_and_removes_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    with (
        pytest.raises(ValueError, match=r"row 7: duplicate 'extra_info.uid' 'u2'"),
        ParquetRowWriter(path, batch_rows=3) as w,
    ):
        for r in [*rows(7), rows(1, start=2)[0]]:
            w.write(r)
    assert not path.exists()


def test_bad_row_is_named_and_empty_writer_is_an_error(tmp_path):
    bad = rows(1)[0]
    del bad["reward_model"]
    with pytest.raises(ValueError, match="row 0"), ParquetRowWriter(tmp_path / "e.parquet") as w:
        w.write(bad)
    with pytest.raises(ValueError, match="no rows"):
        ParquetRowWriter(tmp_path / "f.parquet").close()
