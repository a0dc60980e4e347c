"""`tessera identity train` and `replay` on files, with column mapping and bad input."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from identity.sources import read_records
from pipelines.cli import app
from synthetic.identities import identity_records

runner = CliRunner()


def _write(path, rows, rename):
    columns = [rename.get(c, c) for c in rows[0]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(row.values())


def test_train_then_replay_a_mapped_csv_and_score_it_against_the_truth(tmp_path):
    rows = list(identity_records(300, seed=5))
    source = tmp_path / "people.csv"
    _write(source, rows, {"last_name": "surname", "record_id": "id", "dob": "birth"})
    maps = ["--map", "surname=last_name", "--map", "birth=dob"]
    model = tmp_path / "model.json"
    trained = runner.invoke(
        app, ["identity", "train", str(source), "--id-column", "id", *maps, "--out", str(model)]
    )
    assert trained.exit_code == 0, trained.output
    assert "last_name" in trained.output and model.exists()
    out = tmp_path / "clusters.csv"
    replayed = runner.invoke(
        app,
        [
            "identity",
            "replay",
            str(source),
            "--model",
            str(model),
            "--id-column",
            "id",
            *maps,
            "--out",
            str(out),
            "--batch-size",
            "97",
            "--truth-column",
            "person_id",
        ],
    )
    assert replayed.exit_code == 0, replayed.output
    clusters = list(csv.DictReader(out.open()))
    assert [c["record_id"] for c in clusters] == [r["record_id"] for r in rows]
    assert '"f1"' in replayed.output
    f1 = float(replayed.output.split('"f1":')[1].split(",")[0])
    assert f1 > 0.85


def test_mapping_errors_name_the_problem(tmp_path):
    source = tmp_path / "people.csv"
    _write(source, list(identity_records(5, seed=1)), {})
    bad_field = runner.invoke(app, ["identity", "train", str(source), "--map", "surname=lastname"])
    assert bad_field.exit_code == 2 and "not a record field" in bad_field.output
    bad_form = runner.invoke(app, ["identity", "train", str(source), "--map", "surname"])
    assert bad_form.exit_code == 2 and "SRC=FIELD" in bad_form.output
    bad_id = runner.invoke(app, ["identity", "train", str(source), "--id-column", "nope"])
    assert bad_id.exit_code == 2 and "id column 'nope'" in bad_id.output
    missing = runner.invoke(
        app, ["identity", "replay", str(tmp_path / "x.csv"), "--model", "m.json", "--out", "o.csv"]
    )
    assert missing.exit_code == 2


def test_parquet_rows_normalise_like_csv_rows_and_unparseable_dates_become_null(tmp_path):
    path = tmp_path / "people.parquet"
    pq.write_table(
        pa.table(
            {
                "rid": [1, 2, 3],
                "dob": ["19850302", "02/03/1985", "not a date"],
                "email": [" Ann@X.com", "ann@x.com", None],
                "ignored": ["a", "b", "c"],
            }
        ),
        path,
    )
    records = list(read_records(path, "rid"))
    assert [r[0] for r in records] == ["1", "2", "3"]
    assert [r[1]["dob"] for r in records] == ["1985-03-02", "1985-03-02", None]
    assert [r[1]["email"] for r in records] == ["ann@x.com", "ann@x.com", None]
