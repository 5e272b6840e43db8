"""Synthetic source data: four correlated CSV files, byte-identical for the same seed.

Vectorized with numpy, written by DuckDB's CSV writer, chunk by chunk, so 10M customers never
sit in memory at once. Dates count back from a fixed anchor, never from today.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from etl_assets.lib.schema import ACCOUNT_STATUSES, DEAL_STAGES, PAYMENT_STATUSES, PLANS

ANCHOR = "2026-01-01"  # every date counts back from here (also in the day() macro)
CHUNK_ROWS = 1_000_000

_FIRST = ["ana", "ben", "carla", "dmitri", "elif", "farah", "goran", "hana", "ivan", "jun",
          "kofi", "lena", "maria", "nils", "olu", "priya", "quinn", "rosa", "sven", "tariq",
          "uma", "vera", "wei", "xena", "yusuf", "zoe"]
_LAST = ["smith", "garcia", "muller", "tanaka", "okafor", "novak", "silva", "khan", "rossi",
         "dubois", "jensen", "kowalski", "nguyen", "haddad", "larsen", "ito"]
# Company words include commas, ampersands and non-ASCII text on purpose: they must survive.
_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Cyberdyne",
          "Soylent", "Hooli", "Vandelay", "Wonka", "Nakatomi", "Oscorp", "Aperture", "Pied Piper",
          "Massive", "Dunder", "Gringotts", "Monarch", "Zenith", "Blue Sun", "Nordlicht",
          "Café Olé", "Müller & Söhne", "Ōkami", "São Paulo Dados", "Kraków Systems"]
_SLUGS = ["".join(ch for ch in w.lower() if "a" <= ch <= "z") for w in _WORDS]
_SUFFIX = [" Inc.", " LLC", " GmbH", " Ltd", " Group", " Labs", " Co.", ", Inc.", ", LLC"]
_INDUSTRIES = ["Software", "Retail", "Healthcare", "Finance", "Manufacturing", "Education",
               "Logistics", "Media", "Energy", "Hospitality"]
_OWNERS = ["Alice Wong", "Bob Martin", "Chen Li", "Dana Cruz", "Eve Adams", "Farid Haddad",
           "Grace Kim", "Hugo Weber"]
# The categorical domains are the schema's own, in its order (the plan's MRR follows it).
_STAGES = list(DEAL_STAGES)
_PLANS = list(PLANS)
_PLAN_MRR = np.array([49.0, 299.0, 899.0, 4999.0])
_PAYMENTS = list(PAYMENT_STATUSES)
_STATUSES = list(ACCOUNT_STATUSES)

LISTS = {"first": _FIRST, "last": _LAST, "words": _WORDS, "slugs": _SLUGS, "suffix": _SUFFIX,
         "industries": _INDUSTRIES, "owners": _OWNERS, "stages": _STAGES, "plans": _PLANS,
         "payments": _PAYMENTS, "statuses": _STATUSES}

# Strings are built in DuckDB (vectorized) from the integer codes numpy draws. Lists are 0-based
# codes into 1-based SQL lists, hence the +1.
_MACROS = (
    "CREATE OR REPLACE TEMP MACRO pick(l, i) AS l[i + 1]",
    "CREATE OR REPLACE TEMP MACRO day(d) AS "
    "strftime(DATE '2026-01-01' - CAST(d AS INTEGER), '%Y-%m-%d')",
    # A few categoricals come spelled the way real exports spell them.
    """CREATE OR REPLACE TEMP MACRO variant(v, s) AS CASE s WHEN 1 THEN upper(v)
         WHEN 2 THEN replace(lower(v), ' ', '-') WHEN 3 THEN ' ' || lower(v) || ' ' ELSE v END""",
)
_MAIL = "pick($first, f) || '.' || pick($last, l) || '@' || pick($slugs, w) || idx || '.example.com'"

FILE_SQL = {
    "crm": """SELECT printf('cust_%08d', idx) AS customer_id,
                CASE WHEN no_email THEN NULL ELSE {mail} END AS email,
                pick($words, w) || pick($suffix, sfx) AS company_name,
                CASE WHEN no_industry THEN NULL ELSE pick($industries, ind) END AS industry,
                employees AS employee_count, variant(pick($stages, stage), stage_var) AS deal_stage,
                deal_value, pick($owners, owner) AS sales_owner, day(contact_days) AS last_contact
              FROM crm ORDER BY perm""",
    "billing": """SELECT printf('cust_%08d', idx) AS customer_id,
                CASE WHEN billing_alias THEN 'billing@' || pick($slugs, w) || idx || '.example.com'
                     ELSE {mail} END AS email,
                variant(pick($plans, plan), plan_var) AS plan, mrr,
                variant(pick($payments, payment), pay_var) AS payment_status,
                day(sub_days) AS subscription_start, day(pay_days) AS last_payment
              FROM billing ORDER BY perm""",
    "product": """SELECT printf('cust_%08d', idx) AS customer_id,
                CASE WHEN no_email THEN NULL ELSE {mail} END AS email,
                day(signup_days) AS signup_date, day(active_days) AS last_active,
                total_sessions, features_used,
                CASE WHEN no_usage THEN NULL ELSE usage_pct END AS usage_pct,
                pick($statuses, status) AS account_status
              FROM product ORDER BY perm""",
    "support": """SELECT printf('cust_%08d', idx) AS customer_id,
                CASE WHEN helpdesk THEN 'user' || idx || '@helpdesk.example'
                     ELSE {mail} END AS email,
                total_tickets, open_tickets, avg_resolution_hrs,
                CASE WHEN total_tickets = 0 THEN NULL ELSE day(ticket_days) END AS last_ticket_date,
                CASE WHEN no_nps THEN NULL ELSE nps END AS nps_score, csat_score
              FROM support ORDER BY perm""",
}
FILE_SQL = {name: sql.replace("{mail}", _MAIL) for name, sql in FILE_SQL.items()}


def _variant_codes(rng: np.random.Generator, rows: int, p: float) -> np.ndarray:
    return np.where(rng.random(rows) < p, rng.integers(1, 4, rows), 0)


def _chunk(seed: int, start: int, rows: int) -> dict[str, pd.DataFrame]:
    """Numeric frames for customers start+1 .. start+rows (own RNG stream per chunk)."""
    rng = np.random.default_rng([seed, start])
    idx = np.arange(start + 1, start + rows + 1, dtype=np.int64)
    health = rng.beta(2.2, 1.8, rows)  # the hidden "how well is this account doing"
    person = {
        "idx": idx,
        "f": rng.integers(0, len(_FIRST), rows),
        "l": rng.integers(0, len(_LAST), rows),
        "w": rng.integers(0, len(_WORDS), rows),
    }
    employees = np.maximum(1, rng.lognormal(3.5, 1.4, rows)).astype(np.int64)
    size = np.digitize(employees, [20, 100, 500])  # 0..3, drives plan and stage
    crm = pd.DataFrame({
        **person,
        "no_email": rng.random(rows) < 0.02,
        "sfx": rng.integers(0, len(_SUFFIX), rows),
        "no_industry": rng.random(rows) < 0.03,
        "ind": rng.integers(0, len(_INDUSTRIES), rows),
        "employees": employees,
        "stage": np.clip(size + rng.integers(-2, 3, rows), 0, len(_STAGES) - 1),
        "stage_var": _variant_codes(rng, rows, 0.02),
        "deal_value": np.round(employees * rng.uniform(50, 400, rows), 2),
        "owner": rng.integers(0, len(_OWNERS), rows),
        "contact_days": rng.integers(0, 365, rows),
    })
    plan = np.clip(size + rng.integers(-1, 2, rows), 0, 3)
    roll = rng.random(rows)
    sub_days = rng.integers(30, 1500, rows)
    billing = pd.DataFrame({
        **person,
        "billing_alias": rng.random(rows) < 0.1,
        "plan": plan,
        "plan_var": _variant_codes(rng, rows, 0.02),
        "mrr": np.round(_PLAN_MRR[plan] * rng.uniform(0.8, 1.6, rows), 2),
        "payment": np.where(roll < 0.04 + 0.25 * (1 - health) ** 2, 1,
                            np.where(roll < 0.06 + 0.3 * (1 - health) ** 2, 2, 0)),
        "pay_var": _variant_codes(rng, rows, 0.03),
        "sub_days": sub_days,
        "pay_days": rng.integers(0, 45, rows),
    })
    usage = np.clip(np.round(health * 100 + rng.normal(0, 12, rows), 1), 0, 100)
    product = pd.DataFrame({
        **person,
        "no_email": rng.random(rows) < 0.2,
        "signup_days": sub_days + rng.integers(0, 30, rows),
        "active_days": np.round((1 - health) * 90 * rng.random(rows)).astype(np.int64),
        "total_sessions": rng.poisson(5 + 400 * health),
        "features_used": np.clip(rng.poisson(2 + 20 * health), 0, 40),
        "usage_pct": usage,
        "no_usage": rng.random(rows) < 0.02,
        "status": np.where(rng.random(rows) < 0.05, 2, np.where(usage < 15, 1, 0)),
    })
    tickets = rng.poisson(0.5 + 8 * (1 - health))
    support = pd.DataFrame({
        **person,
        # The helpdesk often knows only a placeholder address: it must never win over CRM's.
        "helpdesk": rng.random(rows) < 0.3,
        "total_tickets": tickets,
        "open_tickets": rng.binomial(tickets, 0.15 + 0.35 * (1 - health)),
        "avg_resolution_hrs": np.where(tickets > 0, np.round(rng.gamma(2, 8, rows), 1), 0.0),
        "ticket_days": rng.integers(0, 180, rows),
        "nps": np.clip(np.round(health * 10 + rng.normal(0, 1.5, rows)), 0, 10).astype(np.int64),
        "no_nps": rng.random(rows) < 0.1,
        "csat_score": np.round(np.clip(1 + 4 * health + rng.normal(0, 0.5, rows), 0, 5), 1),
    })
    # Not every customer is known to every system, and files come unsorted.
    frames = {"crm": crm}
    for name, frame, p_present in (("billing", billing, 0.97), ("product", product, 0.95),
                                   ("support", support, 0.85)):
        frames[name] = frame[rng.random(rows) < p_present].reset_index(drop=True)
    for frame in frames.values():
        frame["perm"] = rng.permutation(len(frame))
    return frames


def generate(rows: int, seed: int = 42, out_dir: str | Path = "data") -> dict[str, Path]:
    """Write crm.csv, billing.csv, product.csv and support.csv for `rows` customers."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    out = Path(out_dir)
    finals = {name: out / f"{name}.csv" for name in ("crm", "billing", "product", "support")}
    con = duckdb.connect()
    for macro in _MACROS:
        con.execute(macro)
    try:
        with chunked_files(finals) as chunk_of:
            for n, start in enumerate(range(0, rows, CHUNK_ROWS)):
                frames = _chunk(seed, start, min(CHUNK_ROWS, rows - start))
                for name, frame in frames.items():
                    sql = FILE_SQL[name]
                    used = {k: v for k, v in LISTS.items() if f"${k}" in sql}
                    con.register(name, frame)
                    with chunk_of(name) as part:
                        con.execute(f"COPY ({sql}) TO $path (FORMAT csv, HEADER $header)",
                                    {**used, "path": str(part), "header": n == 0})
                    con.unregister(name)
    finally:
        con.close()
    return finals


