"""No password is ever printed (issue 31, finding 5), and an outage of the Dagster instance's
PostgreSQL prints one line per wait, not a warning per retry (finding 6)."""

import logging
import socket

import pytest
import sqlalchemy
from dagster_postgres.utils import retry_pg_connection_fn

from etl_assets.lib import secrets
from etl_assets.tools import cli
from etl_assets.tools.instance import PostgresWaits

PASSWORD = "Zq7@Kx/9pw#Tv"
PIECES = ["Zq7@Kx/9pw#Tv", "Kx/9pw", "9pw#Tv", "Zq7@"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again once the socket is


@pytest.mark.parametrize("text", [
    f"postgresql+psycopg2://etl:{PASSWORD}@127.0.0.1:5432/db",
    f"could not connect: 'redis://:{PASSWORD}@127.0.0.1:6379/0' refused",
    f"dbname=lake host=127.0.0.1 user=etl password={PASSWORD} port=5432",
    f"dbname=lake password='{PASSWORD} x' user=etl",
])
def test_redact_removes_url_and_libpq_passwords(text):
    redacted = secrets.redact(text)
    assert "***" in redacted and not any(p in redacted for p in ("Zq7", "9pw", "Tv")), redacted


def test_pieces_of_a_known_password_are_redacted_where_a_driver_misread_it():
    # A driver that cut the URL at the unencoded @ names the rest of the password as a host.
    env = {"DAGSTER_PG_URL": f"postgresql+psycopg2://etl:{PASSWORD}@127.0.0.1/db"}
    known = secrets.known_secrets(env)
    message = 'could not translate host name "Kx/9pw#Tv@127.0.0.1" to address'
    assert "Kx/9pw" not in secrets.redact(message, known) and "127.0.0.1" in message
    assert secrets.redact("nothing secret here", known) == "nothing secret here"


@pytest.mark.parametrize("verbose", [[], ["-v"]])
@pytest.mark.parametrize("env", [
    {"DUCKDB_PATH": f"ducklake:postgresql://etl:{PASSWORD}@127.0.0.1/lake"},
    {"DUCKDB_PATH": f"ducklake:postgres:dbname=lake host=127.0.0.1 password={PASSWORD}",
     "DUCKLAKE_DATA_PATH": "/nonexistent"},
    {"DAGSTER_PG_URL": f"postgresql+psycopg2://etl:{PASSWORD}@127.0.0.1:5432/dagster"},
    {"DAGSTER_PG_URL": "postgresql+psycopg2://etl:Zq7%40Kx%2F9pw%23Tv@127.0.0.1:{port}/dagster"},
])
def test_no_output_of_a_failing_run_holds_the_password(tmp_path, sample_dir, monkeypatch, capsys,
                                                       env, verbose):
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(port=_closed_port()))
    monkeypatch.setenv("ETL_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    code = cli.main(["run", "--data-dir", str(sample_dir), *verbose])
    out, err = capsys.readouterr()
    assert code in (1, 2) and (out + err).strip(), (code, out, err)
    for piece in PIECES + ["Zq7%40Kx"]:
        assert piece not in out + err, out + err


def test_a_postgres_outage_prints_one_line_per_wait_not_a_warning_per_retry(capsys):
    """dagster-postgres's own retry loop against a real closed port: its warnings (84 of them
    in an outage the prober caused) become one `waiting:` line."""
    cli.guard_output()
    assert any(isinstance(f, PostgresWaits) for f in logging.getLogger().filters)
    encoded = "Zq7%40Kx%2F9pw%23Tv"
    url = f"postgresql+psycopg2://etl:{encoded}@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(Exception, match="too many retries"):
        retry_pg_connection_fn(lambda: sqlalchemy.create_engine(url).connect(), retry_limit=3,
                               retry_wait=0.01)
    out, err = capsys.readouterr()
    assert "Retrying failed database connection" not in out + err
    assert err.count("waiting: PostgreSQL did not answer") == 1, err