@contextmanager
def chunked_files(finals: dict[str, Path]) -> Iterator[Callable[[str], AbstractContextManager[Path]]]:
    """Files written chunk by chunk, each renamed into place only once all are complete.

    `with chunk_of(name) as part:` writes one chunk to the temp file `part`, then appends it to
    `name`'s file; on any failure none of `finals` is touched and the temp folder goes."""
    out = next(iter(finals.values())).parent
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = out / f".generate-{os.getpid()}"
    tmp_dir.mkdir(exist_ok=True)
    # Open for the whole generation, closed in the `finally` below.
    partials = {name: open(tmp_dir / f"{name}.csv", "wb") for name in finals}  # noqa: SIM115

    @contextmanager
    def chunk_of(name: str) -> Iterator[Path]:
        part = tmp_dir / f"{name}.part.csv"
        yield part
        with open(part, "rb") as src:
            shutil.copyfileobj(src, partials[name], 1 << 20)

    try:
        yield chunk_of
        for name, fh in partials.items():
            fh.close()
            os.replace(tmp_dir / f"{name}.csv", finals[name])
    finally:
        for fh in partials.values():
            fh.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)


if __name__ == "__main__":  # a quick timing aid: python -m etl_assets.tools.generate ROWS DIR
    import sys

    t0 = time.monotonic()
    generate(int(sys.argv[1]), out_dir=sys.argv[2])
    print(f"{time.monotonic() - t0:.2f}s")
